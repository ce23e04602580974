"""Opening, refusing what is not a ledger, back-pressure, and a close that leaves nothing behind."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import bank
from bank.ledger import store
from bank.limits import BALANCE_MAX
from tests.conftest import LedgerDb, bank_threads, run_threads, working_threads


def _fingerprint(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


def test_new_ledger_has_cash_and_reopens_with_balances_and_limits(ledger_db: LedgerDb) -> None:
    with bank.Bank.open(ledger_db.db) as b:
        assert b.account(bank.CASH_ACCOUNT_ID).name == "@cash"
        alice = b.open_account("alice", overdraft_limit=10)
        shop = b.open_account("shop")
        b.deposit(alice.id, 100)
        b.transfer(alice.id, shop.id, 105)
        b.set_overdraft_limit(shop.id, 40)
        assert alice.balance == -5
    with bank.Bank.open(ledger_db.db) as b:
        assert [(a.id, a.name, a.balance, a.overdraft_limit) for a in b.accounts()] == [
            (1, "alice", -5, 10),
            (2, "shop", 105, 40),
        ]
        assert b.snapshot().total == 0
        assert b.snapshot().seq == 2
        assert b.open_account("carol").id == 3
        assert b.transfer(1, 3, 5).seq == 3


def test_close_joins_every_thread_and_is_idempotent(ledger_db: LedgerDb) -> None:
    before = set(threading.enumerate())
    b = bank.Bank.open(ledger_db.db, workers=6)
    assert len(working_threads()) == 7
    acct = b.open_account("a").id
    futures = b.submit_many([bank.Deposit(account=acct, amount=1) for _ in range(3_000)])
    b.close()
    assert all(f.done() for f in futures)  # no future is left pending
    assert sum(1 for f in futures if f.exception() is None) == 3_000
    assert set(threading.enumerate()) <= before
    assert bank_threads() == []
    b.close()
    b.close()
    assert b.closed


def test_concurrent_closes_all_return_after_shutdown(ledger_db: LedgerDb) -> None:
    b = bank.Bank.open(ledger_db.db)
    threads = [threading.Thread(target=b.close) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
        assert not t.is_alive()
    assert bank_threads() == []


def test_every_call_after_close_raises_bank_closed(ledger_db: LedgerDb) -> None:
    b = bank.Bank.open(ledger_db.db)
    a = b.open_account("a").id
    b.close()
    calls: list[Callable[[], object]] = [
        lambda: b.open_account("z"),
        lambda: b.account(a),
        b.accounts,
        lambda: b.deposit(a, 1),
        lambda: b.withdraw(a, 1),
        lambda: b.transfer(a, a + 1, 1),
        lambda: b.submit(bank.Deposit(account=a, amount=1)),
        lambda: b.submit_many([bank.Deposit(account=a, amount=1)]),
        lambda: b.balance(a),
        lambda: b.find("k"),
        b.snapshot,
        lambda: b.set_overdraft_limit(a, 5),
        lambda: b.history(a),
        b.audit,
    ]
    for call in calls:
        with pytest.raises(bank.BankClosed):
            call()


def test_close_from_a_future_callback_is_refused(
    make_ledger_bank: Callable[..., bank.Bank],
) -> None:
    b = make_ledger_bank()
    a = b.open_account("a").id
    errors: list[BaseException] = []
    ran_on: list[str] = []
    called = threading.Event()

    def callback(_f: object) -> None:
        ran_on.append(threading.current_thread().name)
        try:
            b.close()
        except bank.BankError as exc:
            errors.append(exc)
        called.set()

    # Holding the account's lock keeps the worker from applying the deposit, so the
    # callback is attached before the future can finish (else it would run here).
    with b.account(a).lock:
        fut = b.submit(bank.Deposit(account=a, amount=1))
        fut.add_done_callback(callback)
    fut.result(timeout=10)
    assert called.wait(10)  # callbacks run just after the result is set, not before
    assert ran_on == ["bank-ledger-writer"]  # as the README says: after the commit, on the writer
    assert errors and "own threads" in str(errors[0])


@pytest.mark.timeout(60)
def test_full_queue_blocks_then_raises_queue_full_with_a_timeout(
    make_ledger_bank: Callable[..., bank.Bank],
) -> None:
    b = make_ledger_bank(workers=1, queue_capacity=2)
    a = b.open_account("a").id
    b.deposit(a, 100)
    account = b.account(a)
    account.lock.acquire()  # the only worker will block on this account
    try:
        first = b.submit(bank.Withdrawal(account=a, amount=1))
        deadline = time.monotonic() + 10
        while b.stats().queue_depth != 0:  # the worker took it and is now stuck
            assert time.monotonic() < deadline
            time.sleep(0.001)
        queued = [b.submit(bank.Withdrawal(account=a, amount=1)) for _ in range(2)]
        assert b.stats().queue_depth == 2
        with pytest.raises(bank.QueueFull, match="stayed full"):
            b.submit(bank.Withdrawal(account=a, amount=1), timeout=0.05)
        with pytest.raises(bank.QueueFull):
            b.submit_many([bank.Withdrawal(account=a, amount=1)], timeout=0)
        blocked_done = threading.Event()

        def withdraw_then_signal() -> None:
            b.withdraw(a, 1)
            blocked_done.set()

        threading.Thread(target=withdraw_then_signal, daemon=True).start()
        assert not blocked_done.wait(0.1)  # blocks (back-pressure) rather than failing
    finally:
        account.lock.release()
    assert blocked_done.wait(10)
    assert first.result(timeout=10).kind == "withdrawal"
    assert all(f.result(timeout=10) for f in queued)
    assert b.balance(a) == 96  # the refused submits changed nothing


def test_submit_many_answers_every_future_when_a_later_chunk_times_out(
    make_ledger_bank: Callable[..., bank.Bank],
) -> None:
    b = make_ledger_bank(workers=1, queue_capacity=300)
    a = b.open_account("a").id
    account = b.account(a)
    account.lock.acquire()
    try:
        b.submit(bank.Deposit(account=a, amount=1))
        while b.stats().queue_depth != 0:
            time.sleep(0.001)
        futures = b.submit_many(
            [bank.Deposit(account=a, amount=1) for _ in range(600)], timeout=0.05
        )
    finally:
        account.lock.release()
    outcomes = [type(f.exception(timeout=10)).__name__ for f in futures]
    assert outcomes[:256] == ["NoneType"] * 256
    assert set(outcomes[256:]) == {"QueueFull"}
    assert b.balance(a) == 257


def test_text_file_is_not_a_ledger_and_is_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_text("hello, this is not a database\n" * 10)
    before = _fingerprint(path)
    with pytest.raises(bank.NotALedger, match="not an SQLite database"):
        bank.Bank.open(path)
    assert _fingerprint(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.db"]


def test_another_programs_database_is_refused_and_untouched(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE songs(id INTEGER PRIMARY KEY, title TEXT)")
    con.commit()
    con.close()
    before = _fingerprint(path)
    with pytest.raises(bank.NotALedger, match="another program"):
        bank.Bank.open(path)
    assert _fingerprint(path) == before


def test_newer_schema_revision_is_refused(ledger_path: Path) -> None:
    bank.Bank.open(ledger_path).close()
    con = sqlite3.connect(ledger_path)
    con.execute("UPDATE alembic_version SET version_num = '9999_from_the_future'")
    con.commit()
    con.close()
    before = _fingerprint(ledger_path)
    with pytest.raises(bank.LedgerVersionError, match="newer"):
        bank.Bank.open(ledger_path)
    assert _fingerprint(ledger_path) == before


def test_tampered_balances_are_refused_at_open(ledger_db: LedgerDb) -> None:
    with bank.Bank.open(ledger_db.db) as b:
        b.deposit(b.open_account("a").id, 10)
    ledger_db.execute("UPDATE accounts SET balance = balance + 1 WHERE id = 1")
    with pytest.raises(bank.LedgerCorrupt, match="sum to 1"):
        bank.Bank.open(ledger_db.db)


def test_directory_and_missing_parent(tmp_path: Path) -> None:
    with pytest.raises(bank.NotALedger, match="directory"):
        bank.Bank.open(tmp_path)
    with pytest.raises(bank.NotALedger, match="does not exist"):
        bank.Bank.open(tmp_path / "missing" / "ledger.db")


def test_one_bank_per_ledger(
    make_ledger_bank: Callable[..., bank.Bank], ledger_db: LedgerDb
) -> None:
    make_ledger_bank()
    with pytest.raises(bank.LedgerBusy) as busy:
        bank.Bank.open(ledger_db.db)
    if ledger_db.backend == "sqlite":
        assert "already open" in str(busy.value)


def test_empty_file_becomes_a_new_ledger(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    path.touch()
    with bank.Bank.open(path) as b:
        assert b.accounts() == []


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"workers": 0}, "workers"),
        ({"workers": 2.0}, "workers"),
        ({"queue_capacity": 0}, "queue_capacity"),
        ({"durability": "sometimes"}, "durability"),
    ],
)
def test_bad_open_options(ledger_path: Path, options: dict[str, object], words: str) -> None:
    with pytest.raises(bank.InvalidCommand, match=words):
        bank.Bank.open(ledger_path, **options)  # type: ignore[arg-type]
    assert not ledger_path.exists()


def test_bad_operations_change_nothing(make_ledger_bank: Callable[..., bank.Bank]) -> None:
    b = make_ledger_bank()
    a = b.open_account("a", overdraft_limit=5).id
    b.deposit(a, 10)
    before = b.snapshot()
    with pytest.raises(bank.AccountNotFound, match="999"):
        b.deposit(999, 1)
    with pytest.raises(bank.AccountNotFound, match="999"):
        b.transfer(a, 999, 1)
    with pytest.raises(bank.InsufficientFunds, match="overdraft limit 5"):
        b.withdraw(a, 16)
    with pytest.raises(bank.InvalidCommand):
        b.deposit(a, 1.5)  # type: ignore[arg-type]
    with pytest.raises(bank.InvalidCommand):
        b.submit("deposit 5")  # type: ignore[arg-type]
    with pytest.raises(bank.InvalidCommand, match="item 1"):
        b.submit_many([bank.Deposit(account=a, amount=1), {"account": a}])  # type: ignore[list-item]
    with pytest.raises(bank.AccountNameTaken):
        b.open_account("a")
    with pytest.raises(bank.AccountNotFound):
        b.balance(999)
    with pytest.raises(bank.InvalidCommand):
        b.account(True)
    with pytest.raises(bank.InvalidCommand, match="@cash"):
        b.set_overdraft_limit(0, 5)
    with pytest.raises(bank.InvalidCommand, match="overdraft_limit"):
        b.set_overdraft_limit(a, -1)
    assert b.snapshot() == before
    b.withdraw(a, 14)  # balance -4, within the limit of 5
    with pytest.raises(bank.InsufficientFunds, match="floor"):
        b.set_overdraft_limit(a, 3)
    assert b.account(a).overdraft_limit == 5
    b.withdraw(a, 1)
    assert b.balance(a) == -5
    assert b.snapshot().total == 0
    assert b.stats().accepted == before.seq + 2  # only the two real withdrawals


def test_deposit_that_would_overflow_64_bits_is_refused(
    make_ledger_bank: Callable[..., bank.Bank],
) -> None:
    b = make_ledger_bank()
    rich = b.open_account("rich").id
    amount = bank.AMOUNT_MAX
    count = BALANCE_MAX // amount  # 9,223 deposits of 10**15 reach just below 2**63
    for f in b.submit_many([bank.Deposit(account=rich, amount=amount) for _ in range(count)]):
        f.result(timeout=60)
    before = b.snapshot()
    assert before.balances[rich] == count * amount
    # @cash mirrors the customers: it would leave 64 bits first.
    with pytest.raises(bank.BalanceOverflow, match="would leave signed 64 bits"):
        b.deposit(rich, amount)
    assert b.snapshot() == before


def test_transfer_that_would_overflow_the_target_is_refused(
    make_ledger_bank: Callable[..., bank.Bank],
) -> None:
    b = make_ledger_bank()
    rich = b.open_account("rich").id
    borrower = b.open_account("borrower", overdraft_limit=10 * bank.AMOUNT_MAX).id
    amount = bank.AMOUNT_MAX
    for f in b.submit_many(
        [bank.Deposit(account=rich, amount=amount) for _ in range(BALANCE_MAX // amount - 1)]
    ):
        f.result(timeout=60)
    b.transfer(borrower, rich, amount)
    before = b.snapshot()
    with pytest.raises(
        bank.BalanceOverflow, match=f"account {rich} has .* would leave signed 64 bits"
    ):
        b.transfer(borrower, rich, amount)
    assert b.snapshot() == before
    assert before.total == 0


def _open_descriptors(path: Path) -> list[str]:
    """The files of this process's descriptors that are the ledger or its side files."""
    found = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = str(fd.readlink())
        except OSError:
            continue
        if target.startswith(str(path)):
            found.append(target)
    return found


