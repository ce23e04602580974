"""The engine's answer objects behave as what they stand for: an `EngineFuture` is a full
`concurrent.futures.Future`, a `Reply` answers one blocking call once, a batch slot fills once."""

from __future__ import annotations

import asyncio
import threading
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
