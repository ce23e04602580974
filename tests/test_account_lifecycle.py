"""Accounts by name, `open_account(exist_ok=True)`, and closing: only an empty account
closes, nothing touches it afterwards (refused with `AccountClosed`, also when a close
races transfers), the state survives a reopen, and the audit proves both by replay."""

from __future__ import annotations

import random
import sqlite3
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import bank
from bank import lockcheck
from bank.errors import SchemaDowngradeRefused
from bank.ledger.reader import LedgerReader
from bank.records import AccountSummary
from tests.audit_ledgers import edit, rechain, recompute_running
from tests.conftest import LedgerDb
from tests.test_running_balances import _migrate


def test_accounts_by_name_and_exist_ok(ledger_db: LedgerDb) -> None:
    with bank.Bank.open(ledger_db.db) as b:
        alice = b.open_account("alice", overdraft_limit=10)
        assert b.account_named("alice") is alice
        assert b.account_named("@cash").id == bank.CASH_ACCOUNT_ID
        assert b.open_account("alice", overdraft_limit=10, exist_ok=True) is alice
        with pytest.raises(bank.AccountNameTaken, match="overdraft limit 10, not 0"):
            b.open_account("alice", exist_ok=True)
        with pytest.raises(bank.AccountNameTaken, match="exists"):
            b.open_account("alice", overdraft_limit=10)
        with pytest.raises(bank.AccountNotFound, match="no account named 'bob'"):
            b.account_named("bob")
        for bad in (None, 5, b"alice"):
            with pytest.raises(bank.InvalidCommand, match=r"account_named\.name"):
                b.account_named(bad)  # type: ignore[arg-type]
        for flag in (1, "yes", None):
            with pytest.raises(bank.InvalidCommand, match="exist_ok must be a bool"):
                b.open_account("carol", exist_ok=flag)  # type: ignore[arg-type]
        with pytest.raises(bank.InvalidCommand):
            b.open_account("", exist_ok=True)
        assert [a.name for a in b.accounts()] == ["alice"]  # nothing opened by a refusal


def test_closing_only_an_empty_account_and_nothing_after_it(ledger_db: LedgerDb) -> None:
    with bank.Bank.open(ledger_db.db) as b:
        alice, bob = b.open_account("alice").id, b.open_account("bob").id
        b.deposit(alice, 100)
        with pytest.raises(bank.AccountNotEmpty, match="balance of 100"):
            b.close_account(alice)
        b.withdraw(alice, 50)
        b.transfer(alice, bob, 50, key="t1")
        closed = b.close_account(alice)
        assert closed.closed and closed.balance == 0
        assert [(a.name, a.closed) for a in b.accounts()] == [("alice", True), ("bob", False)]
        refused: list[Any] = [
            lambda: b.deposit(alice, 1),
            lambda: b.withdraw(alice, 1),
            lambda: b.transfer(bob, alice, 1),
            lambda: b.transfer(alice, bob, 1),
            lambda: b.set_overdraft_limit(alice, 5),
            lambda: b.close_account(alice),
        ]
        for call in refused:
            with pytest.raises(bank.AccountClosed, match=f"account {alice}"):
                call()
        # A keyed operation committed before the close is still answered from the ledger.
        assert b.transfer(alice, bob, 50, key="t1").seq == 3
        with pytest.raises(bank.AccountClosed):  # ... and a refused key stays free
            b.deposit(alice, 1, key="later")
        assert b.find("later") is None
        with pytest.raises(bank.InvalidCommand, match="@cash never closes"):
            b.close_account(bank.CASH_ACCOUNT_ID)
        with pytest.raises(bank.AccountNotFound):
            b.close_account(99)
        with pytest.raises(bank.InvalidCommand):
            b.close_account("alice")  # type: ignore[arg-type]
        assert b.open_account("alice", exist_ok=True).closed
        assert b.audit().ok
    events = ledger_db.query("SELECT kind, account_id, transfer_seq FROM account_events")
    assert events[-1] == ("close", alice, 3)
    with bank.Bank.open(ledger_db.db) as b:  # the closed state is the ledger's
        assert b.account(alice).closed and not b.account(bob).closed
        with pytest.raises(bank.AccountClosed):
            b.deposit(alice, 1)
        assert b.balance(bob) == 50
    # Below the head, 0006 refuses first (format-3 rows); 0005's own refusal of a
    # ledger with closes is what a downgrade from 0005 meets.
    with pytest.raises(SchemaDowngradeRefused, match="hash format 3"):
        _migrate(ledger_db, "downgrade", "0004")


def test_a_ledger_at_0005_with_a_close_refuses_to_go_back_to_0004(ledger_db: LedgerDb) -> None:
    """0005's own refusal, which a downgrade from the head never reaches (0006 refuses
    first): a ledger made at 0005 whose events close an account cannot become 0004's."""
    _migrate(ledger_db, "upgrade", "0005")
    ledger_db.execute(
        "INSERT INTO accounts VALUES (1, 'alice', 0, 0)",
        "INSERT INTO account_events VALUES (90, 1, 'open', 'alice', 0, 0, 1, 'h90')",
        "INSERT INTO account_events VALUES (91, 1, 'close', 'alice', 0, 0, 2, 'h91')",
    )
    events = ledger_db.query("SELECT * FROM account_events ORDER BY seq")
    # A reader of this older ledger (no holds before 0006) shows the close and nothing held.
    with LedgerReader(ledger_db.db) as reader:
        summaries = {a.name: a for a in reader.account_summaries()}
    assert summaries["alice"] == AccountSummary(1, "alice", 0, 0, 0, 0, True)
    assert summaries["@cash"].available is None and not summaries["@cash"].closed
    with pytest.raises(SchemaDowngradeRefused, match="1 account_events rows close an account"):
        _migrate(ledger_db, "downgrade", "0004")
    # Refused as a whole: still 0005, every row as it was.
    assert ledger_db.query("SELECT version_num FROM alembic_version") == [("0005",)]
    assert ledger_db.query("SELECT * FROM account_events ORDER BY seq") == events
    ledger_db.execute("DELETE FROM account_events WHERE kind = 'close'")
    _migrate(ledger_db, "downgrade", "0004")  # nothing 0004 cannot record: allowed
    assert ledger_db.query("SELECT version_num FROM alembic_version") == [("0004",)]
    assert ledger_db.query("SELECT * FROM account_events ORDER BY seq") == events[:-1]


