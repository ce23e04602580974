"""The load simulation: teller threads, their in-flight windows, and the run's result.

```
main thread:  open bank, open+fund accounts, start tellers, release them together
              (start Event), show progress, stop them (stop Event: --duration, Ctrl-C),
              wait for every in-flight answer, then audit
teller-N:     closed loop: wait for room in its window, submit as many as fit in one
              batch; open model (--rate): sleep until the next operation is due, then
              submit every due operation that fits, late ones included
              -> one callback per batch records the answers and frees the slots
observer:     daemon thread; every interval: ops/s, latency histogram, queue depth
```

The batch callback runs on the bank thread that answered the batch, so it does
the least possible: take the time, count the outcomes, append the latency to
flat arrays (`Metrics.record`, one lock acquisition) and free the window.
Percentiles are computed only when shown.

Open model (wrk2's coordinated-omission correction). Each operation has an
intended start from the schedule (`bank.simulate.schedule`); its latency runs
from there, not from when the teller got round to sending it. An operation is
*late* when it is sent more than `LATE_AFTER_MS` after its intended start (the
teller's window was full, or the teller did not get the CPU), and *dropped*
when it was due before the run stopped (the end of `--duration`, Ctrl-C) but
was never sent. A `--ops` run sends every operation, however late, so it only
drops on Ctrl-C.
"""

from __future__ import annotations

import bisect
import math
import queue
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any, cast

from bank.answers import Outcome as BankOutcome
from bank.commands import AnyCommand, BankCommand, Deposit, Post, Void
from bank.engine import Bank
from bank.errors import BankClosed, BankError, LedgerUnavailable
from bank.exit_codes import EXIT_INTERRUPTED, EXIT_OK, EXIT_PROBLEM
from bank.limits import QUEUE_CAPACITY_DEFAULT, SUBMIT_CHUNK_OPS_MAX, WORKERS_DEFAULT
from bank.records import Receipt
from bank.simulate.history import HistoryRecorder, SnapshotReader, TellerLog
from bank.simulate.metrics import INTERVAL_S_MIN, LatencySummary, Metrics, Observer, Sample, Totals
from bank.simulate.progress import NoProgress, ProgressDisplay, Reading
from bank.simulate.schedule import ARRIVALS, Arrivals, Rate, Schedule, parse_rate
from bank.simulate.tuning import throughput_gc
from bank.simulate.workload import (
    MIX_DEFAULT,
    HoldPlan,
    InvalidWorkload,
    LinkedPayment,
    Mix,
    Op,
    Skew,
    TellerStream,
    WorkloadSpec,
    parse_mix,
    parse_skew,
    split_ops,
)

TELLERS_DEFAULT = 8
TELLERS_MAX = 1024
WINDOW_DEFAULT = 32
WINDOW_MAX = 4096
ACCOUNTS_DEFAULT = 1000
ACCOUNTS_MAX = 1_000_000
OPS_DEFAULT = 20_000
#: Every simulated customer starts with 1,000.00.
INITIAL_BALANCE_DEFAULT = 100_000
#: Simulation accounts are named like this (found again when a ledger is reused).
ACCOUNT_NAME_FORMAT = "sim-{:06d}"
DURABILITIES = ("full", "normal")
GC_MODES = ("default", "throughput")
#: How often a teller waiting for window room looks at the stop event.
PERMIT_WAIT_S = 0.05
#: How often the main thread refreshes the progress display.
PROGRESS_INTERVAL_S = 0.2
#: An open-model operation sent more than this after its intended start is late.
LATE_AFTER_MS = 10
LATE_AFTER_NS = LATE_AFTER_MS * 1_000_000
#: Open model: a teller sends at most once per tick; what falls due meanwhile goes in one
#: batch. Waking for every operation starved the bank's own threads of the GIL (at half
#: the closed-loop maximum, 4 tellers: 30% late against 7% with a 1-ms tick).
SEND_TICK_NS = 1_000_000
#: The holds' `expires_s` when the mix has holds and no --hold-expiry is given.
HOLD_EXPIRY_DEFAULT_S = 1.0
#: Bounds on --hold-expiry (seconds).
HOLD_EXPIRY_MAX_S = 86_400.0


