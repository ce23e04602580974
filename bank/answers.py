"""Where an operation's answer goes: its own `Future`, or one slot of a batch's list.

The workers and the ledger writer answer through the small `Answer` protocol, which a
`concurrent.futures.Future` already satisfies. `submit_batch` gives each command a
`BatchSlot` instead (two fields, no lock, no Condition): filling the last slot of a
`BatchAnswer` completes the batch's one future with the list of outcomes, in order.
A Future costs a Condition, an RLock and two lists per operation; a slot costs one
small object, and the batch's lock is taken once per slot filled.
"""

from __future__ import annotations

from concurrent.futures import Future, InvalidStateError
from typing import Any, Protocol

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
        self.future: Future[list[Outcome]] = Future()
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


__all__ = ["Answer", "BatchAnswer", "BatchSlot", "Outcome"]


def _check_future_is_an_answer(future: Future[Receipt]) -> Answer:
    """mypy checks here that a Future satisfies `Answer` (never called)."""
    return future
