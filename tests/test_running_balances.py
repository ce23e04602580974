"""Revision 0005 on both backends: every transfer carries its accounts' balances after it,
an existing ledger gains them exactly in place and audits clean, and the audit finds an
edited running balance by replay on both its paths."""

from __future__ import annotations

import pytest
from alembic import command
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

import bank
from bank.ledger.audit import audit, audit_ledger
from bank.ledger.chain import GENESIS, transfer_hash_v2
from bank.ledger.migrate import ALEMBIC_LOCK, alembic_config, head_revision
from tests.conftest import LedgerDb

CHAINED = "seq, key, kind, debit_account_id, credit_account_id, amount, ts_us, hash"
RUNNING = "debit_balance, credit_balance"


def _migrate(ledger: LedgerDb, verb: str, revision: str) -> None:
    engine = create_engine(ledger.url, poolclass=NullPool)
    try:
        with ALEMBIC_LOCK, engine.begin() as conn:
            cfg = alembic_config()
            cfg.attributes["connection"] = conn
            getattr(command, verb)(cfg, revision)
    finally:
        engine.dispose()


def _fill(b: bank.Bank) -> None:
    """A small ledger with every kind of row, a limit change and keys."""
    alice = b.open_account("alice", overdraft_limit=50).id
    bob = b.open_account("bob").id
    carol = b.open_account("carol").id
    b.deposit(alice, 1_000, key="d1")
    b.transfer(alice, bob, 1_020)
    b.set_overdraft_limit(alice, 40)
    b.deposit(carol, 7)
    futures = b.submit_many(
        [bank.Transfer(source=bob, target=carol, amount=1 + i % 3) for i in range(60)]
    )
    for future in futures:
        future.result()
    b.withdraw(carol, 5, key="w1")


def _as_format_2(ledger: LedgerDb) -> None:
    """Make the engine's rows what the engine of revisions 0003-0005 wrote: hash format 2.
    (Since 0006 it writes format 3, which no downgrade below 0006 keeps.)"""
    statements = ["UPDATE chain_formats SET version = 2 WHERE chain = 'transfers' AND version = 3"]
    prev = GENESIS
    for seq, key, kind, debit, credit, amount, ts_us in ledger.query(
        "SELECT seq, key, kind, debit_account_id, credit_account_id, amount, ts_us "
        "FROM transfers ORDER BY seq"
    ):
        prev = transfer_hash_v2(prev, seq, kind, debit, credit, amount, ts_us, key)
        statements.append(f"UPDATE transfers SET hash = '{prev}' WHERE seq = {seq}")
    ledger.execute(*statements)


def _replayed(rows: list[tuple[object, ...]]) -> list[tuple[int, int]]:
    """(debit after, credit after) of each row, replayed here from the rows alone."""
    balances: dict[object, int] = {}
    out = []
    for _seq, _key, _kind, debit, credit, amount, *_ in rows:
        assert isinstance(amount, int)
        balances[debit] = balances.get(debit, 0) - amount
        balances[credit] = balances.get(credit, 0) + amount
        out.append((balances[debit], balances[credit]))
    return out


def test_the_engine_writes_each_rows_balances_after_it(ledger_db: LedgerDb) -> None:
    with bank.Bank.open(ledger_db.db) as b:
        _fill(b)
    rows = ledger_db.query(f"SELECT {CHAINED} FROM transfers ORDER BY seq")
    assert ledger_db.query(f"SELECT {RUNNING} FROM transfers ORDER BY seq") == _replayed(rows)


def test_an_existing_ledger_upgrades_in_place_and_audits_clean(ledger_db: LedgerDb) -> None:
    """A ledger at 0004 (written by the engine, set back) gains the running balances,
    backfilled exactly, and no row or hash changes; the engine goes on from there."""
    with bank.Bank.open(ledger_db.db) as b:
        _fill(b)
    _as_format_2(ledger_db)
    written = ledger_db.query(f"SELECT {CHAINED}, {RUNNING} FROM transfers ORDER BY seq")
    events = ledger_db.query("SELECT * FROM account_events ORDER BY seq")
    _migrate(ledger_db, "downgrade", "0004")
    assert ledger_db.query("SELECT version_num FROM alembic_version") == [("0004",)]
    old = audit_ledger(ledger_db.db)  # the schema is exactly 0004's; nothing to compare
    assert old.ok and old.revision == "0004", old.problems[:3]
    with pytest.raises(Exception, match="debit_balance"):
        ledger_db.query("SELECT debit_balance FROM transfers")
    with bank.Bank.open(ledger_db.db) as b:
        assert b.revision == head_revision()
        named = {a.name: a.id for a in b.accounts()}
        assert b.balance(named["alice"]) == -20
        b.deposit(named["bob"], 3)
    rows = ledger_db.query(f"SELECT {CHAINED}, {RUNNING} FROM transfers ORDER BY seq")
    assert rows[: len(written)] == written  # backfilled to what the engine had written
    assert [r[8:] for r in rows] == _replayed(rows)
    assert ledger_db.query("SELECT * FROM account_events ORDER BY seq") == events
    report = audit_ledger(ledger_db.db)
    assert report.ok, report.problems[:3]
    assert report.revision == head_revision()


@pytest.mark.parametrize("column", ["debit_balance", "credit_balance"])
def test_an_edited_running_balance_is_found_on_both_paths(ledger_db: LedgerDb, column: str) -> None:
    with bank.Bank.open(ledger_db.db) as b:
        _fill(b)
    ledger_db.execute(f"UPDATE transfers SET {column} = {column} + 1 WHERE seq = 30")
    exact = audit(ledger_db.db, processes=1)
    fast = audit(ledger_db.db, processes=2, parallel_rows_min=1)
    for report in (exact, fast):
        # Hash format 3 (revision 0006) covers the running balances too.
        assert [(p.kind, p.seq) for p in report.problems] == [
            ("hash_mismatch", 30),
            ("running_balance", 30),
        ]
        assert report.problems[1].found == report.problems[1].expected + 1  # type: ignore[operator]
    assert exact.problems == fast.problems
