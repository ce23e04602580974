"""Claims on idempotency keys while their operation is in flight.

A key is claimed from the moment a worker starts on a keyed operation until
that operation is answered (committed, or rejected). The ledger's unique index
is the permanent record, so this map only ever holds keys of operations still
in flight: its size is bounded by the queue and the writer's batch, not by the
number of keys ever used.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future

from bank.records import Receipt


class KeyClaims:
    """Who is working on which key right now."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._claims: dict[str, Future[Receipt]] = {}

    def claim(self, key: str, future: Future[Receipt]) -> Future[Receipt] | None:
        """Claim `key` for `future`; returns the holder's future if someone else has it."""
        with self._lock:
            holder = self._claims.get(key)
            if holder is None:
                self._claims[key] = future
            return holder

    def holder(self, key: str) -> Future[Receipt] | None:
        """The future of the operation working on `key` right now, if any."""
        with self._lock:
            return self._claims.get(key)

    def release(self, key: str) -> None:
        """Give the key up: call after the ledger has it (or the operation was refused)."""
        with self._lock:
            self._claims.pop(key, None)

    def release_if_owner(self, key: str, future: Future[Receipt]) -> None:
        """Release `key` only if `future` holds it (error paths, where ownership is unsure)."""
        with self._lock:
            if self._claims.get(key) is future:
                del self._claims[key]

    def release_many(self, keys: list[str]) -> None:
        """`release` for a committed batch, under one acquisition."""
        with self._lock:
            for key in keys:
                self._claims.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._claims)