@dataclass(frozen=True, slots=True)
class SimulationConfig:
    """Everything that defines a run (`bank simulate`'s options)."""

    db: str
    tellers: int = TELLERS_DEFAULT
    window: int = WINDOW_DEFAULT
    workers: int = WORKERS_DEFAULT
    accounts: int = ACCOUNTS_DEFAULT
    ops: int | None = OPS_DEFAULT
    duration_s: float | None = None
    mix: Mix = field(default_factory=lambda: parse_mix(MIX_DEFAULT))
    skew: Skew = field(default_factory=lambda: Skew("uniform"))
    seed: int = 0
    initial_balance: int = INITIAL_BALANCE_DEFAULT
    durability: str = "full"
    queue_capacity: int = QUEUE_CAPACITY_DEFAULT
    #: Open model: the target rate over all tellers (None: closed loop).
    rate: Rate | None = None
    arrival: str = "fixed"
    #: The observer's interval in seconds (None: adapt to the run's length).
    interval_s: float | None = None
    #: "default": CPython's collector as the application has it (what users meet);
    #: "throughput": `bank.simulate.tuning.throughput_gc` during the run, to compare.
    gc: str = "default"
    #: The holds' `expires_s` (None: `HOLD_EXPIRY_DEFAULT_S`); only with hold=N in the mix.
    hold_expiry_s: float | None = None

    def __post_init__(self) -> None:
        def bounded(name: str, value: int, low: int, high: int) -> None:
            if type(value) is not int or not low <= value <= high:
                raise InvalidWorkload(f"{name} must be an int from {low} to {high}, got {value!r}")

        bounded("tellers", self.tellers, 1, TELLERS_MAX)
        bounded("window", self.window, 1, WINDOW_MAX)
        bounded("accounts", self.accounts, 1, ACCOUNTS_MAX)
        if (self.ops is None) == (self.duration_s is None):
            raise InvalidWorkload("give exactly one of ops or duration_s")
        if self.mix.needs_two_accounts and self.accounts < 2:
            raise InvalidWorkload(
                "transfers, holds and linked payments need at least 2 accounts "
                "(or give them weight 0)"
            )
        if self.hold_expiry_s is not None:
            if not self.mix.hold:
                raise InvalidWorkload("--hold-expiry needs holds in the mix (e.g. --mix hold=10)")
            expiry = self.hold_expiry_s
            if (
                type(expiry) not in (int, float)
                or not math.isfinite(expiry)
                or not 0 < expiry <= HOLD_EXPIRY_MAX_S
            ):
                raise InvalidWorkload(
                    f"hold expiry must be a number of seconds in (0, {HOLD_EXPIRY_MAX_S:g}], "
                    f"got {expiry!r}"
                )
        if self.mix.two_phase and self.rate is not None:
            raise InvalidWorkload(
                "holds and linked payments run in the closed loop only (drop --rate, or "
                "give hold=0,linked=0): a hold's follow-up has no place in the schedule"
            )
        if self.ops is not None:
            bounded("ops", self.ops, 1, 10**12)
        if self.duration_s is not None and not 0 < self.duration_s <= 7 * 86400:
            raise InvalidWorkload(f"duration must be in (0, 1 week] seconds, got {self.duration_s}")
        if self.durability not in DURABILITIES:
            raise InvalidWorkload(f"durability must be 'full' or 'normal', got {self.durability!r}")
        if self.gc not in GC_MODES:
            raise InvalidWorkload(f"gc must be 'default' or 'throughput', got {self.gc!r}")
        if self.arrival not in ARRIVALS:
            raise InvalidWorkload(f"arrival must be 'fixed' or 'poisson', got {self.arrival!r}")
        if self.arrival != "fixed" and self.rate is None:
            raise InvalidWorkload("--arrival poisson needs --rate (a closed loop has no arrivals)")
        if self.interval_s is not None and not INTERVAL_S_MIN <= self.interval_s <= 3600:
            raise InvalidWorkload(
                f"interval must be from {INTERVAL_S_MIN} to 3600 seconds, got {self.interval_s}"
            )

    @property
    def holds_expire_s(self) -> float | None:
        """The `expires_s` the run's holds carry (None when the mix has no holds)."""
        if not self.mix.hold:
            return None
        return HOLD_EXPIRY_DEFAULT_S if self.hold_expiry_s is None else self.hold_expiry_s

    def schedule(self) -> Schedule | None:
        """The open model's schedule (None for a closed loop)."""
        if self.rate is None:
            return None
        if self.duration_s is not None:
            return Schedule(self.rate, self.duration_s)
        assert self.ops is not None
        return Schedule.for_ops(self.rate, self.ops)

    def expected_s(self) -> float | None:
        """How long the run should last, when that is known before it starts."""
        schedule = self.schedule()
        if schedule is not None:
            return schedule.duration_s
        return self.duration_s

    @classmethod
    def from_specs(
        cls, *, mix: str, skew: str, rate: str | None = None, **kwargs: Any
    ) -> SimulationConfig:
        """Build a config from `--mix` / `--skew` / `--rate` texts (raises `InvalidWorkload`)."""
        return cls(
            mix=parse_mix(mix),
            skew=parse_skew(skew),
            rate=None if rate is None else parse_rate(rate),
            **kwargs,
        )


