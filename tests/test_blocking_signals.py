"""Signals and forks beside blocking calls (`Bank._call` applies a keyless call on the
caller's thread, never on the main one).

Not lock-checked, unlike `test_blocking_calls`: the checker's lock wrapper is Python
code, which a signal handler's `KeyboardInterrupt` can split between taking a lock and
recording it; the engine's own locks are C locks, whose `with` a signal cannot split.
"""

from __future__ import annotations

import random
import signal
import threading
import time
import types
from collections.abc import Callable
from pathlib import Path

import pytest

import bank
from bank.ledger.audit import audit_ledger
from tests.conftest import LedgerDb
from tests.test_attacks import _in_fork_child
from tests.test_blocking_calls import _off_main


@pytest.mark.timeout(60)
def test_ctrl_c_on_the_main_thread_never_splits_a_move_from_its_row(
    make_ledger_bank: Callable[..., bank.Bank], ledger_db: LedgerDb, fast_switching: None
) -> None:
    """A real SIGINT, every 0.1-2 ms for 3 s (threads switching as often as they can), raises `KeyboardInterrupt` in the main
    thread whenever it is inside a bank call (a REPL or a retrying script carries on),
    while three other threads make blocking calls too. Afterwards the balances in memory
    are the ledger's, the seqs have no gap, `close()` returns and the audit is clean.
    With the main thread applying its own calls, this left balances without rows."""
    b = make_ledger_bank(workers=2)
    ids = [b.open_account(f"a{i}", overdraft_limit=10**9).id for i in range(3)]
    bank_dir = str(Path(bank.__file__).parent)
    stop = threading.Event()

    def on_sigint(signum: int, frame: types.FrameType | None) -> None:
        while frame is not None:  # only inside the bank: the test's own lines stay whole
            if frame.f_code.co_filename.startswith(bank_dir):
                raise KeyboardInterrupt
            frame = frame.f_back

    def pest() -> None:
        rng = random.Random(1)
        while not stop.is_set():
            time.sleep(rng.uniform(0.0001, 0.002))
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

    def other(i: int) -> None:
        rng = random.Random(10 + i)
        while not stop.is_set():
            source, target = rng.sample(ids, 2)
            b.transfer(source, target, rng.randint(1, 100))

    previous = signal.signal(signal.SIGINT, on_sigint)
    threads = [threading.Thread(target=pest, daemon=True)]
    threads += [threading.Thread(target=other, args=(i,), daemon=True) for i in range(3)]
    interrupted = 0
    try:
        for thread in threads:
            thread.start()
        rng = random.Random(2)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                source, target = rng.sample(ids, 2)
                b.transfer(source, target, rng.randint(1, 100))
            except KeyboardInterrupt:
                interrupted += 1
    finally:
        stop.set()
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a signal still in flight
        for thread in threads:
            thread.join(10)
        signal.signal(signal.SIGINT, previous)
    assert interrupted > 0, "no signal landed inside a bank call: the attack did not run"
    assert not any(t.is_alive() for t in threads)
    in_memory = {i: b.account(i).balance for i in ids}
    closer = threading.Thread(target=b.close, daemon=True)
    closer.start()
    closer.join(15)
    assert not closer.is_alive(), "watchdog: close() did not return"
    seqs = [seq for (seq,) in ledger_db.query("SELECT seq FROM transfers ORDER BY seq")]
    assert seqs == list(range(1, len(seqs) + 1))
    stored = dict(ledger_db.query("SELECT id, balance FROM accounts"))
    assert {i: stored[i] for i in ids} == in_memory
    report = audit_ledger(ledger_db.db)
    assert report.ok, report.problems[:5]


@pytest.mark.timeout(60)
def test_a_forked_child_refuses_even_with_the_queue_locked_at_the_fork(tmp_path: Path) -> None:
    """A parent thread holds the queue's mutex across `fork()`: in the child nobody will
    ever free it. The child's blocking call (off its main thread, where it would apply
    the command itself) must raise `BankClosed` without touching that mutex, not hang."""
    with bank.Bank.open(tmp_path / "l.db") as b:
        account = b.open_account("a").id
        taken, release = threading.Event(), threading.Event()

        def hold() -> None:
            with b._buffer._mutex:
                taken.set()
                release.wait(10)

        threading.Thread(target=hold, daemon=True).start()
        assert taken.wait(10)

        def child() -> str:
            try:
                _off_main(lambda: b.deposit(account, 1), timeout_s=3)
            except bank.BankClosed as exc:
                return f"BankClosed: {exc}"
            except BaseException as exc:
                return f"{type(exc).__name__}: {exc}"
            return "deposited"

        try:
            answer = _in_fork_child(child, timeout_s=20)
        finally:
            release.set()
        assert answer.startswith("BankClosed: this bank belongs to the process"), answer
        assert b.deposit(account, 1).seq == 1  # the parent's bank is untouched
