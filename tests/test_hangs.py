"""Every wait in the engine ends: by its answer, by close(), or by a bounded deadline."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import pytest

import bank
import bank.worker
from bank import engine as engine_module
from bank.ledger.writer import LedgerWriter
from tests.conftest import LedgerDb, bank_threads, run_threads


def _close_after_check(monkeypatch: pytest.MonkeyPatch, nth: int) -> None:
    """Make the `nth` open-check pass and then close the bank: the race, every time."""
    original = bank.Bank._check_open
    calls = 0

    def check_then_close(self: bank.Bank) -> None:
        nonlocal calls
        original(self)
        calls += 1
        if calls == nth:
            self.close()

    monkeypatch.setattr(bank.Bank, "_check_open", check_then_close)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("call", ["open_account", "set_overdraft_limit", "snapshot", "balance"])
def test_a_call_racing_close_ends(
    ledger_path: Path, monkeypatch: pytest.MonkeyPatch, call: str
) -> None:
    b = bank.Bank.open(ledger_path)
    a = b.open_account("a").id
    # The last check of "open" each call makes before it stages or waits.
    _close_after_check(monkeypatch, 2 if call == "set_overdraft_limit" else 1)
    calls: dict[str, Callable[[], object]] = {
        "open_account": lambda: b.open_account("late"),
        "set_overdraft_limit": lambda: b.set_overdraft_limit(a, 5),
        "snapshot": b.snapshot,
        "balance": lambda: b.balance(a),
    }
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(calls[call]())
        except bank.BankClosed as exc:
            outcome.append(exc)

    run_threads([run], timeout_s=10)
    assert b.closed and bank_threads() == []
    if call in ("open_account", "set_overdraft_limit"):  # staged after the writer stopped
        assert isinstance(outcome[0], bank.BankClosed)
    monkeypatch.undo()
    with bank.Bank.open(ledger_path) as again:  # nothing half-written
        assert [x.name for x in again.accounts()] == ["a"]
        assert again.account(a).overdraft_limit == 0
        assert again.audit().ok


@pytest.mark.timeout(60)
def test_calls_racing_close_for_real_all_end(ledger_db: LedgerDb) -> None:
    for round_ in range(5):
        b = bank.Bank.open(ledger_db.db)
        a = b.account(1).id if round_ else b.open_account("a").id
        stop = threading.Event()

        def hammer(
            i: int,
            b: bank.Bank = b,
            a: int = a,
            stop: threading.Event = stop,
            round_: int = round_,
        ) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                try:
                    if i == 0:
                        b.open_account(f"r{round_}-{n}")
                    elif i == 1:
                        b.set_overdraft_limit(a, n % 7)
                    elif i == 2:
                        b.snapshot()
                    else:
                        b.balance(a)
                except bank.BankClosed:
                    return

        def closer(b: bank.Bank = b, stop: threading.Event = stop) -> None:
            time.sleep(0.02)
            b.close()
            stop.set()

        run_threads([*(lambda i=i: hammer(i) for i in range(4)), closer], timeout_s=20)
    with bank.Bank.open(ledger_db.db) as again:
        assert again.audit().ok


@pytest.mark.timeout(60)
def test_a_key_wait_ends_at_its_deadline_and_on_release(
    make_bank: Callable[..., bank.Bank], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bank.worker, "KEY_WAIT_S_MAX", 0.3)
    monkeypatch.setattr(engine_module, "KEY_WAIT_S_MAX", 0.3)
    b = make_bank(workers=1)
    a = b.open_account("a").id
    stuck: Future[bank.Receipt] = Future()
    assert b._claims.claim("k", stuck) is None  # an operation that is never answered
    results: list[object] = []

    def keyed() -> None:
        started = time.monotonic()
        with pytest.raises(bank.KeyInFlight, match="'k'"):
            b.deposit(a, 5, key="k")
        with pytest.raises(bank.KeyInFlight):
            b.find("k")
        results.append(time.monotonic() - started)

    run_threads([keyed], timeout_s=10)
    assert b.balance(a) == 0  # the refusal changed nothing
    # A release wakes the waiter at once (notified, not polled), long before the deadline.
    monkeypatch.setattr(bank.worker, "KEY_WAIT_S_MAX", 30.0)
    fut = b.submit(bank.Deposit(account=a, amount=7, key="k"))
    time.sleep(0.1)
    assert not fut.done()
    released = time.monotonic()
    b._claims.release("k")
    assert fut.result(timeout=5).amount == 7
    assert time.monotonic() - released < 2
    assert b.find("k") == fut.result()


@pytest.mark.timeout(60)
def test_find_waiting_on_a_key_ends_at_close(
    ledger_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = bank.Bank.open(ledger_path)
    stuck: Future[bank.Receipt] = Future()
    assert b._claims.claim("k", stuck) is None
    outcome: list[BaseException] = []
    waiting = threading.Event()

    def find() -> None:
        waiting.set()
        try:
            b.find("k")
        except bank.BankError as exc:
            outcome.append(exc)

    def close() -> None:
        waiting.wait()
        time.sleep(0.2)
        b.close()

    run_threads([find, close], timeout_s=20)
    assert len(outcome) == 1 and isinstance(outcome[0], bank.BankClosed)


@pytest.mark.timeout(60)
def test_a_writer_that_fails_at_start_fails_open(
    ledger_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_set_up(self: LedgerWriter) -> None:
        raise AttributeError("'NoneType' object has no attribute 'getlimit'")

    monkeypatch.setattr(LedgerWriter, "_open_batch_writer", broken_set_up)
    errors: list[BaseException] = []

    def open_bank() -> None:
        try:
            b = bank.Bank.open(ledger_path)
        except bank.LedgerUnavailable as exc:
            errors.append(exc)
        else:  # the old engine: opened, then every call hung
            b.open_account("a")

    run_threads([open_bank], timeout_s=20)
    assert len(errors) == 1 and "could not start" in str(errors[0])
    assert "getlimit" in str(errors[0])
    assert bank_threads() == []
    monkeypatch.undo()
    with bank.Bank.open(ledger_path) as b:  # the lock was released, the ledger is fine
        b.open_account("a")
        assert b.audit().ok


_FORGETFUL = textwrap.dedent(
    """
    import sys
    import threading
    import time
    import bank

    b = bank.Bank.open(sys.argv[1], workers=2)
    a = b.open_account("a").id
    acked = open(sys.argv[2], "a", buffering=1)

    def note(f):
        if f.exception() is None:
            acked.write(f.result().key + "\\n")

    def late():  # the program's own thread still uses the bank after main has ended
        time.sleep(0.3)
        for i in range(50):
            acked.write(b.deposit(a, 1, key=f"late{i}").key + "\\n")

    threading.Thread(target=late).start()
    for i in range(int(sys.argv[3])):
        f = b.submit(bank.Deposit(account=a, amount=1, key=f"k{i}"))
        f.add_done_callback(note)
    print("submitted", flush=True)
    # falls off the end: no close(), futures still in flight
    """
)


@pytest.mark.timeout(120)
def test_a_forgotten_bank_does_not_hang_exit_and_commits_what_it_accepted(
    tmp_path: Path, ledger_db: LedgerDb
) -> None:
    script = tmp_path / "forgetful.py"
    script.write_text(_FORGETFUL)
    acked_path = tmp_path / "acked.txt"
    ops = 2_000
    try:  # a hung exit never ends: the watchdog, not a time bound a busy machine can miss
        proc = subprocess.run(
            [sys.executable, str(script), str(ledger_db.db), str(acked_path), str(ops)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("watchdog: the interpreter of a forgotten bank did not exit in 60 s (hang)")
    assert proc.returncode == 0, proc.stderr
    assert "submitted" in proc.stdout
    acked = acked_path.read_text().split()
    assert len(acked) == ops + 50  # every accepted operation was committed and answered
    with bank.Bank.open(ledger_db.db) as b:
        assert b.audit().ok
        assert b.balance(1) == ops + 50
        missing = [k for k in acked if b.find(k) is None]
        assert missing == []


_GC_FORGETFUL = textwrap.dedent(
    """
    import gc
    import sys
    import threading
    import time

    import bank

    b = bank.Bank.open(sys.argv[1])
    b.deposit(b.open_account("a").id, 3)
    del b
    gc.collect()  # closes it on a thread of its own ("bank-closer")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        alive = [t for t in threading.enumerate() if t.name.startswith("bank-")]
        if not alive:
            break
        time.sleep(0.01)
    print(len(alive), flush=True)
    """
)


@pytest.mark.timeout(60)
def test_a_collected_bank_closes_itself(tmp_path: Path, ledger_db: LedgerDb) -> None:
    script = tmp_path / "gc_forgetful.py"
    script.write_text(_GC_FORGETFUL)
    proc = subprocess.run(
        [sys.executable, str(script), str(ledger_db.db)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0"]
    with bank.Bank.open(ledger_db.db) as b:
        assert b.balance(1) == 3


@pytest.mark.timeout(60)
def test_close_never_frees_the_ledger_while_a_slow_callback_runs(
    ledger_db: LedgerDb, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_module, "JOIN_WAIT_S_MAX", 0.2)
    b = bank.Bank.open(ledger_db.db)
    a = b.open_account("a").id
    in_callback = threading.Event()
    finish = threading.Event()

    def slow(_f: object) -> None:
        in_callback.set()
        finish.wait(30)

    with b.account(a).lock:  # attach the callbacks before the futures can finish
        first = b.submit(bank.Deposit(account=a, amount=1))
        first.add_done_callback(slow)
        second = b.submit(bank.Deposit(account=a, amount=2))
    assert in_callback.wait(10)
    started = time.monotonic()
    b.close()  # gives up waiting after 0.2 s; the writer is still in the callback
    assert time.monotonic() - started < 5
    other = _open_elsewhere(ledger_db.db)
    assert other["error"] == "LedgerBusy", other  # one writer, always
    finish.set()
    assert second.result(timeout=10).amount == 2  # no future is left pending
    deadline = time.monotonic() + 10
    while bank_threads():
        assert time.monotonic() < deadline, bank_threads()
        time.sleep(0.01)
    assert b._life.released.wait(10)
    assert _open_elsewhere(ledger_db.db) == {"error": None, "balance": 3}


def _open_elsewhere(path: Path | str) -> dict[str, object]:
    """Open the ledger from another process: its error class name, or the balance of 1."""
    code = textwrap.dedent(
        """
        import json, sys
        import bank
        try:
            with bank.Bank.open(sys.argv[1]) as b:
                print(json.dumps({"error": None, "balance": b.balance(1)}))
        except bank.BankError as exc:
            print(json.dumps({"error": type(exc).__name__}))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    result: dict[str, object] = json.loads(proc.stdout)
    return result


