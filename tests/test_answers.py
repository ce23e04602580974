"""The engine's answer objects behave as what they stand for: an `EngineFuture` is a full
`concurrent.futures.Future`, a `Reply` answers one blocking call once, a batch slot fills once."""

from __future__ import annotations

import asyncio
import collections
import gc
import threading
import time
from concurrent.futures import (
    FIRST_COMPLETED,
    CancelledError,
    Future,
    InvalidStateError,
    as_completed,
    wait,
)
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import pytest

import bank
from bank.answers import BatchAnswer, EngineFuture, Reply


def _answer_later(future: Future[Any], value: Any, delay_s: float = 0.05) -> None:
    threading.Timer(delay_s, future.set_result, (value,)).start()


@pytest.mark.timeout(30)
def test_an_engine_future_is_a_future_for_every_standard_tool() -> None:
    f: EngineFuture[int] = EngineFuture()
    assert isinstance(f, Future) and not f.done() and not f.running()
    with pytest.raises(FutureTimeout):
        f.result(timeout=0.01)
    seen: list[int] = []
    f.add_done_callback(lambda g: seen.append(g.result()))
    _answer_later(f, 7)
    assert f.result(timeout=5) == 7 and seen == [7] and f.done()
    with pytest.raises(InvalidStateError):
        f.set_result(8)
    # wait / as_completed install waiters through the Condition's lock and lists.
    futures: list[EngineFuture[int]] = [EngineFuture() for _ in range(3)]
    _answer_later(futures[1], 1)
    done, pending = wait(futures, timeout=5, return_when=FIRST_COMPLETED)
    assert done == {futures[1]} and len(pending) == 2
    _answer_later(futures[0], 0)
    _answer_later(futures[2], 2, 0.1)
    assert sorted(g.result() for g in as_completed(futures, timeout=5)) == [0, 1, 2]
    # cancel, and an exception.
    c: EngineFuture[int] = EngineFuture()
    assert c.cancel() and c.cancelled()
    with pytest.raises(CancelledError):
        c.result()
    e: EngineFuture[int] = EngineFuture()
    assert e.set_running_or_notify_cancel() and not e.cancel()
    e.set_exception(bank.InsufficientFunds("no"))
    assert isinstance(e.exception(), bank.InsufficientFunds)

    async def awaited() -> int:
        g: EngineFuture[int] = EngineFuture()
        _answer_later(g, 42)
        return await asyncio.wrap_future(g)

    assert asyncio.run(awaited()) == 42


@pytest.mark.timeout(30)
def test_a_reply_is_answered_once_and_wakes_its_caller() -> None:
    reply = Reply()
    assert reply.set_running_or_notify_cancel() and not reply.done()
    threading.Timer(0.05, reply.set_result, ("receipt",)).start()
    assert reply.wait() == "receipt" and reply.done()
    assert reply.wait() == "receipt"  # waiting again returns at once
    with pytest.raises(InvalidStateError):
        reply.set_exception(bank.BankClosed("late"))
    refused = Reply()
    refused.set_exception(bank.AccountNotFound("account 9 does not exist"))
    with pytest.raises(bank.AccountNotFound):
        refused.wait()
    with pytest.raises(InvalidStateError):
        refused.set_result("twice")


def test_a_batch_slot_fills_once_and_the_last_one_completes_the_future() -> None:
    answer = BatchAnswer(3)
    slots = answer.slots()
    assert slots[0].set_running_or_notify_cancel()
    slots[2].set_exception(bank.InsufficientFunds("no"))
    slots[0].set_result("r0")
    assert not answer.future.done() and slots[0].done() and not slots[1].done()
    with pytest.raises(InvalidStateError):
        slots[0].set_result("again")
    slots[1].set_result("r1")
    outcomes: list[Any] = list(answer.future.result(timeout=1))
    assert outcomes[:2] == ["r0", "r1"] and isinstance(outcomes[2], bank.InsufficientFunds)
    cancelled = BatchAnswer(2)
    assert cancelled.future.cancel()
    first, second = cancelled.slots()
    assert not first.set_running_or_notify_cancel() and not second.set_running_or_notify_cancel()
    second.set_exception(bank.QueueFull("left out"))  # a chunk that never went in: ignored
    first.set_exception(bank.QueueFull("left out"))
    assert cancelled.future.cancelled()


def _tracked_per(make: Any, count: int = 500) -> float:
    """Objects the cyclic collector tracks, per object `make()` returns (kept alive)."""
    gc.collect()
    before = len(gc.get_objects())
    kept = [make() for _ in range(count)]
    made = len(gc.get_objects()) - before - 1  # the list `kept`
    assert len(kept) == count
    return made / count


def test_an_engine_future_makes_its_lists_and_queue_only_when_used() -> None:
    # What the collector walks per operation in flight: 3, where a Future is 11.
    assert _tracked_per(EngineFuture) == 3
    assert _tracked_per(Future) > 3
    f: EngineFuture[int] = EngineFuture()
    f.set_result(1)  # answered with nobody waiting and no callback: nothing made
    assert f._waiter_list is None and f._callback_list is None
    assert f._condition._queue is None  # type: ignore[attr-defined]
    assert f.result() == 1


