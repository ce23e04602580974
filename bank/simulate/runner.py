"""The load simulation: teller threads, their in-flight windows, and the run's result.

```
main thread:  open bank, open+fund accounts, start tellers, release them together
              (start Event), show progress, stop them (stop Event: --duration, Ctrl-C),
              wait for every in-flight answer, then audit
teller-N:     acquire window permits (BoundedSemaphore) -> submit/submit_many
              -> a done callback timestamps the answer and releases the permit
observer:     daemon thread; once a second: ops/s, latency percentiles, queue depth
```

The done callback runs on the bank's ledger writer thread (whoever resolves a
future runs its callbacks), so it does the least possible: take the time, queue
the outcome for its teller, release the permit. The teller moves the outcomes
into the shared `Metrics` in batches.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

from bank.commands import AnyCommand, Deposit
from bank.engine import Bank
from bank.errors import BankError
from bank.limits import QUEUE_CAPACITY_DEFAULT, SUBMIT_CHUNK_OPS_MAX, WORKERS_DEFAULT
from bank.records import Receipt
from bank.simulate.history import HistoryRecorder, SnapshotReader, TellerLog
from bank.simulate.metrics import LatencySummary, Metrics, Observer, Outcome, Sample, Totals
from bank.simulate.progress import NoProgress, ProgressDisplay, Reading
from bank.simulate.tuning import throughput_gc
from bank.simulate.workload import (
    MIX_DEFAULT,
    InvalidWorkload,
    Mix,
    Skew,
    TellerStream,
    WorkloadSpec,
    parse_mix,
    parse_skew,
    split_ops,
)

TELLERS_DEFAULT = 8
TELLERS_MAX = 1024
WINDOW_DEFAULT = 8
WINDOW_MAX = 4096
ACCOUNTS_DEFAULT = 1000
ACCOUNTS_MAX = 1_000_000
OPS_DEFAULT = 20_000
#: Every simulated customer starts with 1,000.00.
INITIAL_BALANCE_DEFAULT = 100_000
#: Simulation accounts are named like this (found again when a ledger is reused).
ACCOUNT_NAME_FORMAT = "sim-{:06d}"
DURABILITIES = ("full", "normal")
#: How often a teller waiting for window room looks at the stop event.
PERMIT_WAIT_S = 0.05
#: How often the main thread refreshes the progress display.
PROGRESS_INTERVAL_S = 0.2


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

    def __post_init__(self) -> None:
        def bounded(name: str, value: int, low: int, high: int) -> None:
            if type(value) is not int or not low <= value <= high:
                raise InvalidWorkload(f"{name} must be an int from {low} to {high}, got {value!r}")

        bounded("tellers", self.tellers, 1, TELLERS_MAX)
        bounded("window", self.window, 1, WINDOW_MAX)
        bounded("accounts", self.accounts, 1, ACCOUNTS_MAX)
        if (self.ops is None) == (self.duration_s is None):
            raise InvalidWorkload("give exactly one of ops or duration_s")
        if self.mix.transfer and self.accounts < 2:
            raise InvalidWorkload("transfers need at least 2 accounts (or give transfer=0)")
        if self.ops is not None:
            bounded("ops", self.ops, 1, 10**12)
        if self.duration_s is not None and not 0 < self.duration_s <= 7 * 86400:
            raise InvalidWorkload(f"duration must be in (0, 1 week] seconds, got {self.duration_s}")
        if self.durability not in DURABILITIES:
            raise InvalidWorkload(f"durability must be 'full' or 'normal', got {self.durability!r}")

    @classmethod
    def from_specs(cls, *, mix: str, skew: str, **kwargs: Any) -> SimulationConfig:
        """Build a config from `--mix` / `--skew` texts (raises `InvalidWorkload`)."""
        return cls(mix=parse_mix(mix), skew=parse_skew(skew), **kwargs)


@dataclass(frozen=True, slots=True)
class AuditVerdict:
    """The part of the audit report a simulation result carries."""

    ok: bool
    problems: list[dict[str, Any]]
    problems_total: int
    seq: int
    head_hash: str


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
    commands: dict[int, list[AnyCommand]] | None = None

    @property
    def ops(self) -> int:
        """Operations answered (committed + rejected)."""
        return self.totals.completed

    @property
    def throughput_ops_s(self) -> float:
        """Answered operations per second of the run."""
        return self.ops / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def ok(self) -> bool:
        """The audit is clean, money is conserved and no teller hit an error."""
        return self.audit.ok and self.total_balance == 0 and not self.errors

    def exit_code(self) -> int:
        """1 if anything is wrong, else 130 if Ctrl-C cut the run short, else 0."""
        if not self.ok:
            return 1
        return 130 if self.interrupted else 0


class Teller(threading.Thread):
    """A simulated teller: serves its own command stream with up to `window` ops in flight."""

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
    ) -> None:
        super().__init__(name=f"teller-{index}")
        self.index = index
        self._bank = bank
        self._stream = stream
        self._quota = quota
        self._window_size = window
        self._window = threading.BoundedSemaphore(window)
        self._go = start
        self._halt = stop
        self._metrics = metrics
        self._on_error = on_error
        # Outcomes answered but not yet in `metrics`; appended on the writer thread
        # (deque appends and pops are documented thread-safe), drained by this teller.
        self._answered: deque[Outcome] = deque()
        self.submitted = 0
        self.commands: list[AnyCommand] | None = [] if keep_commands else None
        # Only with --history: without it the teller never touches the clock twice.
        self._log = log

    def run(self) -> None:
        try:
            self._go.wait()
            self._serve()
        except BaseException as exc:  # never die silently: the run must know
            self._on_error(f"{self.name}: {type(exc).__name__}: {exc}")
            self._halt.set()
        finally:
            self._drain()

    def _serve(self) -> None:
        remaining = self._quota
        batch_max = min(self._window_size, SUBMIT_CHUNK_OPS_MAX)
        while not self._halt.is_set() and (remaining is None or remaining > 0):
            if not self._window.acquire(timeout=PERMIT_WAIT_S):
                self._flush()
                continue
            n = 1
            limit = batch_max if remaining is None else min(batch_max, remaining)
            while n < limit and self._window.acquire(blocking=False):
                n += 1
            commands = self._stream.take(n)
            if self.commands is not None:
                self.commands.extend(commands)
            log = self._log
            try:
                invoked = time.monotonic_ns() if log is not None else 0
                t0 = time.perf_counter_ns()
                if n == 1:
                    futures = [self._bank.submit(commands[0])]
                else:
                    futures = self._bank.submit_many(commands)
            except BaseException:
                for _ in range(n):
                    self._window.release()
                raise
            self.submitted += n
            if log is None:
                for future in futures:
                    future.add_done_callback(partial(self._answer, t0))
            else:
                for number, command, future in zip(log.numbers(n), commands, futures, strict=True):
                    future.add_done_callback(
                        partial(self._answer_logged, log, t0, number, command, invoked)
                    )
            if remaining is not None:
                remaining -= n
            self._flush()

    def _answer(self, t0: int, future: Future[Receipt]) -> None:
        """Done callback (runs on whichever thread answered): record, then free the slot."""
        latency_us = (time.perf_counter_ns() - t0) // 1000
        exc = None if future.cancelled() else future.exception()
        reason = None
        if future.cancelled():
            reason = "Cancelled"
        elif exc is not None:
            reason = type(exc).__name__
        self._answered.append((latency_us, reason))
        self._window.release()

    def _answer_logged(
        self,
        log: TellerLog,
        t0: int,
        number: int,
        command: AnyCommand,
        invoked: int,
        future: Future[Receipt],
    ) -> None:
        """Done callback with --history: stamp the completion for the log, then as `_answer`."""
        log.answered(number, command, invoked, future)
        self._answer(t0, future)

    def _flush(self) -> None:
        if self._log is not None:
            self._log.flush()
        batch: list[Outcome] = []
        while True:
            try:
                batch.append(self._answered.popleft())
            except IndexError:
                break
        if batch:
            self._metrics.record(batch)

    def _drain(self) -> None:
        """Wait until every operation in flight is answered (all permits back), then record."""
        for _ in range(self._window_size):
            self._window.acquire()
        for _ in range(self._window_size):
            self._window.release()
        self._flush()
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
            tuple(ids), config.mix, config.skew, config.seed, config.initial_balance
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
            )
            for i in range(config.tellers)
        ]
        snapshots = None
        if recorder is not None:
            recorder.snapshot(bank.snapshot)  # the state the run starts from
            snapshots = SnapshotReader(recorder, bank.snapshot)
        observer = Observer(metrics, lambda: bank.stats().queue_depth)
        interrupted = threading.Event()
        commits_before = bank.stats().commits  # the setup's commits are not the run's
        restore_sigint = _catch_sigint(interrupted, stop)
        try:
            for teller in tellers:
                teller.start()
            if snapshots is not None:
                snapshots.start()
            with display, throughput_gc():
                t0 = time.monotonic()
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
    return SimulationResult(
        config=config,
        totals=metrics.totals(),
        duration_s=t_end - t0,
        latency=metrics.latency(),
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
    )


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
    }


def _reading(bank: Bank, metrics: Metrics, observer: Observer, elapsed_s: float) -> Reading:
    totals = metrics.totals()
    samples = observer.samples()
    average = totals.completed / elapsed_s if elapsed_s > 0 else 0.0
    ops_s = samples[-1].ops_s if samples else average
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
        ops_s=ops_s,
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
    while pending:
        pending[0].join(PROGRESS_INTERVAL_S)
        pending = [t for t in pending if t.is_alive()]
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            stop.set()
        if interrupted.is_set() and not noted:
            noted = True
            display.note(
                "interrupted: finishing in-flight operations, then auditing (Ctrl-C again to abort)"
            )
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
