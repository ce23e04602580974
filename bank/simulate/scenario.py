"""What the scenario scripts in `scripts/` share: arguments, a ledger, tellers, checks.

Scripts import from here (never the reverse). Each scenario opens a bank, runs
its tellers under a watchdog, states its own expectations with `Checks.expect`
and ends with `Checks.finish`, which audits the ledger and returns the exit
code: 0 only if every expectation held and the audit is clean.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import TextIO

from bank.commands import AnyCommand
from bank.engine import Bank
from bank.errors import BankError
from bank.limits import QUEUE_CAPACITY_DEFAULT, WORKERS_DEFAULT
from bank.money import format_minor
from bank.records import Receipt

#: Exit status of a scenario script whose tellers hung (see `run_tellers`); not 3, which
#: `bank.exit_codes` gives to a failed `simulate --threshold`.
EXIT_HANG = 4
#: How long a scenario's tellers may run before the watchdog calls it a hang.
WATCHDOG_S_DEFAULT = 120.0


def scenario_parser(description: str) -> argparse.ArgumentParser:
    """A parser with the options every scenario has: --db, --workers, --durability, ..."""
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--db",
        metavar="PATH",
        help="ledger file (must not exist yet); default: a temporary ledger, deleted afterwards",
    )
    parser.add_argument("--workers", type=int, default=WORKERS_DEFAULT, help="bank worker threads")
    parser.add_argument(
        "--durability",
        choices=("full", "normal"),
        default="full",
        help="fsync every group commit (full) or only survive process crashes (normal)",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the scenario's choices")
    parser.add_argument(
        "--watchdog",
        type=float,
        default=WATCHDOG_S_DEFAULT,
        metavar="SECONDS",
        help="fail (and dump every thread's stack) if the tellers are not done by then",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="print only figures, failures and the verdict"
    )
    return parser


@contextmanager
def scenario_ledger(db: str | None) -> Iterator[str]:
    """The ledger path to use: `db` (refused if it exists), or a temporary one removed after."""
    if db is not None:
        if os.path.exists(db):
            raise SystemExit(f"{db} exists: scenarios start from a fresh ledger")
        yield db
        return
    tmpdir = tempfile.mkdtemp(prefix="bank-scenario-")
    try:
        yield os.path.join(tmpdir, "ledger.db")
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def open_bank(
    path: str, args: argparse.Namespace, *, queue_capacity: int = QUEUE_CAPACITY_DEFAULT
) -> Bank:
    """Open the scenario's bank with the common options."""
    return Bank.open(
        path, workers=args.workers, durability=args.durability, queue_capacity=queue_capacity
    )


class ScenarioTeller(threading.Thread):
    """A named teller thread that runs `work(index)` and keeps any exception for the checks."""

    def __init__(self, index: int, work: Callable[[int], None], start: threading.Event) -> None:
        super().__init__(name=f"teller-{index}")
        self.index = index
        self._work = work
        self._go = start
        self.error: BaseException | None = None

    def run(self) -> None:
        self._go.wait()
        try:
            self._work(self.index)
        except BaseException as exc:  # reported by run_tellers, never lost
            self.error = exc


def run_tellers(
    count: int, work: Callable[[int], None], *, watchdog_s: float, checks: Checks
) -> float:
    """Run `work(i)` on `count` tellers released together; returns the elapsed seconds.

    If a teller is still running after `watchdog_s` (a deadlock or a hang) every
    thread's stack is dumped to stderr and the check fails. A stuck teller would
    also keep the process alive, so when `checks.exit_on_hang` is set (scripts run
    from the command line) the process then exits at once with status `EXIT_HANG` (4).
    """
    start = threading.Event()
    tellers = [ScenarioTeller(i, work, start) for i in range(count)]
    for teller in tellers:
        teller.start()
    t0 = time.monotonic()
    start.set()
    deadline = t0 + watchdog_s
    for teller in tellers:
        teller.join(max(0.0, deadline - time.monotonic()))
    elapsed = time.monotonic() - t0
    stuck = [t.name for t in tellers if t.is_alive()]
    hung = f" (still running: {', '.join(stuck)})" if stuck else ""
    checks.expect(not stuck, f"all {count} tellers finish within {watchdog_s:g} s{hung}")
    if stuck:
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        if checks.exit_on_hang:
            sys.stderr.flush()
            os._exit(EXIT_HANG)
    for teller in tellers:
        if teller.error is not None:
            error = teller.error
            checks.expect(False, f"{teller.name} raised {type(error).__name__}: {error}")
    return elapsed


