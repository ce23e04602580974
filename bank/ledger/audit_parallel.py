"""The fast path's processes: each checks some seq ranges through its own connection to
the same snapshot (`SnapshotToken`), and the parent joins the results.

No database code here: a token names the backend module that reopens the snapshot
(`open_range_reader`). Never a plain fork of a process with threads (see `_context`).
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Final

from bank.ledger.audit_chain import Formats
from bank.ledger.audit_events import LimitEvent
from bank.ledger.audit_ranges import RangeSummary, check_range, split
from bank.ledger.backend import RangeReader, RangeReaderOpener, SnapshotToken
from bank.ledger.backends import backend_module_names

#: Below this many transfers one process is faster than starting several.
PARALLEL_ROWS_MIN: Final = 200_000
#: Processes at most (the work is CPU-bound: one per core).
PROCESSES_MAX: Final = 16


def processes_default() -> int:
    """One process per core this process may run on."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, PROCESSES_MAX))


def _check_one(
    token: SnapshotToken,
    lo: int,
    hi: int,
    limit_events: Sequence[LimitEvent],
    formats: Formats,
    running: bool = True,
) -> RangeSummary:
    """In a worker: open the snapshot again and check `lo..hi`."""
    opener: RangeReaderOpener = importlib.import_module(token.module).open_range_reader
    with opener(token) as reader:
        prev = reader.hash_before(lo)
        rows = reader.transfer_rows(lo, hi)
        return check_range(lo, hi, prev, rows, limit_events, formats, running, own_process=True)


def _context() -> multiprocessing.context.BaseContext:
    """'fork' from a process with one thread (the CLI, a script: no re-import, no start-up
    cost); 'forkserver' from one with threads (a `Bank`'s own audit: a fork could copy a
    lock another thread holds), with this module preloaded in the server."""
    if threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__, *_importable(backend_module_names("snapshot"))])
    return context


def _importable(names: tuple[str, ...]) -> list[str]:
    """The backend snapshot modules the fork server can import (each worker then forks
    warm): not PostgreSQL's without its driver, whose import raises a `BankError` that
    would kill the fork server (the `postgres` extra is optional)."""
    found = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # that backend is not installed: its ledgers are not audited here
            continue
        found.append(name)
    return found


#: Ranges per process: more than one lets the parent, and a process that a busy core
#: slowed down, take over ranges no worker has started.
RANGES_PER_PROCESS: Final = 4


class RangeJobs:
    """Ranges of transfers being checked by worker processes, started before the parent's
    own checks so that both run at once.

    `finish(local)` has the parent check, through its own snapshot, every range no
    worker has started yet (from the last one back), then collects the rest in seq
    order. A range whose worker failed (a driver error, a killed worker) comes back
    unclean, so the caller falls back to the exact pass in its own snapshot.
    """

    def __init__(
        self,
        token: SnapshotToken,
        last_seq: int,
        limit_events: Sequence[LimitEvent],
        formats: Formats,
        processes: int,
        running: bool = True,
    ) -> None:
        self._events = list(limit_events)
        self._formats = formats
        self._running = running
        self._ranges = split(1, last_seq, processes * RANGES_PER_PROCESS)
        self._pool = ProcessPoolExecutor(max_workers=processes, mp_context=_context())
        try:
            self._futures = [
                self._pool.submit(_check_one, token, lo, hi, self._events, formats, running)
                for lo, hi in self._ranges
            ]
        except BaseException:
            self.cancel()
            raise

    def finish(self, local: RangeReader) -> list[RangeSummary]:
        """Every range's summary, in seq order (the parent checks the unstarted ones)."""
        summaries: dict[int, RangeSummary] = {}
        try:
            for i in range(len(self._ranges) - 1, -1, -1):
                if not self._futures[i].cancel():
                    break
                lo, hi = self._ranges[i]
                summaries[i] = check_range(
                    lo,
                    hi,
                    local.hash_before(lo),
                    local.transfer_rows(lo, hi),
                    self._events,
                    self._formats,
                    self._running,
                )
            for i, future in enumerate(self._futures):
                if i in summaries:
                    continue
                try:
                    summaries[i] = future.result()
                except Exception:  # any failure only means: audit this range the exact way
                    lo, hi = self._ranges[i]
                    summaries[i] = RangeSummary(lo, hi, clean=False)
        finally:
            self.cancel()
        return [summaries[i] for i in range(len(self._ranges))]

    def cancel(self) -> None:
        """Stop: cancel what has not started and wait for the workers to exit."""
        self._pool.shutdown(wait=True, cancel_futures=True)
