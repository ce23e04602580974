"""Recording a simulation's history: every operation and snapshot, for `bank check-history`.

`bank simulate --history FILE` writes JSON lines (UTF-8, one object per line):

```
{"format": "bank-history", "version": 1, "clock": "monotonic_ns", "ledger": "/abs/l.db",
 "seed": 7, "options": {"tellers": 8, "window": 8, ...}}                     <- header, first
{"type": "snapshot", "invoke": 10, "complete": 25, "seq": 2000, "balances": {"0": -9, ...}}
{"type": "op", "teller": 3, "n": 17, "kind": "transfer", "accounts": [5, 9], "amount": 1234,
 "key": null, "invoke": 31, "complete": 90, "outcome": "ok", "seq": 2017, "hash": "9f2c..."}
{"type": "op", ..., "outcome": "refused", "reason": "InsufficientFunds"}
{"type": "op", ..., "outcome": "unknown", "reason": "LedgerUnavailable"}
{"type": "snapshot", ..., "final": true}                   <- after every teller is done
{"type": "end", "ops": 20000, "interrupted": false}                          <- last line
```

- `invoke` / `complete` are `time.monotonic_ns()` of one process: taken just
  before the submit and in the future's done callback (so an interval always
  contains the real one: the checker's real-time rules stay sound).
- `accounts` is `[account]` for a deposit or withdrawal, `[source, target]` for a
  transfer; `amount` is int minor units. `(teller, n)` names the operation.
- `outcome`: `ok` (committed; `seq` and the first 16 hex digits of the receipt's
  chain `hash`), `refused` (a `BankError` that means nothing changed; `reason` is
  its class name) or `unknown` (`LedgerUnavailable`, a cancelled future, or any
  other exception: the operation may or may not be in the ledger).
- `snapshot` lines are `Bank.snapshot()` reads: one before the tellers start,
  periodic ones during the run, and a `final` one after the run.
- Lines other than the header and `end` come in completion order per teller,
  not globally sorted. A file without its `end` line is from a run that did not
  finish; the checker then cannot tell a phantom write from an unrecorded one.

Cost: nothing when `--history` is not given (the teller takes its plain path).
With it, the done callback (on the ledger writer thread) only reads the clock
and appends to a deque; the teller formats lines and writes them in chunks
under one lock.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import CancelledError, Future
from pathlib import Path
from types import TracebackType
from typing import Final, NamedTuple, TextIO

from bank.commands import AnyCommand, Transfer
from bank.errors import BankError, LedgerUnavailable
from bank.limits import JOIN_WAIT_S_MAX
from bank.records import Receipt, Snapshot

FORMAT_NAME: Final = "bank-history"
FORMAT_VERSION: Final = 1
CLOCK_NAME: Final = "monotonic_ns"
#: Hex digits of a receipt's chain hash kept per operation (64 bits: names the row).
HASH_DIGITS: Final = 16
#: Lines a teller buffers before it writes them to the file.
CHUNK_LINES: Final = 2048
#: How often the run reads a snapshot while the tellers work.
SNAPSHOT_INTERVAL_S: Final = 0.5


class _Answered(NamedTuple):
    """One answered operation, queued by the done callback for its teller to format.

    A NamedTuple built with `tuple.__new__`: the callback runs on the ledger
    writer's thread, so it must cost as little as a tuple.
    """

    n: int
    command: AnyCommand
    invoke: int
    complete: int
    answer: Future[Receipt] | Receipt | BaseException


_new_answered = tuple.__new__


def _command_fields(command: AnyCommand) -> str:
    """The `kind`, `accounts`, `amount` and `key` members of an op line (JSON text)."""
    key = "null" if command.key is None else json.dumps(command.key)
    if isinstance(command, Transfer):
        accounts = f"{command.source}, {command.target}"
    else:
        accounts = str(command.account)
    return f'"kind": "{command.kind}", "accounts": [{accounts}], "amount": {command.amount}, "key": {key}'


def _answer_of(answer: Future[Receipt] | Receipt | BaseException) -> Receipt | BaseException:
    if not isinstance(answer, Future):
        return answer
    try:
        return answer.result(0)  # one lock round: the common case is a receipt
    except BaseException as exc:  # every answer is recorded, none raised
        return exc


def outcome_fields(answer: Future[Receipt] | Receipt | BaseException) -> str:
    """The `outcome` members of an op line (JSON text) for a finished future or its outcome."""
    outcome = _answer_of(answer)
    if isinstance(outcome, Receipt):
        return f'"outcome": "ok", "seq": {outcome.seq}, "hash": "{outcome.hash[:HASH_DIGITS]}"'
    if isinstance(outcome, CancelledError):
        return '"outcome": "unknown", "reason": "Cancelled"'
    reason = type(outcome).__name__
    if isinstance(outcome, BankError) and not isinstance(outcome, LedgerUnavailable):
        return f'"outcome": "refused", "reason": "{reason}"'
    return f'"outcome": "unknown", "reason": {json.dumps(reason)}'


class TellerLog:
    """One teller's part of the history; `answered` may run on any thread, the rest on the teller's."""

    def __init__(self, recorder: HistoryRecorder, teller: int) -> None:
        self._recorder = recorder
        self._teller = teller
        self._next_n = 0
        # Appended by done callbacks (any thread; deque appends are documented
        # thread-safe), drained only by the teller in `flush`.
        self._answered: deque[_Answered] = deque()
        self._lines: list[str] = []

    def numbers(self, count: int) -> range:
        """Operation numbers for the next `count` submitted commands."""
        first = self._next_n
        self._next_n += count
        return range(first, first + count)

    def answered(self, n: int, command: AnyCommand, invoke: int, future: Future[Receipt]) -> None:
        """Done-callback part: stamp the completion, queue it (cheap: the writer thread runs it)."""
        self._answered.append(
            _new_answered(_Answered, (n, command, invoke, time.monotonic_ns(), future))
        )

    def answered_batch(
        self,
        first: int,
        commands: Sequence[AnyCommand],
        invoke: int,
        outcomes: Sequence[Receipt | BaseException],
    ) -> None:
        """Batch-callback part: operations `first, first + 1, ...` answered together."""
        complete = time.monotonic_ns()
        self._answered.extend(
            _new_answered(_Answered, (first + i, command, invoke, complete, outcome))
            for i, (command, outcome) in enumerate(zip(commands, outcomes, strict=True))
        )

    def flush(self, *, force: bool = False) -> None:
        """Format what was answered; write once a chunk is full (or `force`)."""
        answered = self._answered
        lines = self._lines
        prefix = f'{{"type": "op", "teller": {self._teller}, "n": '
        while answered:
            a = answered.popleft()
            lines.append(
                f"{prefix}{a.n}, {_command_fields(a.command)}, "
                f'"invoke": {a.invoke}, "complete": {a.complete}, {outcome_fields(a.answer)}}}\n'
            )
        if lines and (force or len(lines) >= CHUNK_LINES):
            self._recorder.write_lines(lines)
            self._lines = []


class HistoryRecorder:
    """Writes one run's history file (thread-safe); see the module docstring for the format."""

    def __init__(
        self,
        path: str | Path,
        *,
        ledger: str,
        seed: int,
        options: Mapping[str, object],
    ) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._out: TextIO = self.path.open("w", encoding="utf-8", buffering=1 << 20)
        self.ops = 0
        header = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "clock": CLOCK_NAME,
            "ledger": ledger,
            "seed": seed,
            "options": dict(options),
        }
        self._out.write(json.dumps(header) + "\n")

    def __enter__(self) -> HistoryRecorder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def teller(self, index: int) -> TellerLog:
        """The log of teller number `index`."""
        return TellerLog(self, index)

    def write_lines(self, lines: Sequence[str]) -> None:
        """Append op lines (each ends with a newline)."""
        with self._lock:
            self.ops += len(lines)
            self._out.write("".join(lines))

    def snapshot(self, read: Callable[[], Snapshot], *, final: bool = False) -> Snapshot:
        """Take `read()` (a `Bank.snapshot`) between two clock readings, record it, return it.

        Raises what `read` raises (nothing is recorded then).
        """
        invoke = time.monotonic_ns()
        snap = read()
        complete = time.monotonic_ns()
        record: dict[str, object] = {
            "type": "snapshot",
            "invoke": invoke,
            "complete": complete,
            "seq": snap.seq,
            "balances": {str(k): v for k, v in snap.balances.items()},
        }
        if final:
            record["final"] = True
        line = json.dumps(record) + "\n"
        with self._lock:
            self._out.write(line)
        return snap

    def end(self, *, interrupted: bool) -> None:
        """Write the `end` line: the run finished and every answered op is in the file."""
        with self._lock:
            self._out.write(
                json.dumps({"type": "end", "ops": self.ops, "interrupted": interrupted}) + "\n"
            )

    def close(self) -> None:
        """Flush and close the file (idempotent)."""
        with self._lock:
            if not self._out.closed:
                self._out.close()


class SnapshotReader(threading.Thread):
    """Reads a snapshot every `interval_s` until stopped (or the bank refuses)."""

    def __init__(
        self,
        recorder: HistoryRecorder,
        read: Callable[[], Snapshot],
        *,
        interval_s: float = SNAPSHOT_INTERVAL_S,
    ) -> None:
        # An observer: it must never hold up the interpreter's exit.
        super().__init__(name="history-snapshots", daemon=True)
        self._recorder = recorder
        self._read = read
        self._interval_s = interval_s
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self._interval_s):
            try:
                self._recorder.snapshot(self._read)
            except BankError:  # the bank broke or closed: nothing more to read
                return

    def stop(self, timeout_s: float = JOIN_WAIT_S_MAX) -> None:
        """Ask the thread to end and wait for it, at most `timeout_s`."""
        self._stop_event.set()
        self.join(timeout_s)
