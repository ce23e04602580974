"""Shared fixtures: real file ledgers under tmp_path, and a watchdog for threaded tests."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import bank
from bank import lockcheck

#: Test modules that run with the lock-order checker on (and fast thread switching).
_LOCK_CHECKED = frozenset(
    {"tests.test_contention", "tests.test_stateful", "tests.test_hangs", "tests.test_outcomes"}
)


@pytest.fixture(autouse=True)
def _lock_order_checked(request: pytest.FixtureRequest) -> Iterator[None]:
    """In `_LOCK_CHECKED` modules, check every lock's order; any violation fails the test.

    Violations are recorded even when the `LockOrderViolation` was swallowed (a
    worker turns exceptions into answers), so the test fails at teardown.
    """
    if request.module.__name__ not in _LOCK_CHECKED and not lockcheck.is_enabled():
        yield  # with BANK_LOCK_CHECK=1 in the environment, every module is checked
        return
    lockcheck.reset()
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        with lockcheck.enabled(True):
            yield
    finally:
        sys.setswitchinterval(old)
    found = lockcheck.violations()
    lockcheck.reset()
    assert not found, f"lock-order violations: {found}"


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    """A ledger file path that does not exist yet."""
    return tmp_path / "ledger.db"


@pytest.fixture
def make_bank(ledger_path: Path) -> Iterator[Callable[..., bank.Bank]]:
    """Open banks on `ledger_path` (options passed through); all are closed at teardown."""
    opened: list[bank.Bank] = []

    def _make(**options: object) -> bank.Bank:
        b = bank.Bank.open(ledger_path, **options)  # type: ignore[arg-type]
        opened.append(b)
        return b

    yield _make
    for b in opened:
        b.close()


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """Switch threads as often as CPython allows, to shake out races."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def run_threads(targets: list[Callable[[], None]], *, timeout_s: float) -> None:
    """Start all targets together, join them, and fail (not hang) past `timeout_s`.

    Exceptions raised in a thread fail the test.
    """
    errors: list[BaseException] = []
    start = threading.Event()

    def wrap(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            start.wait()
            try:
                fn()
            except BaseException as exc:
                errors.append(exc)

        return run

    threads = [
        threading.Thread(target=wrap(t), name=f"test-{i}", daemon=True)
        for i, t in enumerate(targets)
    ]
    for t in threads:
        t.start()
    start.set()
    for t in threads:
        t.join(timeout_s)
    alive = [t.name for t in threads if t.is_alive()]
    assert not alive, f"watchdog: threads still running after {timeout_s} s (deadlock?): {alive}"
    if errors:
        raise errors[0]


def bank_threads() -> list[str]:
    """Names of the engine's threads still alive in this process."""
    return [
        t.name for t in threading.enumerate() if t.name.startswith(("bank-worker", "bank-ledger"))
    ]
