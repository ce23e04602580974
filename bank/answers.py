"""Where an operation's answer goes: its own `Future`, or one slot of a batch's list.

The workers and the ledger writer answer through the small `Answer` protocol, which a
`concurrent.futures.Future` already satisfies. `submit_batch` gives each command a
`BatchSlot` instead (two fields, no lock, no Condition): filling the last slot of a
`BatchAnswer` completes the batch's one future with the list of outcomes, in order.
A Future costs a Condition, an RLock and two lists per operation; a slot costs one
small object, and the batch's lock is taken once per slot filled.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from concurrent.futures._base import (
    CANCELLED,
    CANCELLED_AND_NOTIFIED,
    FINISHED,
    PENDING,
)
from typing import Any, Final, Generic, Protocol, TypeVar

from bank import lockcheck
from bank.errors import BankError
from bank.records import Receipt

#: One element of a batch's result: the receipt, or the refusal (not raised).
Outcome = Receipt | BankError


class Answer(Protocol):
    """What the engine calls on an operation's answer (a `Future[Receipt]` is one)."""

    def set_running_or_notify_cancel(self) -> bool: ...
    def done(self) -> bool: ...
    def set_result(self, result: Any) -> None: ...
    def set_exception(self, exception: BaseException | None) -> None: ...


T = TypeVar("T")


V = TypeVar("V")


class _MadeOnFirstUse(Generic[V]):
    """An attribute whose value `make()` is made by its first read.

    The value lives in the instance attribute `held` (None, a class default, until
    then), which code that must not make it reads instead. It is made in one atomic
    step (`dict.setdefault`): two threads reading at once get the same object, so
    nothing put into it by one is lost with the other's.
    """

    def __init__(self, held: str, make: Callable[[], V]) -> None:
        self._held = held
        self._make = make

    def __get__(self, obj: object, owner: type | None = None) -> V:
        value: V | None = getattr(obj, self._held)
        if value is None:
            value = obj.__dict__.setdefault(self._held, self._make())
        return value

    def __set__(self, obj: object, value: V) -> None:  # settable, as the attribute it stands for
        setattr(obj, self._held, value)


class _FutureCondition(threading.Condition):
    """A `threading.Condition` over an RLock that makes objects only when someone waits.

    `Condition.__init__` copies the lock's `acquire`, `release`, `_release_save`,
    `_acquire_restore` and `_is_owned` onto each instance, and makes the deque of
    waiters: six more objects for the collector per future. Here the five are methods
    of the class, delegating to the lock, and the deque is made by the first `wait`;
    a `notify` with nobody waiting makes nothing. Everything else (`wait`, `with`) is
    `Condition`'s own code.
    """

    _queue: deque[Any] | None = None
    _waiters = _MadeOnFirstUse[deque[Any]]("_queue", deque)

    def __init__(self) -> None:  # no super().__init__(): it would bind the five
        self._lock: Any = threading.RLock()

    def __repr__(self) -> str:  # Condition's, minus making the queue to count it
        return f"<Condition({self._lock}, {len(self._queue or ())})>"

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return bool(self._lock.acquire(blocking, timeout))

    def release(self) -> None:
        self._lock.release()

    def _release_save(self) -> Any:
        return self._lock._release_save()

    def _acquire_restore(self, state: Any) -> None:
        self._lock._acquire_restore(state)

    def _is_owned(self) -> bool:
        return bool(self._lock._is_owned())

    def notify(self, n: int = 1) -> None:
        if self._queue is None:  # nobody ever waited: nothing to wake
            if not self._lock._is_owned():
                raise RuntimeError("cannot notify on un-acquired lock")
            return
        super().notify(n)

    def notify_all(self) -> None:
        self.notify(0 if self._queue is None else len(self._queue))


class EngineFuture(Future[T]):
    """A `concurrent.futures.Future`, made with three objects the collector tracks (itself,
    its Condition and that one's RLock) instead of eleven.

    The engine makes one per operation of `submit`/`submit_many`, and those of the
    operations in flight live long enough to be promoted to the oldest generation,
    whose full collections then walk the whole heap: with a plain `Future` the
    collector took a quarter of `submit_many`'s time. A `Future` is its Condition
    (seven objects: see `_FutureCondition`), its list of `wait`/`as_completed`
    waiters and its list of done-callbacks; here the Condition is two objects and
    each list is made by the first that uses it. It is a `Future` in every respect
    (`result`, callbacks, `cancel`, `wait`, `as_completed`, `asyncio.wrap_future`):
    `set_result` and `set_exception` are `Future`'s, reading the waiters only if some
    were installed.
    """

    _waiter_list: list[Any] | None = None
    _callback_list: list[Callable[[Future[T]], object]] | None = None
    _waiters = _MadeOnFirstUse[list[Any]]("_waiter_list", list)
    _done_callbacks = _MadeOnFirstUse[list[Callable[[Future[T]], object]]]("_callback_list", list)

    def __init__(self) -> None:  # no super().__init__(): it would make a full Condition
        self._condition = _FutureCondition()
        self._state = PENDING
        self._result = None
        self._exception = None

    def _invoke_callbacks(self) -> None:
        if self._callback_list is not None:
            super()._invoke_callbacks()  # type: ignore[misc]

    def set_result(self, result: T) -> None:
        self._finish(result, None, "add_result")

    def set_exception(self, exception: BaseException | None) -> None:
        self._finish(None, exception, "add_exception")

    def _finish(self, result: T | None, exception: BaseException | None, tell: str) -> None:
        """`Future.set_result`/`set_exception` (`tell`: the waiters' method to call)."""
        with self._condition:
            if self._state in _SETTLED:
                raise InvalidStateError(f"{self._state}: {self!r}")
            self._result = result
            self._exception = exception
            self._state = FINISHED
            if self._waiter_list is not None:
                for waiter in self._waiter_list:
                    getattr(waiter, tell)(self)
            self._condition.notify_all()
        self._invoke_callbacks()