# -- finding 10: lifecycle errors and timeouts -------------------------------------------


@pytest.mark.timeout(60)
def test_stats_after_close_raises_bank_closed(ledger_path: Path) -> None:
    b = bank.Bank.open(ledger_path)
    assert b.stats().workers >= 1
    b.close()
    with pytest.raises(bank.BankClosed):
        b.stats()


@pytest.mark.timeout(60)
def test_close_from_a_done_callback_raises_a_specific_error(
    make_bank: Callable[..., bank.Bank],
) -> None:
    b = make_bank()
    a = b.open_account("a").id
    errors: list[BaseException] = []
    called = threading.Event()

    def callback(_f: object) -> None:
        try:
            b.close()
        except BaseException as exc:
            errors.append(exc)
        called.set()

    with b.account(a).lock:
        fut = b.submit(bank.Deposit(account=a, amount=1))
        fut.add_done_callback(callback)
    fut.result(timeout=10)
    assert called.wait(10)
    assert len(errors) == 1 and type(errors[0]) is bank.CloseFromBankThread
    assert "done-callback" in str(errors[0])
    assert b.deposit(a, 1).amount == 1  # the bank is unharmed


_BAD_TIMEOUTS: list[object] = [math.nan, -1, -0.5, -math.inf, "soon", True, False, [1], 1j]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("timeout", _BAD_TIMEOUTS, ids=repr)
def test_every_timeout_refuses_a_bad_value(
    make_bank: Callable[..., bank.Bank], timeout: object
) -> None:
    b = make_bank()
    a = b.open_account("a").id
    c = b.open_account("c").id
    b.deposit(a, 100)
    calls: list[Callable[[], object]] = [
        lambda: b.submit(bank.Deposit(account=a, amount=1), timeout=timeout),  # type: ignore[arg-type]
        lambda: b.submit_many([bank.Deposit(account=a, amount=1)], timeout=timeout),  # type: ignore[arg-type]
        lambda: b.deposit(a, 1, timeout=timeout),  # type: ignore[arg-type]
        lambda: b.withdraw(a, 1, timeout=timeout),  # type: ignore[arg-type]
        lambda: b.transfer(a, c, 1, timeout=timeout),  # type: ignore[arg-type]
    ]
    for call in calls:
        with pytest.raises(bank.InvalidCommand, match="timeout must be None or a number"):
            call()
    assert b.balance(a) == 100  # nothing was queued