@dataclass(frozen=True, slots=True)
class AuditVerdict:
    """The part of the audit report a simulation result carries."""

    ok: bool
    problems: list[dict[str, Any]]
    problems_total: int
    seq: int
    head_hash: str


@dataclass(frozen=True, slots=True)
class ScheduleReport:
    """How an open-model run kept its schedule (see the module docstring for late/dropped)."""

    rate: Rate
    arrival: str
    #: Operations due by the schedule before the run stopped.
    due: int
    submitted: int
    late: int
    dropped: int
    #: The largest delay between an operation's intended start and its submit.
    lag_max_ms: float
    #: Latency from each batch's actual submit: what a closed loop would have reported.
    service: LatencySummary
    late_after_ms: int = LATE_AFTER_MS

    @property
    def late_pct(self) -> float:
        """Late operations, in % of those sent."""
        return 100 * self.late / self.submitted if self.submitted else 0.0

    @property
    def dropped_pct(self) -> float:
        """Dropped operations, in % of those due."""
        return 100 * self.dropped / self.due if self.due else 0.0


@dataclass(frozen=True, slots=True)
class SimulationResult:
    """What a run did; `report.result_json` turns it into the `--json` document."""

    config: SimulationConfig
    totals: Totals
    duration_s: float
    latency: LatencySummary
    samples: list[Sample]
    queue_high_water: int
    queue_capacity: int
    #: SQLite transactions the ledger writer committed during the run (setup excluded).
    group_commits: int
    ledger_seq: int
    total_balance: int
    audit: AuditVerdict
    interrupted: bool = False
    errors: list[str] = field(default_factory=list)
    per_teller_ops: list[int] = field(default_factory=list)
    commands: dict[int, list[Op]] | None = None
    schedule: ScheduleReport | None = None
    #: Operations sent, by kind ("linked": a payment and its fee as one group).
    kinds: dict[str, int] = field(default_factory=dict)
    #: The observer's final interval in seconds (it adapts unless --interval is given).
    interval_s: float = 0.0

    @property
    def ops(self) -> int:
        """Operations answered (committed + rejected)."""
        return self.totals.completed

    @property
    def throughput_ops_s(self) -> float:
        """Answered operations per second of the run."""
        return self.ops / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def rejected_pct(self) -> float:
        """Refused operations, in % of those answered."""
        return 100 * self.totals.rejected_total / self.ops if self.ops else 0.0

    @property
    def ok(self) -> bool:
        """The audit is clean, money is conserved and no teller hit an error."""
        return self.audit.ok and self.total_balance == 0 and not self.errors

    def exit_code(self) -> int:
        """`EXIT_PROBLEM` if anything is wrong, else `EXIT_INTERRUPTED` if Ctrl-C cut the run
        short, else `EXIT_OK` (`bank simulate` adds `EXIT_THRESHOLD` for its thresholds)."""
        if not self.ok:
            return EXIT_PROBLEM
        return EXIT_INTERRUPTED if self.interrupted else EXIT_OK


#: One answered operation of a batch: its receipt, or what it was refused or failed with.
Outcome = Receipt | list[Receipt] | BaseException
#: Answers that are not refusals (the operation's fate is unknown, or the run broke).
_ERROR_TYPES: tuple[type[BaseException], ...] = (LedgerUnavailable, BankClosed)


def classify(outcomes: Sequence[Outcome]) -> tuple[int, dict[str, int] | None, int]:
    """(committed, rejected by reason or None, errors) of one answered batch."""
    refused = [o for o in outcomes if type(o) is not Receipt and type(o) is not list]
    if not refused:
        return len(outcomes), None, 0
    rejected: dict[str, int] = {}
    errors = 0
    for exc in refused:
        reason = "Cancelled" if isinstance(exc, CancelledError) else type(exc).__name__
        rejected[reason] = rejected.get(reason, 0) + 1
        if not isinstance(exc, BankError) or isinstance(exc, _ERROR_TYPES):
            errors += 1
    return len(outcomes) - len(refused), rejected, errors


def submit_batch(
    bank: Bank, commands: Sequence[BankCommand], on_done: Callable[[Sequence[Outcome]], None]
) -> None:
    """`Bank.submit_batch(commands)`; `on_done(outcomes)` runs once, when all are answered.

    One future and one callback per batch. `on_done` runs on whichever thread
    answers the batch (a bank thread): it must be short and must not wait on the
    bank. A future that fails as a whole (cancelled, the bank broke before
    answering) gives every command that exception.
    """
    future = bank.submit_batch(commands)
    n = len(commands)

    def done(f: Future[list[BankOutcome]]) -> None:
        if f.cancelled():
            on_done([CancelledError()] * n)
            return
        exc = f.exception()
        on_done([exc] * n if exc is not None else f.result())

    future.add_done_callback(done)


