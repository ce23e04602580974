"""History pages and balances as of a seq, on both backends, through the bank and the
read-only reader: they agree with a plain replay of the receipts, page without skipping or
repeating, and refuse every bad argument with a specific error."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

import bank
from bank.ledger.reader import LedgerReader
from bank.limits import HISTORY_LIMIT_MAX
from tests.conftest import LedgerDb


def _fill(b: bank.Bank) -> tuple[list[int], list[bank.Receipt]]:
    """Three customers, a few hundred mixed operations; returns the ids and every receipt."""
    ids = [b.open_account(name, overdraft_limit=500).id for name in ("ann", "ben", "cat")]
    receipts = [b.deposit(ids[0], 10_000), b.deposit(ids[1], 5)]
    commands: list[Any] = []
    for i in range(120):
        source, target = ids[i % 3], ids[(i + 1) % 3]
        commands.append(bank.Transfer(source=source, target=target, amount=1 + i % 7))
        if i % 40 == 0:
            commands.append(bank.Withdrawal(account=ids[2], amount=3))
    receipts += [f.result() for f in b.submit_many(commands)]
    return ids, receipts


def _replay(receipts: list[bank.Receipt]) -> dict[int, dict[int, int]]:
    """seq -> every balance right after it, from the receipts alone."""
    balances: dict[int, int] = {}
    out: dict[int, dict[int, int]] = {0: {}}
    for r in sorted(receipts):
        balances[r.debit_account] = balances.get(r.debit_account, 0) - r.amount
        balances[r.credit_account] = balances.get(r.credit_account, 0) + r.amount
        out[r.seq] = dict(balances)
    return out


def test_pages_and_point_balances_agree_with_a_replay(ledger_db: LedgerDb) -> None:
    with bank.Bank.open(ledger_db.db) as b:
        ids, receipts = _fill(b)
        at = _replay(receipts)
        head = max(r.seq for r in receipts)
        for account in [0, *ids]:
            mine = [r for r in receipts if account in (r.debit_account, r.credit_account)]
            assert b.history(account, limit=HISTORY_LIMIT_MAX) == mine
            assert list(b.iter_history(account, page=7)) == mine
            assert b.history(account, after_seq=mine[3].seq, limit=5) == mine[4:9]
            assert b.history(account, after_seq=head) == []
            for seq in (0, 1, 2, head // 2, head - 1, head):
                assert b.balance(account, at_seq=seq) == at[seq].get(account, 0), (account, seq)
            assert b.balance(account, at_seq=head) == b.balance(account)
    with LedgerReader(ledger_db.db) as reader:
        for account in ids:
            mine = [r for r in receipts if account in (r.debit_account, r.credit_account)]
            assert reader.history(account, after_seq=mine[0].seq, limit=3) == mine[1:4]
            assert list(reader.iter_history(account, page=10)) == mine
            assert reader.balance(account, at_seq=head // 2) == at[head // 2].get(account, 0)
            assert reader.balance(account) == at[head][account]
        for seq in (0, 1, head // 2, head):
            expected = {a: at[seq].get(a, 0) for a in [0, *ids] if a == 0 or seq >= 1}
            # The customers were opened before seq 1: at seq 0 only @cash... and them.
            found = reader.balances_at(seq)
            assert {a: found[a] for a in expected} == expected
        assert set(reader.balances_at(head)) == {0, *ids}


def test_every_account_open_at_a_seq_is_listed_with_its_exact_balance(
    ledger_db: LedgerDb,
) -> None:
    """The documented query (README) skips accounts opened later and is exact at 64 bits."""
    with bank.Bank.open(ledger_db.db) as b:
        first = b.open_account("first").id
        b.deposit(first, 10**15)
        b.deposit(first, 10**15)
        late = b.open_account("late").id
        b.transfer(first, late, 10**15 - 1)
    with LedgerReader(ledger_db.db) as reader:
        assert reader.balances_at(0) == {0: 0, first: 0}
        assert reader.balances_at(2) == {0: -2 * 10**15, first: 2 * 10**15, late: 0}
        assert reader.balances_at(3) == {0: -2 * 10**15, first: 10**15 + 1, late: 10**15 - 1}


#: (call on a bank or a reader with account `a`, the error, what its message says).
BAD_CALLS: list[tuple[Any, type[Exception], str]] = [
    (lambda b, a: b.history(a, limit=0), bank.InvalidCommand, "history.limit"),
    (lambda b, a: b.history(a, limit=HISTORY_LIMIT_MAX + 1), bank.InvalidCommand, "limit"),
    (lambda b, a: b.history(a, limit=None), bank.InvalidCommand, "limit"),
    (lambda b, a: b.history(a, limit=True), bank.InvalidCommand, "limit"),
    (lambda b, a: b.history(a, limit=2.0), bank.InvalidCommand, "limit"),
    (lambda b, a: b.history(a, after_seq=-1), bank.InvalidCommand, "history.after_seq"),
    (lambda b, a: b.history(a, after_seq="3"), bank.InvalidCommand, "after_seq"),
    (lambda b, a: b.history(a, after_seq=2**63), bank.InvalidCommand, "after_seq"),
    (lambda b, a: b.history(99), bank.AccountNotFound, "99"),
    (lambda b, a: b.history("1"), bank.InvalidCommand, "account id"),
    (lambda b, a: b.iter_history(a, page=0), bank.InvalidCommand, "iter_history.page"),
    (lambda b, a: b.iter_history(a, after_seq=-5), bank.InvalidCommand, "after_seq"),
    (lambda b, a: b.iter_history(99), bank.AccountNotFound, "99"),
    (lambda b, a: b.balance(a, at_seq=-1), bank.InvalidCommand, "balance.at_seq"),
    (lambda b, a: b.balance(a, at_seq=1.0), bank.InvalidCommand, "at_seq"),
    (lambda b, a: b.balance(a, at_seq=False), bank.InvalidCommand, "at_seq"),
    (lambda b, a: b.balance(a, at_seq=3), bank.SeqBeyondHead, "beyond the last committed"),
    (lambda b, a: b.balance(a, at_seq=2**63 - 1), bank.SeqBeyondHead, "seq 2"),
    (lambda b, a: b.balance(99, at_seq=1), bank.AccountNotFound, "99"),
]


def test_bad_arguments_are_refused(ledger_db: LedgerDb) -> None:
    """Each bad argument, on the bank and on the reader: its own error, nothing changed."""
    with bank.Bank.open(ledger_db.db) as b:
        a = b.open_account("a").id
        b.deposit(a, 5)
        b.withdraw(a, 1)  # the head is seq 2
        for call, error, message in BAD_CALLS:
            with pytest.raises(error, match=message):
                call(b, a)
        assert b.balance(a, at_seq=2) == 4 == b.balance(a)
    with LedgerReader(ledger_db.db) as reader:
        for call, error, message in BAD_CALLS:
            with pytest.raises(error, match=message):
                call(reader, a)


def test_a_stream_is_refused_once_the_bank_is_closed(ledger_db: LedgerDb) -> None:
    b = bank.Bank.open(ledger_db.db)
    a = b.open_account("a").id
    for _ in range(5):
        b.deposit(a, 1)
    stream = b.iter_history(a, page=2)
    assert next(stream).seq == 1
    b.close()
    with pytest.raises(bank.BankClosed):
        list(stream)
    with pytest.raises(bank.BankClosed):
        b.balance(a, at_seq=1)


def test_bank_balance_on_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bank.cli import main

    path = tmp_path / "ledger.db"
    with bank.Bank.open(path) as b:
        a = b.open_account("alice").id
        b.deposit(a, 12_34)
        b.withdraw(a, 34)
    assert main(["balance", "alice", "--db", str(path)]) == 0
    assert capsys.readouterr().out == "alice (id 1): 12.00 now\n"
    assert main(["balance", str(a), "--db", str(path), "--at-seq", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "account": a,
        "name": "alice",
        "balance": 12_34,
        "at_seq": 1,
    }
    assert main(["balance", "alice", "--db", str(path), "--at-seq", "3"]) == 1
    assert "SeqBeyondHead" in capsys.readouterr().err
    assert main(["balance", "bob", "--db", str(path)]) == 1
    assert main(["balance", "alice", "--db", str(path), "--at-seq", "-1"]) == 2
    assert main(["balance", "alice", "--db", str(tmp_path / "none.db")]) == 2


def test_pages_and_point_balances_are_index_lookups_on_sqlite(tmp_path: Path) -> None:
    """SQLite's plan for each statement: a search of the postings key (revision 0007; the
    rows above W: a range of transfers by seq), no scan (tests/test_postings.py has the
    plans of both backends on a long ledger)."""
    from sqlalchemy import create_engine, event
    from sqlalchemy.pool import NullPool

    from bank.ledger import store

    path = tmp_path / "ledger.db"
    with bank.Bank.open(path) as b:
        b.deposit(b.open_account("a").id, 5)
    engine = create_engine(f"sqlite:///{path}", poolclass=NullPool)
    statements: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> None:
        statements.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", record)
    try:
        with engine.connect() as conn:
            store.history_page(conn, 1, 0, 10)
            store.balance_at(conn, 1, 1)
            event.remove(engine, "before_cursor_execute", record)
            plans = [
                " | ".join(
                    str(row[-1]) for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {s}", p)
                )
                for s, p in statements
            ]
    finally:
        engine.dispose()
    assert len(plans) == 2
    for plan in plans:
        assert "SEARCH p USING PRIMARY KEY (account_id=?" in plan, plan
        assert "SEARCH t USING INTEGER PRIMARY KEY (rowid>?" in plan, plan
        assert not re.search(r"\bSCAN (t|p|transfers|postings)\b", plan), plan
