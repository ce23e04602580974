"""The Condition-based bounded buffer is FIFO, bounded, fair to blocked producers, and closable."""

from __future__ import annotations

import functools
import threading
import time

import pytest

from bank.buffer import BoundedBuffer
from bank.errors import BankClosed, QueueFull
from tests.conftest import run_threads


def test_fifo_and_statistics() -> None:
    buf: BoundedBuffer[int] = BoundedBuffer(10)
    for i in range(5):
        buf.put(i)
    buf.put(99, weight=3)
    assert buf.stats().depth == 8
    assert buf.stats().high_water == 8
    assert buf.get_many(4) == [0, 1, 2, 3]
    assert buf.get_many(100) == [4, 99]
    stats = buf.stats()
    assert (stats.depth, stats.high_water, stats.put_total, stats.get_total) == (0, 8, 8, 8)


def test_get_many_always_takes_at_least_one_item() -> None:
    buf: BoundedBuffer[str] = BoundedBuffer(10)
    buf.put("heavy", weight=5)
    assert buf.get_many(1) == ["heavy"]


def test_full_buffer_times_out_with_queue_full_and_keeps_its_items() -> None:
    buf: BoundedBuffer[int] = BoundedBuffer(2)
    buf.put(1)
    buf.put(2)
    started = time.monotonic()
    with pytest.raises(QueueFull, match="stayed full"):
        buf.put(3, timeout=0.05)
    assert time.monotonic() - started >= 0.05
    assert buf.get_many(10) == [1, 2]
    assert buf.stats().waiting_producers == 0


def test_zero_timeout_fails_at_once_when_full() -> None:
    buf: BoundedBuffer[int] = BoundedBuffer(1)
    buf.put(1)
    with pytest.raises(QueueFull):
        buf.put(2, timeout=0)


def test_blocked_producer_resumes_when_room_frees() -> None:
    buf: BoundedBuffer[int] = BoundedBuffer(1)
    buf.put(1)
    done = threading.Event()

    def producer() -> None:
        buf.put(2)
        done.set()

    t = threading.Thread(target=producer, daemon=True)
    t.start()
    assert not done.wait(0.05)
    assert buf.get_many(1) == [1]
    assert done.wait(5)
    assert buf.get_many(1) == [2]


def test_blocked_producers_are_served_in_arrival_order() -> None:
    buf: BoundedBuffer[int] = BoundedBuffer(1)
    buf.put(-1)
    order: list[int] = []
    threads = []
    for i in range(8):
        t = threading.Thread(target=lambda i=i: buf.put(i), daemon=True)
        t.start()
        threads.append(t)
        deadline = time.monotonic() + 5
        while buf.stats().waiting_producers != i + 1:  # wait until it is queued
            assert time.monotonic() < deadline
            time.sleep(0.001)
    for _ in range(9):
        order.extend(buf.get_many(1, timeout=5))
    assert order == [-1, 0, 1, 2, 3, 4, 5, 6, 7]


def test_large_put_is_not_starved_by_small_ones() -> None:
    buf: BoundedBuffer[str] = BoundedBuffer(4)
    buf.put("a", weight=3)
    big_in = threading.Event()

    def put_big() -> None:
        buf.put("big", weight=4)
        big_in.set()

    t = threading.Thread(target=put_big, daemon=True)
    t.start()
    while buf.stats().waiting_producers != 1:
        time.sleep(0.001)
    # A small item would fit now, but it must queue behind the big one.
    small = threading.Thread(target=lambda: buf.put("small", weight=1), daemon=True)
    small.start()
    while buf.stats().waiting_producers != 2:
        time.sleep(0.001)
    assert buf.get_many(10) == ["a"]
    assert big_in.wait(5)
    assert buf.get_many(10) == ["big"]
    small.join(5)
    assert buf.get_many(10) == ["small"]


def test_close_wakes_every_waiter_and_consumers_drain() -> None:
    buf: BoundedBuffer[int] = BoundedBuffer(1)
    buf.put(1)
    outcomes: list[str] = []
    lock = threading.Lock()

    def producer() -> None:
        try:
            buf.put(2)
        except BankClosed:
            with lock:
                outcomes.append("closed")

    producers = [threading.Thread(target=producer, daemon=True) for _ in range(5)]
    for t in producers:
        t.start()
    while buf.stats().waiting_producers != 5:
        time.sleep(0.001)
    buf.close()
    for t in producers:
        t.join(5)
        assert not t.is_alive()
    assert outcomes == ["closed"] * 5
    assert buf.get_many(10) == [1]  # what was accepted is still delivered
    assert buf.get_many(10) == []  # then consumers learn it is over
    with pytest.raises(BankClosed):
        buf.put(3)


def test_close_wakes_blocked_consumers() -> None:
    buf: BoundedBuffer[int] = BoundedBuffer(1)
    got: list[list[int]] = []
    t = threading.Thread(target=lambda: got.append(buf.get_many(1)), daemon=True)
    t.start()
    time.sleep(0.02)
    buf.close()
    t.join(5)
    assert got == [[]]


def test_many_producers_and_consumers_lose_nothing(fast_switching: None) -> None:
    buf: BoundedBuffer[int] = BoundedBuffer(7)
    received: list[int] = []
    lock = threading.Lock()
    per = 500

    def producer(base: int) -> None:
        for i in range(per):
            buf.put(base + i)

    def consumer() -> None:
        while items := buf.get_many(3):
            with lock:
                received.extend(items)

    consumers = [threading.Thread(target=consumer, daemon=True) for _ in range(3)]
    for c in consumers:
        c.start()
    run_threads([functools.partial(producer, b * per) for b in range(8)], timeout_s=60)
    buf.close()
    for c in consumers:
        c.join(10)
        assert not c.is_alive()
    assert sorted(received) == list(range(8 * per))
    assert buf.stats().high_water <= 7


@pytest.mark.parametrize("capacity", [0, -1, 1.5, True])
def test_bad_capacity(capacity: object) -> None:
    with pytest.raises(ValueError, match="capacity"):
        BoundedBuffer(capacity)  # type: ignore[arg-type]
