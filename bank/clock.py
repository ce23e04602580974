"""The clock the ledger's timestamps and hold deadlines are read from.

Every row's `ts_us` and every hold's deadline (`expires_us`) come from one clock,
read under the writer's lock when a row is staged, so "this post came before the
deadline" is decided on the very timestamp the row carries. `Bank.open(...,
clock=...)` takes any object with `now_us()` and `subscribe(wake)`: the default is
the system clock; tests pass a `ManualClock` and advance it, which wakes the
expiry timer at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol


class Clock(Protocol):
    """Microseconds since the Unix epoch, and a way to hear that time jumped."""

    def now_us(self) -> int:
        """The current time in whole microseconds (an int)."""
        ...

    def subscribe(self, wake: Callable[[], None]) -> None:
        """Have `wake()` called whenever the time moves other than by itself (a
        controllable clock's advance). The system clock never calls it."""
        ...


class SystemClock:
    """The wall clock (`time.time_ns() // 1000`), as every ledger before holds used."""

    @staticmethod
    def now_us() -> int:
        return time.time_ns() // 1000

    def subscribe(self, wake: Callable[[], None]) -> None:
        """Nothing to hear: the expiry timer sleeps until the next deadline."""


class ManualClock:
    """A clock that moves only when told (tests): `advance(seconds)` or `set_us(us)`.

    It never goes backwards. Thread-safe; `wake` callbacks run on the advancing thread
    and must be short (the engine's only notifies a condition).
    """

    def __init__(self, start_us: int | None = None) -> None:
        self._lock = threading.Lock()
        self._now_us = time.time_ns() // 1000 if start_us is None else start_us
        self._wakes: list[Callable[[], None]] = []

    def now_us(self) -> int:
        with self._lock:
            return self._now_us

    def subscribe(self, wake: Callable[[], None]) -> None:
        with self._lock:
            self._wakes.append(wake)

    def advance(self, seconds: float) -> int:
        """Move forward by `seconds` (>= 0); returns the new time in microseconds."""
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds >= 0:
            raise ValueError(f"advance takes a number of seconds >= 0 (got {seconds!r})")
        return self.set_us(self.now_us() + round(seconds * 1_000_000))

    def set_us(self, now_us: int) -> int:
        """Move to `now_us` (not before the current time); returns it."""
        if type(now_us) is not int:
            raise ValueError(f"set_us takes an int of microseconds (got {now_us!r})")
        with self._lock:
            if now_us < self._now_us:
                raise ValueError(f"a ManualClock never goes back ({now_us} < {self._now_us})")
            self._now_us = now_us
            wakes = list(self._wakes)
        for wake in wakes:
            wake()
        return now_us
