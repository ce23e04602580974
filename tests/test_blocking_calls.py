"""A blocking call without a key is applied on the caller's own thread (`Bank._call`).

What that must not change: a full queue still holds it back (and `timeout=` ends
the wait with `QueueFull`); a keyed call still goes through a worker (its key is
claimed and looked up there); a call racing `close()` is either answered from the
ledger or refused with nothing changed; and whatever interleaving, every receipt
is in the ledger and the ledger's balances are the bank's.
"""

from __future__ import annotations

import contextlib
import functools
import random
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

import bank
from bank.ledger.audit import audit_ledger
from tests.conftest import LedgerDb, run_threads, wait_until

T = TypeVar("T")


def _inside(thread: threading.Thread, function: str) -> bool:
    """True while `thread` runs `function` (somewhere on its stack)."""
    frame = sys._current_frames().get(thread.ident or -1)
    while frame is not None:
        if frame.f_code.co_name == function:
            return True
        frame = frame.f_back
    return False


def _off_main(call: Callable[[], T], timeout_s: float = 10.0) -> T:
    """`call()` on a thread other than the main one (where the bank applies a keyless
    call itself); its result, or what it raised. A watchdog failure instead of a hang."""
    outcome: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=run, name="test-caller", daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), f"watchdog: the call did not end within {timeout_s} s"
    if error:
        raise error[0]
    return outcome[0]


@contextlib.contextmanager
def _lock_held(
    b: bank.Bank, account: int, *, hold_s: float = 30.0, released: threading.Event | None = None
) -> Iterator[None]:
    """Inside, `account`'s lock is held by a thread of the test's (so that the caller's
    own calls hold no lock), until the block ends or `hold_s` passes; `released` is set
    just before the lock is let go."""
    taken, release = threading.Event(), threading.Event()

    def hold() -> None:
        with b.account(account).lock:
            taken.set()
            release.wait(hold_s)
            if released is not None:
                released.set()

    holder = threading.Thread(target=hold, name="test-lock-holder", daemon=True)
    holder.start()
    assert taken.wait(10)
    try:
        yield
    finally:
        release.set()
        holder.join(10)


@contextlib.contextmanager
def _stuck_worker(
    b: bank.Bank,
    account: int,
    peer: int,
    *,
    hold_s: float = 30.0,
    released: threading.Event | None = None,
) -> Iterator[None]:
    """Inside, the bank's only worker is blocked on `account`'s lock (held by a thread of
    the test's, so that the caller's own calls hold no lock) and the queue is empty.

    Its job is a transfer of 1 from `peer` to `account`, whose id is the lower: the
    worker waits on its first lock and holds none (a deposit would hold `@cash`'s)."""
    assert account < peer
    with _lock_held(b, account, hold_s=hold_s, released=released):
        b.submit(bank.Transfer(source=peer, target=account, amount=1))
        wait_until(lambda: b.stats().queue_depth == 0, "the worker to take the transfer")
        yield


@pytest.mark.timeout(60)
def test_a_keyless_call_needs_no_worker_and_a_keyed_one_waits_for_it(
    make_ledger_bank: Callable[..., bank.Bank],
) -> None:
    """With the only worker stuck, `transfer()` between two other accounts is answered
    (it ran on this thread); the same call with a key is answered only once the worker
    is free (its key is claimed and looked up there). Before, both waited."""
    b = make_ledger_bank(workers=1)
    stuck, peer, a, c = (b.open_account(name).id for name in ("stuck", "peer", "a", "c"))
    b.deposit(peer, 10)
    b.deposit(a, 100)
    keyed_done = threading.Event()
    with _stuck_worker(b, stuck, peer):
        receipt = _off_main(lambda: b.transfer(a, c, 30))
        assert (receipt.kind, receipt.debit_account, receipt.credit_account) == ("transfer", a, c)
        assert _off_main(lambda: b.withdraw(c, 5)).amount == 5

        def keyed() -> None:
            b.transfer(a, c, 1, key="k-1")
            keyed_done.set()

        threading.Thread(target=keyed, daemon=True).start()
        assert not keyed_done.wait(0.2), "a keyed call was applied without the worker"
    assert keyed_done.wait(10)
    assert b.find("k-1") is not None
    assert [b.balance(x) for x in (a, c, stuck, peer)] == [69, 26, 1, 9]


