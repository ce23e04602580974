"""An operation is acknowledged only after its commit (a held write lock delays every answer, a failed commit answers with an error), and the ledger runs with WAL, foreign keys and the promised `synchronous` level."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import bank

HOLD_S = 0.6  # well under the writer's 5 s busy timeout


@contextmanager
def write_lock(path: Path) -> Iterator[sqlite3.Connection]:
    """Hold SQLite's write lock on `path` from a separate connection until the block ends."""
    con = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        con.execute("BEGIN IMMEDIATE")
        try:
            yield con
        finally:
            con.execute("ROLLBACK")
    finally:
        con.close()


def committed_seqs(path: Path) -> list[int]:
    con = sqlite3.connect(path)
    try:
        return [r[0] for r in con.execute("SELECT seq FROM transfers ORDER BY seq")]
    finally:
        con.close()


def pragma(b: bank.Bank, name: str) -> object:
    with b._engine.connect() as conn:  # type: ignore[union-attr]
        return conn.exec_driver_sql(f"PRAGMA {name}").scalar()


@pytest.mark.timeout(60)
def test_no_answer_before_commit(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with bank.Bank.open(path, workers=1) as b:  # one worker: jobs are judged in FIFO order
        alice = b.open_account("alice").id
        shop = b.open_account("shop").id
        b.snapshot()  # returns once everything before it is committed: the writer is idle
        with write_lock(path):
            deposit = b.submit(bank.Deposit(account=alice, amount=100, key="d"))
            spend = b.submit(bank.Transfer(source=alice, target=shop, amount=60, key="t"))
            # Judged against the uncommitted deposit and transfer: its refusal waits too.
            refused = b.submit(bank.Withdrawal(account=alice, amount=41, key="w"))
            deadline = time.monotonic() + 10
            while b.stats().seq < 2:  # both applied in memory, not yet committed
                assert time.monotonic() < deadline, "the workers never applied the operations"
                time.sleep(0.001)
            balance: list[int] = []
            reader = threading.Thread(target=lambda: balance.append(b.balance(alice)))
            reader.start()
            time.sleep(HOLD_S)
            assert not deposit.done(), "a deposit was answered while its commit was blocked"
            assert not spend.done()
            assert not refused.done(), "a refusal was answered before what it was judged on"
            assert reader.is_alive(), "balance() returned a value that was not yet durable"
            assert committed_seqs(path) == []
        assert deposit.result(timeout=10).seq == 1
        assert spend.result(timeout=10).seq == 2
        with pytest.raises(bank.InsufficientFunds):
            refused.result(timeout=10)
        reader.join(10)
        assert balance == [40]
        assert committed_seqs(path) == [1, 2]
        assert b.find("w") is None
    with bank.Bank.open(path) as b:
        assert b.balance(alice) == 40 and b.balance(shop) == 60
        assert b.find("d") == deposit.result()


@pytest.mark.timeout(60)
def test_account_opening_is_answered_only_after_commit(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with bank.Bank.open(path) as b:
        opened: list[bank.Account] = []
        with write_lock(path):
            opener = threading.Thread(target=lambda: opened.append(b.open_account("late")))
            opener.start()
            opener.join(HOLD_S)
            assert opener.is_alive(), "open_account returned before its row was committed"
        opener.join(10)
        assert [a.name for a in opened] == ["late"]


@pytest.mark.timeout(60)
def test_a_failed_commit_is_never_acknowledged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hold the lock past the writer's busy timeout: the answer is an error, not a receipt."""
    monkeypatch.setattr("bank.ledger.sqlite.engine.BUSY_TIMEOUT_MS", 200)  # instead of 5 s
    path = tmp_path / "ledger.db"
    b = bank.Bank.open(path, workers=1)
    try:
        alice = b.open_account("alice").id
        b.deposit(alice, 500, key="before")
        assert pragma(b, "busy_timeout") == 200
        with write_lock(path):
            future = b.submit(bank.Deposit(account=alice, amount=7, key="lost"))
            with pytest.raises(bank.LedgerUnavailable):
                future.result(timeout=30)
        assert committed_seqs(path) == [1]
        with pytest.raises(bank.LedgerUnavailable):
            b.deposit(alice, 1)
    finally:
        b.close()
    with bank.Bank.open(path) as b:
        assert b.balance(alice) == 500
        assert b.find("lost") is None
        assert b.deposit(alice, 7, key="lost").seq == 2


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("durability", "synchronous"), [(None, 2), ("full", 2), ("normal", 1)])
def test_pragmas(tmp_path: Path, durability: str | None, synchronous: int) -> None:
    path = tmp_path / "ledger.db"
    kwargs = {} if durability is None else {"durability": durability}
    with bank.Bank.open(path, **kwargs) as b:  # type: ignore[arg-type]
        assert pragma(b, "journal_mode") == "wal"
        assert pragma(b, "synchronous") == synchronous
        assert pragma(b, "foreign_keys") == 1
        assert pragma(b, "busy_timeout") == 5000
        # The writer's own connection (same engine, same connect hook) committed this:
        b.deposit(b.open_account("alice").id, 1)
    con = sqlite3.connect(path)
    try:
        # journal_mode=WAL is a property of the file: it persists after close.
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        con.close()


def test_unknown_durability_is_refused(tmp_path: Path) -> None:
    with pytest.raises(bank.InvalidCommand, match="durability"):
        bank.Bank.open(tmp_path / "ledger.db", durability="off")


# -- refusals judged on state that is not yet durable wait for it -----------------------


@pytest.mark.timeout(60)
def test_name_taken_waits_for_the_opening_it_collides_with(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with bank.Bank.open(path) as b:
        b.snapshot()
        refused = threading.Event()

        def open_again() -> None:
            try:
                b.open_account("bob")
            except bank.AccountNameTaken:
                refused.set()

        with write_lock(path):
            first = threading.Thread(target=lambda: b.open_account("bob"))
            first.start()
            deadline = time.monotonic() + 10
            while "bob" not in [a.name for a in b.accounts()]:  # staged, not committed
                assert time.monotonic() < deadline
                time.sleep(0.001)
            second = threading.Thread(target=open_again)
            second.start()
            second.join(HOLD_S)
            # Were the process killed now, "bob" would not exist, yet the caller was
            # told the name is taken.
            assert not refused.is_set(), "AccountNameTaken answered before 'bob' was committed"
        first.join(10)
        second.join(10)
        assert refused.is_set()


@pytest.mark.timeout(60)
def test_limit_refusal_waits_for_the_balance_it_was_judged_on(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with bank.Bank.open(path, workers=1) as b:
        alice = b.open_account("alice", overdraft_limit=100).id
        b.snapshot()
        refused = threading.Event()

        def lower_limit() -> None:
            try:
                b.set_overdraft_limit(alice, 50)
            except bank.InsufficientFunds:
                refused.set()

        with write_lock(path):
            withdrawal = b.submit(bank.Withdrawal(account=alice, amount=80))
            deadline = time.monotonic() + 10
            while b.stats().seq < 1:  # applied in memory (balance -80), not committed
                assert time.monotonic() < deadline
                time.sleep(0.001)
            setter = threading.Thread(target=lower_limit)
            setter.start()
            setter.join(HOLD_S)
            # Were the process killed now, alice would be back at 0 with limit 100, and a
            # limit of 50 would have been fine: the refusal depended on uncommitted state.
            assert not refused.is_set(), "refusal answered before the withdrawal was committed"
        assert withdrawal.result(timeout=10).seq == 1
        setter.join(10)
        assert refused.is_set()
