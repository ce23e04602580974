"""Claims on idempotency keys while their operation is in flight.

A key is claimed from the moment a worker starts on a keyed operation until
that operation is answered (committed, or rejected). The ledger's unique index
is the permanent record, so this map only ever holds keys of operations still
in flight: its size is bounded by the queue and the writer's batch, not by the
number of keys ever used.
"""

from __future__ import annotations

import threading
import time

from bank import lockcheck
from bank.answers import Answer
from bank.errors import BankClosed, KeyInFlight


class KeyClaims:
    """Who is working on which key right now."""

    def __init__(self) -> None:
        self._lock = lockcheck.lock("claims")
        # Whoever waits for a key to be released waits here; releases notify it, and
        # only when someone waits (`_waiting`), so the writer's release stays cheap.
        self._released = threading.Condition(self._lock)
        self._waiting = 0
        self._closed = False
        self._claims: dict[str, Answer] = {}

    def claim(self, key: str, future: Answer) -> Answer | None:
        """Claim `key` for `future`; returns the holder's future if someone else has it."""
        with self._lock:
            holder = self._claims.get(key)
            if holder is None:
                self._claims[key] = future
            return holder

    def claim_when_free(self, key: str, future: Answer, timeout: float) -> None:
        """Claim `key` for `future`, waiting (at most `timeout` s) for its holder to let go.

        Raises `KeyInFlight` past the deadline (nothing was changed) and `BankClosed`
        once `close()` has given up on the claims.
        """
        with self._lock:
            self._wait_free(key, future, timeout, "operation")
            self._claims[key] = future

    def wait_released(self, key: str, timeout: float) -> None:
        """Wait (at most `timeout` s) until no operation holds `key`; raises like `claim_when_free`."""
        with self._lock:
            self._wait_free(key, None, timeout, "call")

    def _wait_free(self, key: str, future: Answer | None, timeout: float, who: str) -> None:
        """Under `_lock`: wait until `key` is free or held by `future` itself."""
        deadline = time.monotonic() + timeout
        self._waiting += 1
        try:
            while (holder := self._claims.get(key)) is not None and holder is not future:
                if self._closed:
                    raise BankClosed(f"the bank closed while this {who} waited for its key")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise KeyInFlight(
                        f"the operation holding key {key!r} was not answered within "
                        f"{timeout} s; nothing was changed"
                    )
                self._released.wait(remaining)
        finally:
            self._waiting -= 1

    def close(self) -> None:
        """End every wait for a key (with `BankClosed`): the bank's threads are gone."""
        with self._lock:
            self._closed = True
            self._released.notify_all()

    def holder(self, key: str) -> Answer | None:
        """The future of the operation working on `key` right now, if any."""
        with self._lock:
            return self._claims.get(key)

    def release(self, key: str) -> None:
        """Give the key up: call after the ledger has it (or the operation was refused)."""
        with self._lock:
            self._claims.pop(key, None)
            if self._waiting:
                self._released.notify_all()

    def release_if_owner(self, key: str, future: Answer) -> None:
        """Release `key` only if `future` holds it (error paths, where ownership is unsure)."""
        with self._lock:
            if self._claims.get(key) is future:
                del self._claims[key]
                if self._waiting:
                    self._released.notify_all()

    def release_many(self, keys: list[str]) -> None:
        """`release` for a committed batch, under one acquisition."""
        with self._lock:
            for key in keys:
                self._claims.pop(key, None)
            if self._waiting:
                self._released.notify_all()

    def __len__(self) -> int:
        with self._lock:
            return len(self._claims)
