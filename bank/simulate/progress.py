"""Live progress of a simulation: a rich progress bar on a terminal, plain lines elsewhere.

The runner's main thread calls `update` a few times a second while it waits for
the tellers; the display never touches the bank, so it cannot slow it down
beyond the cost of drawing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, TextIO

if TYPE_CHECKING:  # rich is imported only when a live bar is drawn
    from rich.console import Console
    from rich.progress import TaskID

#: Plain (non-terminal) output prints at most one line per this many seconds.
PLAIN_LINE_INTERVAL_S = 1.0


@dataclass(frozen=True, slots=True)
class Reading:
    """What the progress display shows at one instant."""

    elapsed_s: float
    completed: int
    committed: int
    rejected: int
    queue_depth: int
    ops_s: float


class ProgressDisplay(Protocol):
    """Something that shows readings; a context manager around the run."""

    def __enter__(self) -> ProgressDisplay: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def update(self, reading: Reading) -> None: ...

    def note(self, message: str) -> None: ...


class NoProgress:
    """Shows nothing (`--no-progress`, and library callers by default)."""

    def __enter__(self) -> NoProgress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    def update(self, reading: Reading) -> None:
        """Ignore the reading."""

    def note(self, message: str) -> None:
        """Ignore the message."""


def _target_text(total_ops: int | None, duration_s: float | None) -> str:
    if total_ops is not None:
        return f"{total_ops:,} ops"
    return f"{duration_s:g} s"


class PlainProgress:
    """One line per second, for logs and pipes."""

    def __init__(
        self,
        out: TextIO,
        *,
        total_ops: int | None,
        duration_s: float | None,
        interval_s: float = PLAIN_LINE_INTERVAL_S,
    ) -> None:
        self._out = out
        self._total_ops = total_ops
        self._duration_s = duration_s
        self._interval_s = interval_s
        self._next_t = time.monotonic() + interval_s

    def __enter__(self) -> PlainProgress:
        target = _target_text(self._total_ops, self._duration_s)
        print(f"simulate: running {target}", file=self._out, flush=True)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    def update(self, reading: Reading) -> None:
        """Print a line if a second has passed since the last one."""
        now = time.monotonic()
        if now < self._next_t:
            return
        self._next_t = now + self._interval_s
        done = f"{reading.completed:,}"
        if self._total_ops:
            done += f"/{self._total_ops:,} ({100 * reading.completed / self._total_ops:.0f}%)"
        print(
            f"[{reading.elapsed_s:6.1f} s] {done} ops  {reading.ops_s:,.0f} ops/s  "
            f"committed {reading.committed:,}  rejected {reading.rejected:,}  "
            f"queue {reading.queue_depth:,}",
            file=self._out,
            flush=True,
        )

    def note(self, message: str) -> None:
        """Print `message` on its own line."""
        print(message, file=self._out, flush=True)


class LiveProgress:
    """A rich progress bar with ops/s, committed, rejected and queue depth."""

    def __init__(
        self, console: Console, *, total_ops: int | None, duration_s: float | None
    ) -> None:
        from rich.progress import (
            BarColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self._total_ops = total_ops
        self._duration_s = duration_s
        self._progress = Progress(
            BarColumn(bar_width=20),
            TaskProgressColumn(),
            TextColumn(
                "{task.fields[ops_s]:>7,.0f} ops/s  committed {task.fields[committed]:,}  "
                "rejected {task.fields[rejected]:,}  queue {task.fields[queue]:,}"
            ),
            TimeElapsedColumn(),
            console=console,
            refresh_per_second=8,
            transient=False,
        )
        total = float(total_ops) if total_ops is not None else duration_s
        self._task: TaskID = self._progress.add_task(
            "simulate", total=total, ops_s=0.0, committed=0, rejected=0, queue=0
        )

    def __enter__(self) -> LiveProgress:
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()

    def update(self, reading: Reading) -> None:
        """Move the bar (by operations, or by time for `--duration`)."""
        done = float(reading.completed) if self._total_ops is not None else reading.elapsed_s
        self._progress.update(
            self._task,
            completed=done,
            ops_s=reading.ops_s,
            committed=reading.committed,
            rejected=reading.rejected,
            queue=reading.queue_depth,
        )

    def note(self, message: str) -> None:
        """Print `message` above the bar."""
        self._progress.console.print(message, markup=False, highlight=False)


def progress_for(
    out: TextIO, *, total_ops: int | None, duration_s: float | None, enabled: bool = True
) -> ProgressDisplay:
    """A live bar when `out` is a terminal, plain lines otherwise, nothing if not `enabled`."""
    if not enabled:
        return NoProgress()
    if out.isatty():
        from rich.console import Console

        console = Console(file=out)
        return LiveProgress(console, total_ops=total_ops, duration_s=duration_s)
    return PlainProgress(out, total_ops=total_ops, duration_s=duration_s)