#: The states in which a future may not be answered again (`Future.set_result`'s test).
_SETTLED: Final = frozenset((CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED))


class Reply:
    """The answer of one blocking call (`deposit`, `withdraw`, `transfer`): two locks.

    The caller waits on a lock the answerer releases: the cheapest hand-off between
    two threads (a `Future` adds a Condition, a waiter lock per wait, and its lists).
    Never cancelled; answered once (a second answer raises `InvalidStateError`).
    """

    __slots__ = ("_error", "_once", "_ready", "_result")

    def __init__(self) -> None:
        self._ready = threading.Lock()
        self._ready.acquire()  # released by the answer
        self._once = threading.Lock()  # taken by the (one) answer
        self._result: Any = None
        self._error: BaseException | None = None

    def set_running_or_notify_cancel(self) -> bool:
        return True

    def done(self) -> bool:
        return self._once.locked()

    def set_result(self, result: Any) -> None:
        if not self._once.acquire(False):
            raise InvalidStateError("this call is already answered")
        self._result = result
        self._ready.release()

    def set_exception(self, exception: BaseException | None) -> None:
        if not self._once.acquire(False):
            raise InvalidStateError("this call is already answered")
        self._error = exception
        self._ready.release()

    def wait(self) -> Any:
        """Block until answered; returns the result or raises the refusal."""
        self._ready.acquire()
        self._ready.release()  # a second wait returns at once
        if self._error is not None:
            raise self._error
        return self._result


#: A slot not filled yet (never a valid outcome).
_EMPTY: Any = object()


class BatchAnswer:
    """The outcomes of one batch, and the single future that delivers them.

    Every field is guarded by `_lock` (slots are filled by the ledger writer, by a
    worker for an answer that needs no commit, or by the submitting caller for a
    chunk the queue refused). The future is completed outside the lock, by whoever
    fills the last slot, so its done-callbacks never run under it.
    """

    __slots__ = ("_cancelled", "_left", "_lock", "_results", "_started", "future")

    def __init__(self, size: int) -> None:
        assert size >= 1, "an empty batch is refused before it gets here"
        self.future: Future[list[Outcome]] = EngineFuture()
        self._results: list[Any] = [_EMPTY] * size
        self._left = size
        self._lock = lockcheck.lock("batch")
        self._started = False
        self._cancelled = False

    def slots(self) -> list[BatchSlot]:
        """One answer per command, in order."""
        return [BatchSlot(self, i) for i in range(len(self._results))]

    def start(self) -> bool:
        """The first command of the batch starts: False if the batch was cancelled first.

        `Future.cancel()` succeeds only while the batch is pending, so a batch is
        either cancelled before any of it was applied (no command runs, no key is
        claimed), or runs to the end with an outcome for every command.
        """
        with self._lock:
            if not self._started:
                self._started = True
                self._cancelled = not self.future.set_running_or_notify_cancel()
            return not self._cancelled

    def filled(self, index: int) -> bool:
        """True once slot `index` has its outcome."""
        with self._lock:
            return self._results[index] is not _EMPTY

    def fill(self, index: int, outcome: Any) -> None:
        """Give slot `index` its outcome; the last one completes the future.

        Raises `InvalidStateError` for a slot already filled (as `Future.set_result`
        does for a second answer). A cancelled batch ignores the fills of chunks
        that never reached the queue.
        """
        with self._lock:
            if self._results[index] is not _EMPTY:
                raise InvalidStateError(f"batch slot {index} is already answered")
            self._results[index] = outcome
            self._left -= 1
            if self._left or self._cancelled:
                return
        self.future.set_result(self._results)  # nobody writes the list any more


class BatchSlot:
    """One command's place in a `BatchAnswer`: the `Answer` the pipeline fills."""

    __slots__ = ("batch", "index")

    def __init__(self, batch: BatchAnswer, index: int) -> None:
        self.batch = batch
        self.index = index

    def set_running_or_notify_cancel(self) -> bool:
        return self.batch.start()

    def done(self) -> bool:
        return self.batch.filled(self.index)

    def set_result(self, result: Any) -> None:
        self.batch.fill(self.index, result)

    def set_exception(self, exception: BaseException | None) -> None:
        self.batch.fill(self.index, exception)

    def __repr__(self) -> str:
        return f"<BatchSlot {self.index} of {len(self.batch._results)}>"


__all__ = ["Answer", "BatchAnswer", "BatchSlot", "EngineFuture", "Outcome", "Reply"]


def _check_future_is_an_answer(future: Future[Receipt]) -> Answer:
    """mypy checks here that a Future satisfies `Answer` (never called)."""
    return future