@pytest.mark.timeout(60)
def test_a_full_queue_holds_a_keyless_call_back_and_its_timeout_changes_nothing(
    make_ledger_bank: Callable[..., bank.Bank],
) -> None:
    """Back-pressure as before: the call does not jump a full queue. Its `timeout=`
    raises `QueueFull` and nothing moves; without one it waits, and goes in once the
    queue drains."""
    b = make_ledger_bank(workers=1, queue_capacity=2)
    stuck, peer, a, c = (b.open_account(name).id for name in ("stuck", "peer", "a", "c"))
    b.deposit(peer, 10)
    b.deposit(a, 100)
    went_in = threading.Event()
    with _stuck_worker(b, stuck, peer):
        queued = [b.submit(bank.Deposit(account=stuck, amount=1)) for _ in range(2)]
        assert b.stats().queue_depth == 2
        with pytest.raises(bank.QueueFull, match="stayed full"):
            _off_main(lambda: b.transfer(a, c, 10, timeout=0.05))
        with pytest.raises(bank.QueueFull):
            _off_main(lambda: b.deposit(c, 10, timeout=0))

        def transfer() -> None:
            b.transfer(a, c, 10)
            went_in.set()

        threading.Thread(target=transfer, daemon=True).start()
        assert not went_in.wait(0.2), "a keyless call went past a full queue"
        assert (b.balance(a), b.balance(c)) == (100, 0)  # the refused calls moved nothing
    assert went_in.wait(10)
    assert all(f.result(timeout=10).kind == "deposit" for f in queued)
    assert [b.balance(x) for x in (a, c, stuck, peer)] == [90, 10, 3, 9]


@pytest.mark.timeout(60)
def test_close_waits_for_a_call_still_applying_on_its_own_thread(
    make_ledger_bank: Callable[..., bank.Bank], ledger_db: LedgerDb
) -> None:
    """A call counted in before `close()` but still inside `apply_move` (here: waiting
    for an account's lock) while the queue drains and the workers exit. The writer must
    not stop before it stages: counted as a stager, the call gets its receipt, `close()`
    returns after it, and the row is in the ledger. (Not counted, the row would be
    staged into a writer that had ended: a call that never returns.)"""
    b = make_ledger_bank(workers=2)
    a, c = b.open_account("a").id, b.open_account("c").id
    b.deposit(a, 100)
    answers: list[bank.Receipt] = []
    closer = threading.Thread(target=b.close, name="test-closer", daemon=True)
    with _lock_held(b, a):
        caller = threading.Thread(
            target=lambda: answers.append(b.transfer(a, c, 10)), name="test-caller", daemon=True
        )
        caller.start()
        wait_until(lambda: _inside(caller, "apply_move"), "the call to wait for the lock")
        closer.start()
        wait_until(lambda: not any(w.is_alive() for w in b._workers), "the workers to exit")
        assert closer.is_alive() and caller.is_alive()  # both wait for the call to stage
    caller.join(10)
    closer.join(10)
    assert not caller.is_alive(), "watchdog: the call was never answered"
    assert not closer.is_alive(), "watchdog: close() never returned"
    assert [r.amount for r in answers] == [10]
    assert ledger_db.query(f"SELECT amount FROM transfers WHERE seq = {answers[0].seq}") == [(10,)]
    with bank.Bank.open(ledger_db.db) as reopened:
        assert (reopened.balance(a), reopened.balance(c)) == (90, 10)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("round_", range(3))