def _closed_ledger(tmp_path: Path) -> tuple[Path, int, int]:
    path = tmp_path / "ledger.db"
    with bank.Bank.open(path) as b:
        alice, bob = b.open_account("alice").id, b.open_account("bob").id
        b.deposit(alice, 10)
        b.transfer(alice, bob, 10)
        b.close_account(alice)
        b.deposit(bob, 3)
    return path, alice, bob


@pytest.mark.parametrize("processes", [1, 2])
def test_the_audit_finds_a_row_after_a_close_and_a_close_not_empty(
    tmp_path: Path, processes: int
) -> None:
    """Forged by a forger who rehashes both chains and fixes every balance: only the replay
    of the close can tell."""
    from bank.ledger.audit import audit

    path, alice, _ = _closed_ledger(tmp_path)
    assert audit(path, processes=processes, parallel_rows_min=1).ok
    after = tmp_path / "after.db"
    after.write_bytes(path.read_bytes())
    with edit(after) as conn:  # the last deposit goes to alice instead, after her close
        conn.execute("UPDATE transfers SET credit_account_id = ? WHERE seq = 3", (alice,))
        _fix_balances(conn)
    report = audit(after, processes=processes, parallel_rows_min=1)
    assert [(p.kind, p.seq, p.account) for p in report.problems] == [("closed_account", 3, alice)]
    early = tmp_path / "early.db"
    early.write_bytes(path.read_bytes())
    with edit(early) as conn:  # the close moved before the transfer that emptied her
        conn.execute("UPDATE account_events SET transfer_seq = 1 WHERE kind = 'close'")
        _fix_balances(conn)
    report = audit(early, processes=processes, parallel_rows_min=1)
    kinds = [(p.kind, p.seq, p.account) for p in report.problems]
    assert kinds[0] == ("close_not_empty", 1, alice), kinds
    assert ("closed_account", 2, alice) in kinds


def _fix_balances(conn: sqlite3.Connection) -> None:
    recompute_running(conn)
    conn.execute(
        "UPDATE accounts SET balance = "
        "COALESCE((SELECT SUM(amount) FROM transfers WHERE credit_account_id = accounts.id), 0) - "
        "COALESCE((SELECT SUM(amount) FROM transfers WHERE debit_account_id = accounts.id), 0)"
    )
    rechain(conn)


def test_a_close_racing_transfers_never_leaves_money_in_a_closed_account(
    ledger_db: LedgerDb,
) -> None:
    """Many threads move money in and out of hot accounts while others try to close them
    the moment they are empty: every close that succeeds finds the account empty, nothing
    reaches it afterwards, and the ledger audits clean."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        with lockcheck.enabled(), bank.Bank.open(ledger_db.db, workers=4) as b:
            hot = [b.open_account(f"hot{i}").id for i in range(4)]
            sink = b.open_account("sink").id
            stop = threading.Event()
            errors: list[BaseException] = []
            closes: list[int] = []  # every close that succeeded (under `done`)
            done = threading.Lock()

            def mover(seed: int) -> None:
                rng = random.Random(seed)
                try:
                    while not stop.is_set():
                        account = rng.choice(hot)
                        try:
                            b.deposit(account, 2)
                            b.transfer(account, sink, 2)
                        except (bank.AccountClosed, bank.InsufficientFunds):
                            pass
                except BaseException as exc:  # reported by the main thread
                    errors.append(exc)

            def closer() -> None:
                try:
                    while not stop.is_set():
                        with done:
                            left = [a for a in hot if a not in closes]
                        if not left:
                            return
                        for account in left:
                            try:
                                b.close_account(account)
                            except (bank.AccountNotEmpty, bank.AccountClosed):
                                continue  # not empty now, or the other closer was first
                            with done:
                                closes.append(account)
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=mover, args=(i,), daemon=True) for i in range(12)]
            threads += [threading.Thread(target=closer, daemon=True) for _ in range(2)]
            for t in threads:
                t.start()
            watchdog = threading.Timer(20.0, stop.set)  # never a hang: at most 20 s
            watchdog.start()
            for t in threads[-2:]:
                t.join(25)
            stop.set()
            watchdog.cancel()
            for t in threads:
                t.join(10)
                assert not t.is_alive(), "watchdog: a thread hung"
            assert not errors, errors
            assert sorted(closes) == sorted(hot), "every hot account closed, exactly once"
            for account in hot:
                assert b.account(account).closed and b.balance(account) == 0
            report = b.audit()
            assert report.ok, report.problems[:3]
        rows = ledger_db.query(
            "SELECT e.account_id, e.transfer_seq FROM account_events AS e WHERE e.kind = 'close'"
        )
        for account, transfer_seq in rows:
            later = ledger_db.query(
                f"SELECT count(*) FROM transfers WHERE seq > {transfer_seq} AND "
                f"(debit_account_id = {account} OR credit_account_id = {account})"
            )
            assert later == [(0,)]
    finally:
        sys.setswitchinterval(old)
