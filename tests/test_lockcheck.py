"""The lock-order checker catches every planted inversion, and the engine never trips it."""

from __future__ import annotations

import contextlib
import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import bank
from bank import lockcheck
from bank.lockcheck import LockOrderViolation
from tests.conftest import run_threads


@pytest.fixture
def checking() -> Iterator[None]:
    """Checked locks, a fresh graph, and the recorded violations cleared afterwards."""
    lockcheck.reset()
    with lockcheck.enabled(True):
        yield
    lockcheck.reset()


def test_off_means_plain_locks() -> None:
    with lockcheck.enabled(False):
        assert type(lockcheck.lock("writer")) is type(threading.Lock())
        assert type(lockcheck.rlock("account", 1)) is type(threading.RLock())


@pytest.mark.usefixtures("checking")
def test_the_documented_order_passes_and_every_inversion_is_caught() -> None:
    registry, writer = lockcheck.lock("registry"), lockcheck.lock("writer")
    a1, a2 = lockcheck.rlock("account", 1), lockcheck.rlock("account", 2)
    claims, buffer = lockcheck.lock("claims"), lockcheck.lock("buffer")
    with registry, a1, a2, a2, writer, claims:  # the order of bank.engine's docstring
        pass
    with a1, buffer:
        pass
    assert lockcheck.violations() == []
    cases: list[tuple[list[lockcheck.Lockish], str]] = [
        ([writer, a1], "documented order inverted"),
        ([a1, registry], "documented order inverted"),
        ([a2, a1], "ascending"),
        ([claims, buffer], "leaf"),
        ([buffer, writer], "leaf"),
        ([writer, writer], "self-deadlock"),
    ]
    for locks, why in cases:
        first, second = locks
        with first, pytest.raises(LockOrderViolation, match=why):
            second.acquire()
    assert len(lockcheck.violations()) == len(cases)
    assert first.acquire(blocking=False) is True  # a try-lock cannot deadlock: no check
    first.release()


@pytest.mark.usefixtures("checking")
def test_an_order_seen_before_is_enforced_for_any_locks() -> None:
    x, y = lockcheck.lock("x"), lockcheck.lock("y")
    with x, y:
        pass

    def inverted() -> None:
        with y, contextlib.suppress(LockOrderViolation):  # swallowed, as a worker would
            x.acquire()

    t = threading.Thread(target=inverted, name="inverter")
    t.start()
    t.join(10)
    assert not t.is_alive()
    found = lockcheck.violations()
    assert len(found) == 1 and "inverts an order seen before" in found[0]
    assert "inverter" in found[0]


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("checking")
def test_an_inversion_planted_in_a_real_bank_is_caught(ledger_path: Path) -> None:
    with bank.Bank.open(ledger_path) as b:
        a = b.open_account("a").id
        writer_lock = b._writer._lock
        with writer_lock, pytest.raises(LockOrderViolation):
            b.account(a).lock.acquire()
        assert b.deposit(a, 1).amount == 1
    assert len(lockcheck.violations()) == 1


@pytest.mark.timeout(120)
@pytest.mark.usefixtures("checking", "fast_switching")
def test_a_busy_bank_under_the_checker_is_silent(make_bank: Callable[..., bank.Bank]) -> None:
    b = make_bank(workers=3, queue_capacity=64)
    ids = [b.open_account(f"c{i}", overdraft_limit=50).id for i in range(6)]

    def teller(seed: int) -> None:
        rng = random.Random(seed)
        for n in range(150):
            src, dst = rng.sample(ids, 2)
            key = f"t{seed}-{n % 20}" if n % 3 == 0 else None
            try:
                if n % 25 == 0:
                    b.snapshot()
                    b.set_overdraft_limit(src, rng.randrange(50, 60))
                elif n % 7 == 0:
                    b.submit_many(
                        [
                            bank.Deposit(account=dst, amount=1),
                            bank.Withdrawal(account=src, amount=1),
                        ]
                    )
                else:
                    b.transfer(src, dst, rng.randrange(1, 20), key=key)
                b.find(f"t{seed}-0") if n % 40 == 0 else None
            except (bank.InsufficientFunds, bank.IdempotencyConflict):
                pass

    tellers: list[Callable[[], None]] = [lambda s=s: teller(s) for s in range(4)]  # type: ignore[misc]
    run_threads(tellers, timeout_s=90)
    assert b.snapshot().total == 0
    assert lockcheck.violations() == []