def test_calls_racing_close_are_answered_from_the_ledger_or_refused(
    ledger_db: LedgerDb, round_: int
) -> None:
    """Sixteen threads in blocking calls on four hot accounts (half of them keyed, so
    through a worker) while another thread closes the bank. Every call ends: a receipt
    that the reopened ledger holds row for row, `BankClosed`, or a refusal. Nothing
    half-applied: the ledger's balances are the ones the receipts add up to, and the
    audit is clean. A caller still applying when `close()` began is counted as a
    stager, so the writer does not stop before its row is staged."""
    b = bank.Bank.open(ledger_db.db, workers=2)
    hot = [b.open_account(f"hot-{i}", overdraft_limit=200).id for i in range(4)]
    for account in hot:
        b.deposit(account, 1_000)
    expected = dict.fromkeys(hot, 1000)
    receipts: list[bank.Receipt] = []
    closed: list[int] = []
    lock = threading.Lock()
    started = threading.Barrier(17)

    def teller(i: int) -> None:
        rng = random.Random(round_ * 100 + i)
        started.wait()
        for n in range(400):
            source, target = rng.sample(hot, 2)
            key = f"t{i}-{n}" if i % 2 else None
            try:
                receipt = b.transfer(source, target, rng.randint(1, 300), key=key)
            except bank.BankClosed:
                with lock:
                    closed.append(i)
                return
            except bank.InsufficientFunds:
                continue
            with lock:
                receipts.append(receipt)

    def closer() -> None:
        started.wait()
        wait_until(lambda: len(receipts) >= 200 + 150 * round_, "some calls to land")
        b.close()

    run_threads([*(functools.partial(teller, i) for i in range(16)), closer], timeout_s=90)
    assert closed, "the close came after every call: the race was not run"
    for receipt in receipts:
        expected[receipt.debit_account] -= receipt.amount
        expected[receipt.credit_account] += receipt.amount
    rows = {
        seq: (kind, debit, credit, amount, digest)
        for seq, kind, debit, credit, amount, digest in ledger_db.query(
            "SELECT seq, kind, debit_account_id, credit_account_id, amount, hash FROM transfers"
        )
    }
    assert len(rows) == len(receipts) + len(hot)  # the deposits, then nothing unanswered
    for r in receipts:
        assert rows[r.seq] == (r.kind, r.debit_account, r.credit_account, r.amount, r.hash)
    with bank.Bank.open(ledger_db.db) as reopened:
        assert {a: reopened.balance(a) for a in hot} == expected
    report = audit_ledger(ledger_db.db)
    assert report.ok, report.problems[:5]


@pytest.mark.timeout(120)
def test_keyless_and_keyed_calls_in_cycles_keep_every_balance_exact(
    make_ledger_bank: Callable[..., bank.Bank], ledger_db: LedgerDb
) -> None:
    """Transfers around rings of hot accounts in both directions, from 12 threads, some
    applied on the callers' threads and some on the workers' (keyed), with the
    lock-order checker on: no deadlock, no limit broken, and the ledger's balances are
    exactly what the receipts say."""
    b = make_ledger_bank(workers=2)
    ring = [b.open_account(f"r{i}", overdraft_limit=50 * (i % 3)).id for i in range(5)]
    for account in ring:
        b.deposit(account, 500)
    receipts: list[bank.Receipt] = []
    lock = threading.Lock()

    def teller(i: int) -> None:
        rng = random.Random(i)
        step = 1 if i % 2 else -1
        for n in range(300):
            at = rng.randrange(len(ring))
            source, target = ring[at], ring[(at + step) % len(ring)]
            key = f"c{i}-{n}" if n % 4 == 0 else None
            try:
                receipt = b.transfer(source, target, rng.randint(1, 400), key=key)
            except bank.InsufficientFunds:
                continue
            with lock:
                receipts.append(receipt)

    run_threads([functools.partial(teller, i) for i in range(12)], timeout_s=90)
    expected = dict.fromkeys(ring, 500)
    for receipt in receipts:
        expected[receipt.debit_account] -= receipt.amount
        expected[receipt.credit_account] += receipt.amount
    assert {a: b.balance(a) for a in ring} == expected
    assert all(b.balance(a) >= -b.account(a).overdraft_limit for a in ring)
    stored = dict(ledger_db.query("SELECT id, balance FROM accounts"))
    assert {a: stored[a] for a in ring} == expected
    assert b.audit().ok


