"""The pending holds: by seq for posts and voids, and as a heap of deadlines for expiry.

A hold is added and removed only while its source's and target's account locks are
held (so under those locks its state is settled), and its source's `held` changes in
the same step. The book's own lock is a leaf: it guards the dict and the heap for
the short moment of a look-up or a change, and nothing is taken while it is held.
"""

from __future__ import annotations

import heapq
import threading
from dataclasses import dataclass

from bank import lockcheck


@dataclass(frozen=True, slots=True)
class PendingHold:
    """A hold not yet posted, voided or expired (its row is `seq`)."""

    seq: int
    source: int
    target: int
    amount: int
    expires_us: int | None


class HoldBook:
    """Every pending hold of a bank; `changed` wakes the expiry timer."""

    def __init__(self) -> None:
        self._lock = lockcheck.lock("holds")
        #: Notified when a nearer deadline arrives, the clock jumps, or the bank closes.
        self.changed = threading.Condition(self._lock)
        self._pending: dict[int, PendingHold] = {}
        self._deadlines: list[tuple[int, int]] = []  # (expires_us, seq), a heap
        self.closed = False

    def get(self, seq: int) -> PendingHold | None:
        """The pending hold at `seq`, if any (confirm under its accounts' locks)."""
        with self._lock:
            return self._pending.get(seq)

    def add(self, hold: PendingHold) -> None:
        """Record a new hold (the caller holds both accounts' locks)."""
        with self._lock:
            self._pending[hold.seq] = hold
            if hold.expires_us is not None:
                nearest = self._deadlines[0][0] if self._deadlines else None
                heapq.heappush(self._deadlines, (hold.expires_us, hold.seq))
                if nearest is None or hold.expires_us < nearest:
                    self.changed.notify_all()

    def remove(self, seq: int) -> None:
        """Forget a settled hold (the caller holds both accounts' locks). Its deadline
        stays in the heap and is skipped when it comes up."""
        with self._lock:
            del self._pending[seq]

    def involving(self, account_id: int) -> list[PendingHold]:
        """The pending holds with `account_id` as source or target (a scan: for closing
        an account, which is rare)."""
        with self._lock:
            return [h for h in self._pending.values() if account_id in (h.source, h.target)]

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)

    def pending(self) -> list[PendingHold]:
        """Every pending hold, by seq."""
        with self._lock:
            return sorted(self._pending.values(), key=lambda h: h.seq)

    def wake(self) -> None:
        """Have the timer look at the clock again (a controllable clock moved)."""
        with self._lock:
            self.changed.notify_all()

    def close(self) -> None:
        """End the timer's wait for good."""
        with self._lock:
            self.closed = True
            self.changed.notify_all()

    def wait_due(self, now_us: int, wait_s_max: float) -> list[PendingHold] | None:
        """The pending holds whose deadline is at or before `now_us`; if none, wait (at
        most `wait_s_max`, less if the next deadline is nearer) for a change and return
        an empty list. None once closed. The clock is read by the caller, so a
        controllable clock's time is what counts; real time only bounds the wait."""
        with self._lock:
            if self.closed:
                return None
            due: list[PendingHold] = []
            heap = self._deadlines
            while heap and heap[0][0] <= now_us:
                _, seq = heapq.heappop(heap)
                hold = self._pending.get(seq)
                if hold is not None:
                    due.append(hold)
            if due:
                return due
            wait = wait_s_max
            if heap:
                wait = min(wait, max(0.0, (heap[0][0] - now_us) / 1_000_000))
            self.changed.wait(wait)
            return []

    def reschedule(self, hold: PendingHold) -> None:
        """Put back the deadline of a hold found not yet due after all (the clock read
        under the writer's lock came before it)."""
        assert hold.expires_us is not None
        with self._lock:
            heapq.heappush(self._deadlines, (hold.expires_us, hold.seq))