@pytest.mark.timeout(30)
def test_an_engine_future_wakes_every_kind_of_waiter_made_before_its_answer() -> None:
    f: EngineFuture[int] = EngineFuture()
    results: list[Any] = []
    callbacks: list[int] = []
    f.add_done_callback(lambda g: callbacks.append(1))
    f.add_done_callback(lambda g: callbacks.append(2))
    started = threading.Barrier(4)

    def by_result() -> None:
        started.wait()
        results.append(f.result(timeout=10))

    def by_wait() -> None:
        started.wait()
        done, _ = wait([f], timeout=10)
        results.append(done == {f})

    def by_as_completed() -> None:
        started.wait()
        results.append([g is f for g in as_completed([f], timeout=10)])

    threads = [threading.Thread(target=t) for t in (by_result, by_wait, by_as_completed)]
    for t in threads:
        t.start()
    started.wait()
    time.sleep(0.05)  # let all three block
    f.set_result(5)
    for t in threads:
        t.join(10)
    assert sorted(map(repr, results)) == sorted(map(repr, [5, True, [True]]))
    assert callbacks == [1, 2]
    f.add_done_callback(lambda g: callbacks.append(3))  # after the answer: runs at once
    assert callbacks == [1, 2, 3]
    # A wait that timed out leaves no waiter behind, and a later exception still lands.
    g: EngineFuture[int] = EngineFuture()
    assert wait([g], timeout=0.01).not_done == {g}
    with pytest.raises(FutureTimeout):
        g.result(timeout=0.01)
    assert g._waiter_list == [] and not g._condition._queue  # type: ignore[attr-defined]
    g.set_exception(bank.InsufficientFunds("no"))
    assert isinstance(g.exception(timeout=1), bank.InsufficientFunds)
    # Cancelled while wait() watches it: the waiter hears of it when the canceller's
    # executor calls set_running_or_notify_cancel (as with a plain Future).
    h: EngineFuture[int] = EngineFuture()

    def cancel_as_an_executor_does() -> None:
        assert h.cancel()
        assert not h.set_running_or_notify_cancel()

    threading.Timer(0.05, cancel_as_an_executor_does).start()
    done, _ = wait([h], timeout=10)
    assert done == {h} and h.cancelled()
    with pytest.raises(InvalidStateError):
        h.set_result(1)
    with pytest.raises(RuntimeError, match="un-acquired"):
        h._condition.notify_all()  # the Condition's own rule: notify only under its lock


@pytest.mark.timeout(30)
@pytest.mark.parametrize("reader", ["repr", "unlocked access"])
def test_a_queue_made_beside_a_waiter_never_loses_its_wake_up(
    reader: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`Condition.__repr__` reads the waiter queue without the lock. If another thread
    makes the lazy queue while a waiter is in `wait()`, the waiter's lock must end up in
    the one queue that `notify_all` reads (found by an independent review: the waiter
    slept through its answer). The other thread is held inside `deque()` for 0.3 s,
    standing in for a thread switch at that point."""
    from bank import answers

    f: EngineFuture[int] = EngineFuture()
    inside = threading.Event()
    real_deque = collections.deque

    def slow_deque(*args: Any) -> Any:
        if threading.current_thread().name == "reader":
            inside.set()
            time.sleep(0.3)
        return real_deque(*args)

    # The Condition makes its queue with `deque`: held open there in the reader thread.
    monkeypatch.setattr(vars(answers._FutureCondition)["_waiters"], "_make", slow_deque)
    condition: Any = f._condition

    def read() -> None:
        if reader == "repr":
            repr(condition)
        else:
            len(condition._waiters)

    other = threading.Thread(target=read, name="reader")
    other.start()
    if reader != "repr":  # repr makes no queue at all now: nothing to wait for
        assert inside.wait(5)
    woke: list[float] = []

    def wait_for_it() -> None:
        t0 = time.monotonic()
        assert f.result(timeout=5) == 42
        woke.append(time.monotonic() - t0)

    waiter = threading.Thread(target=wait_for_it)
    waiter.start()
    time.sleep(0.1)  # the waiter is inside Condition.wait
    other.join(5)
    f.set_result(42)
    waiter.join(10)
    assert woke and woke[0] < 2, woke  # woken by the answer, not by its 5-s timeout


def test_the_lazy_attributes_stay_settable_as_the_standard_ones() -> None:
    """A subclass that runs `Future.__init__` (and so sets `_waiters`, `_done_callbacks`)
    still works, and a Condition's queue can be replaced as `Condition`'s can."""

    class Plain(EngineFuture[int]):
        def __init__(self) -> None:
            Future.__init__(self)

    f = Plain()
    seen: list[int] = []
    f.add_done_callback(lambda g: seen.append(g.result()))
    assert wait([f], timeout=0.01).not_done == {f}
    f.set_result(3)
    assert seen == [3] and f.result() == 3
    condition: Any = EngineFuture()._condition
    condition._waiters = collections.deque()
    assert condition._waiters is condition._queue