def test_a_call_on_a_broken_ledger_is_refused_and_moves_nothing(
    make_ledger_bank: Callable[..., bank.Bank],
) -> None:
    """Once the writer has failed, a keyless call raises `LedgerUnavailable` before it
    touches an account (the caller's thread checks, as `submit` does)."""
    b = make_ledger_bank()
    a, c = b.open_account("a"), b.open_account("c")
    b.deposit(a.id, 100)
    b._writer.lose("the test took the lease away")  # what a lost lease or failed commit does
    wait_until(b._writer.broken.is_set, "the writer to break")
    with pytest.raises(bank.LedgerUnavailable, match="lost its hold"):
        _off_main(lambda: b.transfer(a.id, c.id, 10))
    with pytest.raises(bank.LedgerUnavailable):
        _off_main(lambda: b.deposit(c.id, 10))
    assert (a.balance, c.balance) == (100, 0)


@pytest.mark.timeout(60)
def test_on_the_main_thread_a_keyless_call_is_queued_for_a_worker(
    make_ledger_bank: Callable[..., bank.Bank],
) -> None:
    """Signal handlers run on the main thread, so a Ctrl-C there must never land between
    a move and its staged row: the main thread's keyless call goes through a worker (with
    the only worker stuck, it is answered only after the worker is let go)."""
    b = make_ledger_bank(workers=1)
    stuck, peer, a, c = (b.open_account(name).id for name in ("stuck", "peer", "a", "c"))
    b.deposit(peer, 10)
    b.deposit(a, 100)
    released = threading.Event()
    with _stuck_worker(b, stuck, peer, hold_s=0.3, released=released):
        receipt = b.transfer(a, c, 30)
        assert released.is_set(), "the main thread's call was applied without the worker"
    assert receipt.amount == 30
    assert [b.balance(x) for x in (a, c, stuck, peer)] == [70, 30, 1, 9]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("gathers", [True, False], ids=["gathering", "taking-turns"])
def test_blocking_callers_end_exact_whether_the_writer_gathers_or_not(
    make_ledger_bank: Callable[..., bank.Bank],
    ledger_db: LedgerDb,
    monkeypatch: pytest.MonkeyPatch,
    gathers: bool,
) -> None:
    """Each backend's speed picks one mode (`GATHER_WRITE_S_MIN`: SQLite here takes turns,
    PostgreSQL gathers), so without forcing it a backend's tests run one of them only.
    Forced either way, 8 blocking callers (a quarter keyed) all end, the writer took
    the chosen path, and the ledger is exactly what the receipts say."""
    from bank.ledger import pipeline

    monkeypatch.setattr(pipeline, "GATHER_WRITE_S_MIN", 0.0 if gathers else float("inf"))
    gathered: list[int] = []
    real_gather = pipeline.Pipeline._gather

    def counted(self: pipeline.Pipeline, answered: int) -> None:
        gathered.append(answered)
        real_gather(self, answered)

    monkeypatch.setattr(pipeline.Pipeline, "_gather", counted)
    b = make_ledger_bank(workers=2)
    ids = [b.open_account(f"g{i}", overdraft_limit=100).id for i in range(6)]
    for account in ids:
        b.deposit(account, 1_000)
    receipts: list[bank.Receipt] = []
    lock = threading.Lock()

    def teller(i: int) -> None:
        rng = random.Random(i)
        for n in range(150):
            source, target = rng.sample(ids, 2)
            key = f"g{i}-{n}" if n % 4 == 0 else None
            try:
                receipt = b.transfer(source, target, rng.randint(1, 500), key=key)
            except bank.InsufficientFunds:
                continue
            with lock:
                receipts.append(receipt)

    run_threads([functools.partial(teller, i) for i in range(8)], timeout_s=90)
    assert bool(gathered) == gathers, f"gathered {len(gathered)} times"
    expected = dict.fromkeys(ids, 1_000)
    for receipt in receipts:
        expected[receipt.debit_account] -= receipt.amount
        expected[receipt.credit_account] += receipt.amount
    stored = dict(ledger_db.query("SELECT id, balance FROM accounts"))
    assert {a: stored[a] for a in ids} == expected == {a: b.balance(a) for a in ids}
    assert b.audit().ok