@pytest.mark.parametrize("where", ["before the read", "inside the read"])
def test_a_read_racing_close_leaves_no_connection_to_the_released_ledger(
    ledger_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """`history`/`find` checked "open" and then connected: a close() in between released
    the ledger and the read opened a new connection that outlived the bank."""
    b = bank.Bank.open(ledger_path)
    alice = b.open_account("alice")
    b.deposit(alice.id, 5)
    paused, resume = threading.Event(), threading.Event()

    def pause() -> None:
        paused.set()
        assert resume.wait(10), "watchdog: never resumed"

    check, real = b.account, store.history_page

    def account_then_pause(account_id: int) -> bank.Account:
        found = check(account_id)
        pause()
        return found

    def pause_then_history(*args: Any, **kwargs: Any) -> Any:
        pause()
        return real(*args, **kwargs)

    if where == "before the read":  # past the "open" check, not yet connected
        monkeypatch.setattr(b, "account", account_then_pause)
    else:  # connected, in the query
        monkeypatch.setattr(store, "history_page", pause_then_history)
    results: list[object] = []

    def read() -> None:
        try:
            results.append(len(b.history(alice.id)))
        except bank.BankError as exc:
            results.append(type(exc))

    def close() -> None:
        assert paused.wait(10)
        closer = threading.Thread(target=b.close, daemon=True)
        closer.start()
        closer.join(0.5)  # a reader inside holds the release (not the closed flag) back
        resume.set()
        closer.join(10)
        assert not closer.is_alive()

    run_threads([read, close], timeout_s=30)
    expected = bank.BankClosed if where == "before the read" else 1
    assert results == [expected]
    assert b.closed
    assert _open_descriptors(ledger_path) == []


@pytest.mark.parametrize("failing", ["bank-ledger-writer", "bank-worker-1"])
def test_a_thread_that_cannot_start_fails_the_open_and_frees_the_ledger(
    ledger_db: LedgerDb, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """`Thread.start` failing (no resources for a new thread) escaped as a raw
    RuntimeError and left the started threads running and the ledger locked for good."""
    real_start = threading.Thread.start

    def start(thread: threading.Thread) -> None:
        if thread.name == failing:
            raise RuntimeError("can't start new thread")
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    outcome: list[BaseException] = []

    def open_bank() -> None:
        try:
            bank.Bank.open(ledger_db.db, workers=2).close()
        except BaseException as exc:
            outcome.append(exc)

    run_threads([open_bank], timeout_s=20)
    monkeypatch.undo()
    assert len(outcome) == 1 and isinstance(outcome[0], bank.LedgerUnavailable), outcome
    assert "could not start" in str(outcome[0])
    assert bank_threads() == []
    with bank.Bank.open(ledger_db.db) as b:  # the lock was released
        assert b.snapshot().total == 0