def submit_windowed(
    bank: Bank, commands: Iterable[AnyCommand], window: int
) -> list[Future[Receipt]]:
    """Submit `commands` in order with at most `window` in flight; return once all are answered.

    The window is a `BoundedSemaphore`: a permit is taken before each submit and
    given back by the future's done callback.
    """
    permits = threading.BoundedSemaphore(window)
    futures: list[Future[Receipt]] = []

    def give_back(_: Future[Receipt]) -> None:
        permits.release()

    for command in commands:
        permits.acquire()
        try:
            future = bank.submit(command)
        except BaseException:
            permits.release()
            raise
        future.add_done_callback(give_back)
        futures.append(future)
    for _ in range(window):  # every permit back: every future answered
        permits.acquire()
    return futures


def outcome(future: Future[Receipt]) -> Receipt | BaseException:
    """The receipt of an answered future, or the exception it was refused with."""
    error = future.exception()
    return future.result() if error is None else error


class Checks:
    """A scenario's expectations and figures; `finish` audits and gives the exit code."""

    def __init__(
        self,
        name: str,
        *,
        out: TextIO | None = None,
        quiet: bool = False,
        exit_on_hang: bool = False,
    ) -> None:
        self.name = name
        self.exit_on_hang = exit_on_hang
        self._out = out if out is not None else sys.stdout
        self._quiet = quiet
        self.failures: list[str] = []
        self.passed = 0

    def say(self, message: str) -> None:
        """Print a progress or figure line (unless quiet)."""
        if not self._quiet:
            print(f"{self.name}: {message}", file=self._out, flush=True)

    def figure(self, label: str, value: str) -> None:
        """Print one measured figure (also when quiet: figures are what a big run is for)."""
        print(f"{self.name}: {label:<28} {value}", file=self._out, flush=True)

    def expect(self, condition: bool, what: str) -> bool:
        """Record one expectation; a failed one is always printed."""
        if condition:
            self.passed += 1
            if not self._quiet:
                print(f"{self.name}: ok    {what}", file=self._out, flush=True)
        else:
            self.failures.append(what)
            print(f"{self.name}: FAIL  {what}", file=self._out, flush=True)
        return condition

    def conserved(self, bank: Bank) -> None:
        """Expect the sum of every balance, @cash included, to be exactly 0."""
        total = bank.snapshot().total
        self.expect(total == 0, f"money is conserved: the sum of all balances is {total}")

    def finish(self, bank: Bank) -> int:
        """Audit the ledger; 0 if every expectation held and the audit is clean, else 1."""
        try:
            report = bank.audit()
        except BankError as exc:
            self.expect(False, f"the audit ran ({type(exc).__name__}: {exc})")
        else:
            self.expect(
                report.ok,
                f"the audit is clean ({report.transfers_checked:,} transfers, "
                f"{report.problems_total} problem(s), head {report.head_hash[:16]})",
            )
            for problem in report.problems[:10]:
                print(f"{self.name}: audit: {problem.kind}: {problem.message}", file=self._out)
        verdict = "PASSED" if not self.failures else f"FAILED ({len(self.failures)} failure(s))"
        print(f"{self.name}: {verdict}, {self.passed} check(s) passed", file=self._out, flush=True)
        return 0 if not self.failures else 1


def rate(count: int, seconds: float) -> str:
    """`12,345 ops in 1.23 s (10,037 ops/s)`."""
    per_s = count / seconds if seconds > 0 else 0.0
    return f"{count:,} ops in {seconds:.2f} s ({per_s:,.0f} ops/s)"


def money(amount: int) -> str:
    """Minor units shown as major units, exact (never via float)."""
    return format_minor(amount)