@pytest.mark.timeout(60)
def test_inf_timeout_means_no_limit_and_nan_never_blocks(
    make_bank: Callable[..., bank.Bank],
) -> None:
    b = make_bank(workers=1, queue_capacity=1)
    a = b.open_account("a").id
    assert b.deposit(a, 5, timeout=math.inf).amount == 5
    assert b.deposit(a, 1, timeout=1e300).amount == 1  # past TIMEOUT_MAX: no limit
    assert b.deposit(a, 1, timeout=10**400).amount == 1
    assert b.submit_many([bank.Deposit(account=a, amount=1)], timeout=float("inf"))[0].result()
    assert b.deposit(a, 1, timeout=0).amount == 1
    assert b.deposit(a, 1, timeout=2).amount == 1
    with b.account(a).lock:  # the worker is stuck on this account; the queue fills
        stuck = b.submit(bank.Deposit(account=a, amount=1))
        deadline = time.monotonic() + 10
        while b.stats().queue_depth != 0:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        queued = b.submit(bank.Deposit(account=a, amount=1))
        outcome: list[BaseException] = []

        def blocked() -> None:
            try:
                b.submit(bank.Deposit(account=a, amount=1), timeout=math.nan)
            except bank.BankError as exc:
                outcome.append(exc)

        run_threads([blocked], timeout_s=10)  # the old engine waited forever here
        assert isinstance(outcome[0], bank.InvalidCommand)
    assert stuck.result(timeout=10) and queued.result(timeout=10)


@pytest.mark.timeout(60)
def test_a_finalizer_inside_a_critical_section_does_not_deadlock(ledger_path: Path) -> None:
    b = bank.Bank.open(ledger_path)
    a = b.open_account("a").id
    fut = b.submit(bank.Deposit(account=a, amount=1))

    def collected_mid_put() -> None:  # as if the GC ran at an allocation inside put()
        with b._buffer._mutex:
            b._life.collected()

    run_threads([collected_mid_put], timeout_s=10)
    assert b._life.released.wait(20)
    assert fut.result(timeout=1).amount == 1
    with pytest.raises(bank.BankClosed):
        b.deposit(a, 1)
    b.close()
    assert bank_threads() == []