@dataclass(slots=True)
class RunClock:
    """The instant the tellers were released (perf_counter_ns), shared by the open-model tellers."""

    start_ns: int = 0


class Teller(threading.Thread):
    """A simulated teller: serves its own command stream with up to `window` ops in flight.

    Closed loop (`times` is None): whenever answers free room in the window it
    submits as many operations as fit, in one batch. Open model: operations are
    due at the times `times` gives (seconds from the start); the teller sends
    every operation that is due, in one batch, as soon as the window has room,
    and each latency is measured from the operation's intended start.
    """

    def __init__(
        self,
        index: int,
        bank: Bank,
        stream: TellerStream,
        *,
        quota: int | None,
        window: int,
        start: threading.Event,
        stop: threading.Event,
        metrics: Metrics,
        on_error: Callable[[str], None],
        keep_commands: bool = False,
        log: TellerLog | None = None,
        times: Arrivals | None = None,
        clock: RunClock | None = None,
        end_s: float | None = None,
    ) -> None:
        super().__init__(name=f"teller-{index}")
        self.index = index
        self._bank = bank
        self._stream = stream
        self._quota = quota
        self._window_size = window
        self._batch_max = min(window, SUBMIT_CHUNK_OPS_MAX)
        # The window: operations in flight, counted by this teller only; answers hand
        # the slots they free back through a SimpleQueue (C, thread-safe: one put per
        # batch on the answering thread, no Python-level lock or notify).
        self._in_flight = 0
        self._freed: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._go = start
        self._halt = stop
        self._metrics = metrics
        self._on_error = on_error
        self.submitted = 0
        #: Open model: operations due before the run stopped that were never sent.
        self.dropped = 0
        self.commands: list[Op] | None = [] if keep_commands else None
        #: Operations sent, by kind (counted on this teller's thread only).
        self.kinds: dict[str, int] = {}
        # Holds' follow-ups: the answer of a hold puts its post/void (None: nothing to
        # send, refused or left to expire) here; `_awaiting` counts the holds whose
        # answer has not been taken yet, so the teller knows when it is done.
        self._followups: queue.SimpleQueue[Post | Void | None] = queue.SimpleQueue()
        self._ready: deque[Post | Void] = deque()
        self._awaiting = 0
        # Only with --history: without it the teller never touches the clock twice.
        self._log = log
        self._times = times
        self._clock = clock if clock is not None else RunClock()
        self._end_s = end_s

    def run(self) -> None:
        try:
            self._go.wait()
            if self._times is None:
                self._serve_closed()
            else:
                self._serve_open(self._times)
        except BaseException as exc:  # never die silently: the run must know
            self._on_error(f"{self.name}: {type(exc).__name__}: {exc}")
            self._halt.set()
        finally:
            self._drain()

    def _collect(self) -> None:
        """Take back the slots that answers freed (this teller's thread only)."""
        freed = self._freed
        while True:
            try:
                self._in_flight -= freed.get_nowait()
            except queue.Empty:
                return

    def _reserve(self, limit: int) -> int:
        """Wait for room in the window, then take up to `limit` slots (0 if the run stops)."""
        self._collect()
        while self._in_flight >= self._window_size:
            if self._halt.is_set():
                return 0
            try:
                self._in_flight -= self._freed.get(timeout=PERMIT_WAIT_S)
            except queue.Empty:
                if self._log is not None:
                    self._log.flush()
                continue
            self._collect()
        n = min(limit, self._window_size - self._in_flight)
        self._in_flight += n
        return n

    def _release(self, n: int) -> None:
        """Give `n` slots back (any thread: the answering one, or this teller on an error)."""
        self._freed.put(n)

    def _send(
        self,
        commands: Sequence[BankCommand],
        on_done: Callable[[Sequence[Outcome]], None],
        *,
        keep: bool = True,
    ) -> None:
        if keep and self.commands is not None:
            self.commands.extend(commands)
        try:
            submit_batch(self._bank, commands, on_done)
        except BaseException:
            self._release(len(commands))
            raise
        self.submitted += len(commands)
        for command in commands:
            self.kinds[command.kind] = self.kinds.get(command.kind, 0) + 1
        if self._log is not None:
            self._log.flush()

    def _send_ops(self, ops: list[Op]) -> None:
        """Send a mix with holds or linked payments: the commands (holds included) in one
        batch, each linked payment as its own group; every operation holds one slot."""
        t0 = time.perf_counter_ns()
        commands: list[BankCommand] = []
        plans: list[tuple[int, HoldPlan]] = []
        linked: list[LinkedPayment] = []
        for op in ops:
            if isinstance(op, LinkedPayment):
                linked.append(op)
            elif isinstance(op, HoldPlan):
                plans.append((len(commands), op))
                commands.append(op.hold)
            else:
                commands.append(op)
        if self.commands is not None:
            self.commands.extend(op for op in ops if not isinstance(op, LinkedPayment))
        if commands:
            self._awaiting += len(plans)
            try:
                self._send(
                    commands, partial(self._answered_holds, plans, t0, len(commands)), keep=False
                )
            except BaseException:
                self._awaiting -= len(plans)
                raise
        for payment in linked:
            if self.commands is not None:
                self.commands.append(payment)
            try:
                future = self._bank.submit_linked(payment.commands)
            except BaseException:
                self._release(1)
                raise
            future.add_done_callback(partial(self._answered_linked, t0))
            self.submitted += 1
            self.kinds["linked"] = self.kinds.get("linked", 0) + 1

    def _answered_holds(
        self, plans: list[tuple[int, HoldPlan]], t0: int, n: int, outcomes: Sequence[Outcome]
    ) -> None:
        """Batch callback with holds: queue each hold's follow-up for its teller first."""
        for index, plan in plans:
            receipt = outcomes[index]
            follow_up = plan.follow_up(receipt.seq) if isinstance(receipt, Receipt) else None
            self._followups.put(follow_up)
        self._answered(t0, n, outcomes)

    def _answered_linked(self, t0: int, future: Future[list[Receipt]]) -> None:
        """A linked payment's answer: one operation, committed or refused as a whole."""
        if future.cancelled():
            outcome: Outcome = CancelledError()
        else:
            exc = future.exception()
            outcome = future.result() if exc is None else exc
        self._answered(t0, 1, [outcome])

    def _gather_followups(self) -> None:
        """Take the follow-ups that hold answers queued (this teller's thread only)."""
        while True:
            try:
                follow_up = self._followups.get_nowait()
            except queue.Empty:
                return
            self._awaiting -= 1
            if follow_up is not None:
                self._ready.append(follow_up)

    def _serve_two_phase(self) -> None:
        """The closed loop of a mix with holds or linked payments.

        A hold's post or void needs the hold's seq, so it is sent once the hold is
        answered, ahead of fresh operations; it takes a window slot like any other
        and is not part of the quota. The teller is done when its quota is sent and
        every hold it sent has been answered and followed up.
        """
        remaining = self._quota
        while not self._halt.is_set():
            self._gather_followups()
            more = remaining is None or remaining > 0
            if not more and not self._ready:
                if self._awaiting == 0:
                    return
                try:  # the quota is sent: wait for the last holds' answers
                    follow_up = self._followups.get(timeout=PERMIT_WAIT_S)
                except queue.Empty:
                    continue
                self._awaiting -= 1
                if follow_up is not None:
                    self._ready.append(follow_up)
                continue
            n = self._reserve(self._batch_max)
            if n == 0:
                return
            self._gather_followups()
            ops: list[Op] = []
            while self._ready and len(ops) < n:
                ops.append(self._ready.popleft())
            fresh = n - len(ops) if remaining is None else min(n - len(ops), remaining)
            ops.extend(self._stream.take(fresh))
            if remaining is not None:
                remaining -= fresh
            if len(ops) < n:
                self._release(n - len(ops))
            if ops:
                self._send_ops(ops)

    def _serve_closed(self) -> None:
        if self._stream.spec.mix.two_phase:
            self._serve_two_phase()
            return
        remaining = self._quota
        while not self._halt.is_set() and (remaining is None or remaining > 0):
            limit = self._batch_max if remaining is None else min(self._batch_max, remaining)
            n = self._reserve(limit)
            if n == 0:
                return
            commands = self._stream.take_commands(n)
            log = self._log
            if log is None:
                self._send(commands, partial(self._answered, time.perf_counter_ns(), n))
            else:
                first = log.numbers(n).start
                invoked = time.monotonic_ns()
                self._send(
                    commands,
                    partial(
                        self._answered_logged,
                        log,
                        first,
                        commands,
                        invoked,
                        time.perf_counter_ns(),
                    ),
                )
            if remaining is not None:
                remaining -= n

    def _serve_open(self, times: Arrivals) -> None:
        remaining = self._quota
        start_ns = self._clock.start_ns
        end_s = self._end_s
        next_s = next(times)
        last_sent_ns = 0
        while not self._halt.is_set() and (remaining is None or remaining > 0):
            if end_s is not None and next_s >= end_s:
                return  # the schedule of this run is over
            due_ns = start_ns + int(next_s * 1e9)
            now_ns = time.perf_counter_ns()
            wait_ns = max(due_ns, last_sent_ns + SEND_TICK_NS) - now_ns
            if wait_ns > 0:
                self._halt.wait(wait_ns / 1e9)
                continue
            limit = self._batch_max if remaining is None else min(self._batch_max, remaining)
            n = self._reserve(limit)
            if n == 0:
                break
            intended = [due_ns]
            next_s = next(times)
            now_ns = time.perf_counter_ns()
            while len(intended) < n:
                if end_s is not None and next_s >= end_s:
                    break
                due_ns = start_ns + int(next_s * 1e9)
                if due_ns > now_ns:
                    break
                intended.append(due_ns)
                next_s = next(times)
            if len(intended) < n:
                self._release(n - len(intended))
            n = len(intended)
            commands = self._stream.take_commands(n)
            sent_ns = last_sent_ns = time.perf_counter_ns()
            log = self._log
            if log is None:
                self._send(commands, partial(self._answered_open, intended, sent_ns))
            else:
                first = log.numbers(n).start
                invoked = time.monotonic_ns()
                self._send(
                    commands,
                    partial(
                        self._answered_open_logged, log, first, commands, invoked, intended, sent_ns
                    ),
                )
            late = bisect.bisect_left(intended, sent_ns - LATE_AFTER_NS)
            self._metrics.submitted(n, late, (sent_ns - intended[0]) // 1000)
            if remaining is not None:
                remaining -= n
        self._count_dropped(next_s, times, remaining)

    def _count_dropped(self, next_s: float, times: Arrivals, remaining: int | None) -> None:
        """Operations that were due before the run stopped but were never sent."""
        cut = (time.perf_counter_ns() - self._clock.start_ns) / 1e9
        if self._end_s is not None:
            cut = min(cut, self._end_s)
        dropped = 0 if next_s >= cut else 1 + times.due_before(cut)
        self.dropped = dropped if remaining is None else min(dropped, remaining)

    def _answered(self, t0: int, n: int, outcomes: Sequence[Outcome]) -> None:
        """Batch callback (runs on whichever thread answered): record, then free the slots."""
        latency_us = (time.perf_counter_ns() - t0) // 1000
        committed, rejected, errors = classify(outcomes)
        self._metrics.record(latency_us, n, committed, rejected, errors)
        self._release(n)

    def _answered_open(
        self, intended: list[int], sent_ns: int, outcomes: Sequence[Outcome]
    ) -> None:
        """Open-model batch callback: each latency from the operation's intended start."""
        end = time.perf_counter_ns()
        latencies = [(end - t) // 1000 for t in intended]
        committed, rejected, errors = classify(outcomes)
        self._metrics.record(
            latencies, len(intended), committed, rejected, errors, (end - sent_ns) // 1000
        )
        self._release(len(intended))

    def _answered_logged(
        self,
        log: TellerLog,
        first: int,
        commands: list[AnyCommand],
        invoked: int,
        t0: int,
        outcomes: Sequence[Outcome],
    ) -> None:
        """Batch callback with --history: stamp the completions for the log, then as `_answered`."""
        log.answered_batch(
            first, commands, invoked, cast(Sequence[Receipt | BaseException], outcomes)
        )
        self._answered(t0, len(commands), outcomes)

    def _answered_open_logged(
        self,
        log: TellerLog,
        first: int,
        commands: list[AnyCommand],
        invoked: int,
        intended: list[int],
        sent_ns: int,
        outcomes: Sequence[Outcome],
    ) -> None:
        """Open-model batch callback with --history."""
        log.answered_batch(
            first, commands, invoked, cast(Sequence[Receipt | BaseException], outcomes)
        )
        self._answered_open(intended, sent_ns, outcomes)

    def _drain(self) -> None:
        """Wait until every operation in flight is answered, then flush the log."""
        self._collect()
        while self._in_flight > 0:
            try:
                self._in_flight -= self._freed.get(timeout=PERMIT_WAIT_S)
            except queue.Empty:
                continue
        if self._log is not None:
            self._log.flush(force=True)


def prepare_accounts(
    bank: Bank, count: int, initial_balance: int, *, chunk_ops: int = 64
) -> list[int]:
    """Ids of `count` simulation accounts, opening and funding the ones the ledger lacks.

    Accounts are found again by name, so a reused ledger keeps its balances and
    only new accounts get `initial_balance` (deposited from `@cash`).
    """
    existing = {a.name: a.id for a in bank.accounts()}
    ids: list[int] = []
    fresh: list[int] = []
    for i in range(count):
        name = ACCOUNT_NAME_FORMAT.format(i)
        account_id = existing.get(name)
        if account_id is None:
            account_id = bank.open_account(name).id
            fresh.append(account_id)
        ids.append(account_id)
    # Funded in modest chunks, so the setup does not set the queue's high-water mark.
    for start in range(0, len(fresh) if initial_balance > 0 else 0, chunk_ops):
        chunk = fresh[start : start + chunk_ops]
        for future in bank.submit_many(Deposit(account=i, amount=initial_balance) for i in chunk):
            future.result()
    return ids


def run_simulation(
    config: SimulationConfig,
    *,
    progress: ProgressDisplay | None = None,
    keep_commands: bool = False,
    history: str | Path | None = None,
) -> SimulationResult:
    """Run one simulation on `config.db` and audit the ledger afterwards.

    Ctrl-C (SIGINT, when called from the main thread) stops the tellers: every
    operation already submitted is answered and recorded, the audit still runs,
    the bank is closed cleanly, and the result has `interrupted=True`. A second
    Ctrl-C raises KeyboardInterrupt (the bank is still closed on the way out).
    `history`, if given, is a file to record every operation and periodic
    snapshots in (`bank.simulate.history`), for `bank check-history`.
    Raises `BankError` if the ledger cannot be opened.
    """
    display = progress if progress is not None else NoProgress()
    if history is not None and config.mix.two_phase:
        raise InvalidWorkload(
            "--history records deposits, withdrawals and transfers only: "
            "give hold=0,linked=0 with it"
        )
    with (
        Bank.open(
            config.db,
            workers=config.workers,
            queue_capacity=config.queue_capacity,
            durability=config.durability,
        ) as bank,
        ExitStack() as closing,
    ):
        ids = prepare_accounts(
            bank,
            config.accounts,
            config.initial_balance,
            chunk_ops=min(SUBMIT_CHUNK_OPS_MAX, config.tellers * config.window),
        )
        spec = WorkloadSpec(
            tuple(ids),
            config.mix,
            config.skew,
            config.seed,
            config.initial_balance,
            hold_expiry_s=config.holds_expire_s,
        )
        metrics = Metrics()
        start, stop = threading.Event(), threading.Event()
        errors: list[str] = []
        errors_lock = threading.Lock()

        def on_error(message: str) -> None:
            with errors_lock:
                errors.append(message)

        recorder = (
            None
            if history is None
            else closing.enter_context(
                HistoryRecorder(
                    history,
                    ledger=str(bank.path) if bank.path is not None else config.db,
                    seed=config.seed,
                    options=_history_options(config),
                )
            )
        )
        quotas: list[int | None] = (
            list(split_ops(config.ops, config.tellers))
            if config.ops is not None
            else [None] * config.tellers
        )
        schedule = config.schedule()
        clock = RunClock()
        # A --duration schedule ends with the run; a --ops one when every quota is sent.
        end_s = config.duration_s if schedule is not None else None
        tellers = [
            Teller(
                i,
                bank,
                spec.stream(i),
                quota=quotas[i],
                window=config.window,
                start=start,
                stop=stop,
                metrics=metrics,
                on_error=on_error,
                keep_commands=keep_commands,
                log=recorder.teller(i) if recorder is not None else None,
                times=None
                if schedule is None
                else schedule.teller_times(
                    i,
                    config.tellers,
                    "poisson" if config.arrival == "poisson" else "fixed",
                    config.seed,
                ),
                clock=clock,
                end_s=end_s,
            )
            for i in range(config.tellers)
        ]
        snapshots = None
        if recorder is not None:
            recorder.snapshot(bank.snapshot)  # the state the run starts from
            snapshots = SnapshotReader(recorder, bank.snapshot)
        observer = Observer(
            metrics,
            lambda: bank.stats().queue_depth,
            interval_s=config.interval_s,
            expected_s=config.expected_s(),
            due_by=None if schedule is None else schedule.due_by,
        )
        interrupted = threading.Event()
        commits_before = bank.stats().commits  # the setup's commits are not the run's
        restore_sigint = _catch_sigint(interrupted, stop)
        try:
            for teller in tellers:
                teller.start()
            if snapshots is not None:
                snapshots.start()
            tuning = throughput_gc() if config.gc == "throughput" else nullcontext()
            with display, tuning:
                t0 = time.monotonic()
                clock.start_ns = time.perf_counter_ns()
                observer.begin(t0)
                observer.start()
                start.set()
                _watch(bank, tellers, metrics, observer, display, stop, interrupted, t0, config)
                t_end = time.monotonic()
                observer.stop(t_end)
                display.update(_reading(bank, metrics, observer, t_end - t0))
        finally:
            restore_sigint()
            # Also on the way out of an error: no teller may be left waiting to start.
            stop.set()
            start.set()
            for teller in tellers:
                if teller.ident is not None:
                    teller.join()
            if snapshots is not None and snapshots.ident is not None:
                snapshots.stop()
        stats = bank.stats()
        if recorder is None:
            snapshot = bank.snapshot()
        else:
            snapshot = recorder.snapshot(bank.snapshot, final=True)
            recorder.end(interrupted=interrupted.is_set())
            recorder.close()
        report = bank.audit()
    audit = AuditVerdict(
        ok=report.ok,
        problems=[p.as_dict() for p in report.problems],
        problems_total=report.problems_total,
        seq=report.seq,
        head_hash=report.head_hash,
    )
    schedule_report = None
    if schedule is not None:
        assert config.rate is not None
        submitted, late, lag_us = metrics.schedule_totals()
        dropped = sum(t.dropped for t in tellers)
        schedule_report = ScheduleReport(
            rate=config.rate,
            arrival=config.arrival,
            due=submitted + dropped,
            submitted=submitted,
            late=late,
            dropped=dropped,
            lag_max_ms=lag_us / 1000.0,
            service=metrics.service_latency(),
        )
    return SimulationResult(
        config=config,
        totals=metrics.totals(),
        duration_s=t_end - t0,
        latency=observer.latency(),
        samples=observer.samples(),
        queue_high_water=stats.queue_high_water,
        queue_capacity=stats.queue_capacity,
        group_commits=stats.commits - commits_before,
        ledger_seq=snapshot.seq,
        total_balance=snapshot.total,
        audit=audit,
        interrupted=interrupted.is_set(),
        errors=errors,
        per_teller_ops=[t.submitted for t in tellers],
        commands={t.index: t.commands for t in tellers if t.commands is not None}
        if keep_commands
        else None,
        schedule=schedule_report,
        interval_s=observer.interval_s,
        kinds=_kinds(tellers),
    )


def _kinds(tellers: Sequence[Teller]) -> dict[str, int]:
    """Operations sent by all tellers, by kind, sorted by name."""
    kinds: dict[str, int] = {}
    for teller in tellers:
        for kind, n in teller.kinds.items():
            kinds[kind] = kinds.get(kind, 0) + n
    return dict(sorted(kinds.items()))


def _history_options(config: SimulationConfig) -> dict[str, object]:
    """The run's options as the history header records them (JSON values)."""
    return {
        "tellers": config.tellers,
        "window": config.window,
        "workers": config.workers,
        "accounts": config.accounts,
        "ops": config.ops,
        "duration_s": config.duration_s,
        "mix": config.mix.spec(),
        "skew": config.skew.spec(),
        "initial_balance": config.initial_balance,
        "durability": config.durability,
        "queue_capacity": config.queue_capacity,
        "rate": None if config.rate is None else config.rate.spec(),
        "arrival": config.arrival,
        "gc": config.gc,
        "hold_expiry_s": config.holds_expire_s,
    }


def _reading(bank: Bank, metrics: Metrics, observer: Observer, elapsed_s: float) -> Reading:
    totals = metrics.totals()
    average = totals.completed / elapsed_s if elapsed_s > 0 else 0.0
    last = observer.last_ops_s()
    try:
        depth = bank.stats().queue_depth
    except BankError:
        depth = 0
    return Reading(
        elapsed_s=elapsed_s,
        completed=totals.completed,
        committed=totals.committed,
        rejected=totals.rejected_total,
        queue_depth=depth,
        ops_s=average if last is None else last,
    )


def _watch(
    bank: Bank,
    tellers: list[Teller],
    metrics: Metrics,
    observer: Observer,
    display: ProgressDisplay,
    stop: threading.Event,
    interrupted: threading.Event,
    t0: float,
    config: SimulationConfig,
) -> None:
    """Refresh the progress display until every teller is done; end a --duration run."""
    deadline = None if config.duration_s is None else t0 + config.duration_s
    pending = list(tellers)
    noted = False
    shown = not isinstance(display, NoProgress)
    while pending:
        pending[0].join(PROGRESS_INTERVAL_S)
        while pending and not pending[0].is_alive():
            pending.pop(0)
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            stop.set()
        if interrupted.is_set() and not noted:
            noted = True
            display.note(
                "interrupted: finishing in-flight operations, then auditing (Ctrl-C again to abort)"
            )
        if shown:
            display.update(_reading(bank, metrics, observer, now - t0))


def _catch_sigint(interrupted: threading.Event, stop: threading.Event) -> Callable[[], None]:
    """Make the first Ctrl-C a request to stop; returns the function that undoes it.

    The handler only sets two events, so Ctrl-C never lands in the middle of the
    engine's or the display's code as a KeyboardInterrupt would. It puts the old
    handler back at once, so a second Ctrl-C interrupts for real. Signal handlers
    belong to the main thread: elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGINT)
    if previous is None:  # installed outside Python: fall back to the default
        previous = signal.default_int_handler

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        interrupted.set()
        stop.set()
        signal.signal(signal.SIGINT, previous)

    def restore() -> None:
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, on_sigint)
    return restore
