"""A bounded FIFO buffer on `threading.Condition`: the bank's job queue.

One mutex, and conditions over it:
- `_not_empty`: consumers wait here; producers notify it after adding.
- one Condition per blocked producer, queued in `_put_waiters`: consumers (and
  producers that time out) notify the head after freeing room, so blocked
  producers are served strictly in arrival order and a large put is never
  starved by a stream of small ones.

Capacity is counted in operations (an item carries a weight), so a batch of 64
operations takes 64 places but only one hand-off.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Generic, TypeVar

from bank import lockcheck
from bank.errors import BankClosed, QueueFull

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class BufferStats:
    """A consistent reading of the buffer's counters."""

    capacity: int
    depth: int
    high_water: int
    put_total: int
    get_total: int
    waiting_producers: int


class BoundedBuffer(Generic[T]):
    """Bounded, closable FIFO of weighted items."""

    def __init__(self, capacity: int) -> None:
        if type(capacity) is not int or capacity < 1:
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        self._capacity = capacity
        self._mutex = lockcheck.lock("buffer")
        self._not_empty = threading.Condition(self._mutex)
        self._put_waiters: deque[tuple[threading.Condition, int]] = deque()
        self._items: deque[tuple[T, int]] = deque()
        self._depth = 0  # sum of the weights in _items
        self._closed = False
        self._high_water = 0
        self._put_total = 0
        self._get_total = 0

    @property
    def capacity(self) -> int:
        """Most operations the buffer holds at once."""
        return self._capacity

    def stats(self) -> BufferStats:
        """Depth, high-water mark and counters, read under the lock."""
        with self._mutex:
            return BufferStats(
                self._capacity,
                self._depth,
                self._high_water,
                self._put_total,
                self._get_total,
                len(self._put_waiters),
            )

    def put(self, item: T, weight: int = 1, timeout: float | None = None) -> None:
        """Append `item`, blocking while it does not fit.

        Raises `QueueFull` if it still does not fit after `timeout` seconds and
        `BankClosed` if the buffer is closed before or while waiting.
        """
        assert 1 <= weight <= self._capacity, "an item heavier than the buffer can never fit"
        with self._mutex:
            if self._closed:
                raise BankClosed("the bank is closed: it accepts no more operations")
            if self._put_waiters or self._depth + weight > self._capacity:
                self._wait_for_room(weight, timeout)
            self._items.append((item, weight))
            self._depth += weight
            self._put_total += weight
            self._high_water = max(self._high_water, self._depth)
            self._not_empty.notify()
            self._wake_next_producer()

    def has_room(self) -> bool:
        """True if a `put` of one operation would go in now without waiting: open, nobody
        queued for room, and room. A blocking call that applies its command on its own
        thread asks this first, so that a full queue holds it back as it holds back a
        `put` (back-pressure, and `QueueFull` after its `timeout`)."""
        with self._mutex:
            return not self._closed and not self._put_waiters and self._depth < self._capacity

    def _wait_for_room(self, weight: int, timeout: float | None) -> None:
        """Queue up behind earlier producers until this one is first and fits. Lock held."""
        me = threading.Condition(self._mutex)
        entry = (me, weight)
        self._put_waiters.append(entry)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while self._put_waiters[0] is not entry or self._depth + weight > self._capacity:
                if self._closed:
                    raise BankClosed("the bank was closed while this operation waited for room")
                if deadline is None:
                    me.wait()
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise QueueFull(
                            f"the job queue stayed full ({self._depth}/{self._capacity} operations) "
                            f"for {timeout} s"
                        )
                    me.wait(remaining)
            if self._closed:
                raise BankClosed("the bank was closed while this operation waited for room")
        finally:
            was_head = self._put_waiters[0] is entry
            self._put_waiters.remove(entry)
            if was_head:
                self._wake_next_producer()

    def _wake_next_producer(self) -> None:
        """Notify the first blocked producer if it now fits. Lock held."""
        if self._put_waiters:
            cond, weight = self._put_waiters[0]
            if self._closed or self._depth + weight <= self._capacity:
                cond.notify()

    def get_many(self, weight_max: int, timeout: float | None = None) -> list[T]:
        """Remove items in FIFO order up to `weight_max` operations (at least one item).

        Blocks while empty. Returns [] once the buffer is closed and drained, or
        when `timeout` passes with nothing to take.
        """
        with self._mutex:
            deadline = None if timeout is None else time.monotonic() + timeout
            while not self._items:
                if self._closed:
                    return []
                if deadline is None:
                    self._not_empty.wait()
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return []
                    self._not_empty.wait(remaining)
            taken: list[T] = []
            total = 0
            while self._items:
                item, weight = self._items[0]
                if taken and total + weight > weight_max:
                    break
                self._items.popleft()
                taken.append(item)
                total += weight
            self._depth -= total
            self._get_total += total
            self._wake_next_producer()
            if self._items:
                self._not_empty.notify()  # leftovers: let another consumer have them
            return taken

    def close(self) -> None:
        """Refuse new items and wake every waiter; consumers still drain what is queued."""
        with self._mutex:
            self._closed = True
            self._not_empty.notify_all()
            for cond, _ in self._put_waiters:
                cond.notify_all()

    @property
    def closed(self) -> bool:
        """True once `close()` was called."""
        with self._mutex:
            return self._closed
