"""The engine's throughput benchmark, as a user meets it (issues #2, #10, #12): the same
transfers, many ways on SQLite and two on PostgreSQL, beside pgbench.

- (a) the naive baseline a tutorial would give: a `BankAccount` class with an
  `RLock` and an int balance, and one SQLAlchemy ORM commit per operation
  (its own declarative Base and tables, in its own SQLite file with the
  engine's pragmas), called by 8 threads;
- (n) the same naive code called by one thread (issue #12's reference);
- (b) the engine, 8 threads each calling the blocking `Bank.transfer()`;
- (c) the engine, 16 threads each keeping a window of 64 operations in flight
  with `submit_many` (a future per operation);
- (s) the same with `submit_batch` (one future per window of 64);
- (d) raw stdlib `sqlite3` inserting the rows the engine writes (same
  `transfers` table, precomputed chain hashes), 1,000 rows per transaction,
  and their postings (revision 0007) in the engine's sorted runs of
  `POSTINGS_RUN_ROWS`: the ceiling of the ledger itself;
- (e) (c) again with `durability="normal"`, for the trade-off table;
- (f) `bank simulate` at its defaults (what `make run` shows), the figure a user sees;
- (m) `bank simulate --tellers 16 --window 64`: the in-flight count of (s), its reference;
- (o) `bank simulate --rate R` at 80% of the maximum rate an open flood measured just
  before: p99 latency from each operation's intended start (target <= 10 ms);
- (g) (c) on PostgreSQL: the engine's pipelined path through `Bank.open(url)`;
- (p) (s) on PostgreSQL: the same through `submit_batch`, the engine's fast path;
- (h) the raw psycopg ceiling: the same rows (chain hashes precomputed) and each
  batch's final balances, written by one connection with nothing else, one
  durable transaction (`synchronous_commit=on`) per batch, on the ledger's own
  tables (`bank.ledger.models`, both foreign keys of `transfers` included), the
  postings written in the engine's sorted runs as (d) writes them; each
  round measures every candidate writer of `--pg-raw` at every `--pg-raw-batch`
  size and the fastest is the ceiling;
- (i) pgbench's TPC-B-like script, `-c 8 -j 2`, durable, on its own database:
  the reference PostgreSQL users know (its TPS as ops/s).

The PostgreSQL variants run on `--pg-url` (default `BANK_BENCH_POSTGRES_URL`),
else on a throwaway cluster started from the PostgreSQL binaries on the machine,
else they are skipped with a one-line note; each uses its own `bench_...`
database, dropped at the end.

Every caller builds its own commands inside the timed region, as an application
does: the seeded stream of (source, target, amount) tuples is generated before, the
pydantic commands from them while the clock runs. Only the ceilings (d), (h) build
their rows and hashes before. The timed region runs from the moment all its threads
are released to the moment the last one is answered.
Each variant then verifies its own result (exact final balances, conservation,
and the ledger audit), outside the timed region. The machines are noisy: read
the ratios, which are all measured in the same run, and the CPU time per
operation, which other processes disturb less than the wall clock.

The run repeats in rounds (`--rounds`, default 3): each round runs every
chosen variant once, in order, so a slow spell of the machine hits all of them
alike instead of one. Each variant reports its median round (and the range);
ratios compare medians, and the targets' ratios are also given round by round,
each against the reference measured in the same round.

Every timed region runs with CPython's default collector, untouched, as in an
application that calls nothing in `gc`; `--gc throughput` measures under
`bank.simulate.tuning.throughput_gc` (freeze what exists, collect the young
generation less often) instead, to compare. The engine itself never changes the
collector's settings.

The issue's targets are printed at the end as ratios of figures measured in the
same run, round by round (`TARGETS`). `--long` adds, once per run, what takes
minutes: the RSS growth over 1,000,000 pipelined operations (`--long-ops`) and the
pipelined throughput on the ledger they leave against an empty one.

(c) waits for each window with per-future `.result()`: on 2 cores it was faster
than `concurrent.futures.wait` in every paired run (medians: 96k against 79k
ops/s over 3 pairs of 200,000 ops; 50k against 38k over 6 pairs of 100,000 with
CPython's default collector), because `wait` installs a waiter on every future
that the ledger writer must then feed; `--wait wait` measures the other.

(d) uses DB-API `executemany` as the issue defines it; `--raw-insert values`
measures multi-row `INSERT ... VALUES (...), (...)` pages of 100 rows instead
(what the ledger writer does), which binds and steps once per page.

    .venv/bin/python scripts/bench.py
    .venv/bin/python scripts/bench.py --long
    .venv/bin/python scripts/bench.py --only n,b,c,s,d,m --ops-scale 0.2 --gc throughput
    .venv/bin/python scripts/bench.py --only a,c --ops c=50000 --rounds 1 --json bench.json
    .venv/bin/python scripts/bench.py --ops-scale 0.1 --durability normal
    .venv/bin/python scripts/bench.py --only g,h,i --pg-url postgresql+psycopg://postgres@host/db
    .venv/bin/python scripts/bench.py --only h --pg-raw unnest,values,copy,pipeline \
        --pg-raw-batch 256,512,1000
"""

import argparse
import concurrent.futures
import contextlib
import dataclasses
import gc
import importlib.util
import json
import os
import platform
import random
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import sqlalchemy
from rich.console import Console, JustifyMethod
from rich.table import Table
from sqlalchemy import Engine, ForeignKey, create_engine, event, func, select
from sqlalchemy.engine import URL
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, scoped_session, sessionmaker

from bank import Bank
from bank.commands import Deposit, Transfer
from bank.errors import InsufficientFunds
from bank.ledger import postings
from bank.ledger.chain import transfer_hash
from bank.ledger.models import transfers
from bank.limits import BUSY_TIMEOUT_MS
from bank.records import Receipt
from bank.simulate.tuning import throughput_gc

# The PostgreSQL helpers live beside this script (scripts/ is not a package).
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_pg

VARIANTS = ("a", "n", "b", "c", "s", "d", "e", "f", "m", "o", "g", "p", "q", "h", "i")
#: The variants that need a PostgreSQL server.
PG_VARIANTS = ("g", "p", "q", "h", "i")
# Sized for a run of about a minute on 2 cores, each timed region several seconds long.
OPS_DEFAULT = {
    "a": 10_000,
    "n": 4_000,
    "b": 100_000,
    "c": 500_000,
    "s": 500_000,
    "d": 1_000_000,
    "e": 500_000,
    "f": 200_000,
    "m": 200_000,
    "o": 100_000,  # the run at 80% of the maximum rate (after a flood of OPEN_FLOOD_S)
    "g": 200_000,
    "p": 200_000,
    "q": 30_000,
    "h": 100_000,  # per candidate writer and batch size
}
PGBENCH_SECONDS_DEFAULT = 10  # (i) runs for a time (-T), not a number of operations
LABELS = {
    "a": "naive: BankAccount+RLock, ORM commit per op, 8 threads",
    "n": "naive: BankAccount+RLock, ORM commit per op, one thread",
    "b": "engine: 8 threads x blocking transfer()",
    "c": "engine: 16 threads x window of 64 (submit_many, a future per op)",
    "s": "engine: 16 threads x window of 64 (submit_batch, one future per window)",
    "d": "raw sqlite3: executemany, 1,000 rows per transaction",
    "e": "(c) with durability=normal",
    "f": "bank simulate --ops N at its defaults (8 tellers x window 32, mixed workload)",
    "m": "bank simulate --ops N --tellers 16 --window 64 (the in-flight count of (s))",
    "o": "bank simulate --rate R --ops N at its defaults, R = 80% of the maximum rate",
    "g": "engine on PostgreSQL: 16 threads x window of 64 (submit_many)",
    "p": "engine on PostgreSQL: 16 threads x window of 64 (submit_batch, as (s))",
    "q": "engine on PostgreSQL: 8 threads x blocking transfer() (as (b))",
    "h": "raw psycopg ceiling: fastest batched durable insert+update, one transaction per batch",
    "i": "pgbench TPC-B -c 8 -j 2 -T N, synchronous_commit=on (TPS)",
}
SHORT = {
    "a": "(a) naive ORM x8",
    "n": "(n) naive ORM x1",
    "b": "(b) engine, blocking",
    "c": "(c) submit_many 16x64",
    "s": "(s) submit_batch 16x64",
    "d": "(d) raw sqlite3",
    "e": "(e) window, normal",
    "f": "(f) simulate defaults",
    "m": "(m) simulate 16x64",
    "o": "(o) open, 80% of max",
    "g": "(g) engine on PG",
    "p": "(p) submit_batch on PG",
    "q": "(q) blocking on PG",
    "h": "(h) raw psycopg",
    "i": "(i) pgbench TPS",
}
#: variant -> [(reference variant, lowest ratio to it)], at default durability on 2 cores
#: with the default collector (issue #12's table; PostgreSQL's from issue #10).
TARGETS: dict[str, list[tuple[str, float]]] = {
    "s": [("d", 0.6)],
    "c": [("d", 0.4)],
    "b": [("n", 10.0)],
    "m": [("s", 0.8)],
    "f": [("n", 30.0)],
    "g": [("h", 0.5), ("i", 5.0)],
    "p": [("h", 0.5), ("i", 5.0)],
}
#: variant -> (figure in its `extra`, highest value): targets on a figure, not a ratio.
FIGURE_TARGETS: dict[str, tuple[str, float]] = {"o": ("p99_ms", 10.0)}
#: (o): how long the open flood that measures the maximum rate runs, in seconds.
OPEN_FLOOD_S = 3.0
#: (o): the rate of its measured run, as a share of that maximum.
OPEN_LOAD_SHARE = 0.8
#: `--long`'s targets: RSS growth over the long run, and throughput on its ledger / empty.
LONG_RSS_GROWTH_MB_MAX = 50.0
LONG_RATIO_MIN = 0.8
LONG_OPS_DEFAULT = 1_000_000
LONG_PROBE_OPS = 100_000  # the throughput probe at each end of --long

ACCOUNTS_DEFAULT = 1_000  # issue #12's table
SEED_DEFAULT = 1
AMOUNT_MAX = 10_000  # cents
# Large enough that no transfer of the default run is refused, so every variant
# does the same work and the final balances are known exactly in advance.
OPENING_BALANCE = 10**9
OVERDRAFT_LIMIT = 10**9
NAIVE_THREADS = 8
BLOCKING_THREADS = 8
WINDOW_THREADS = 16
WINDOW_OPS = 64
RAW_BATCH_ROWS = 1_000
RAW_VALUES_PAGE_ROWS = 100  # rows per multi-row INSERT with --raw-insert values
ROUNDS_DEFAULT = 3

Move = tuple[int, int, int]  # (source, target, amount)


# -- the workload ---------------------------------------------------------------------


def make_moves(n: int, accounts: int, seed: int) -> list[Move]:
    """`n` transfers among accounts 1..`accounts` (the engine's ids); every variant
    uses a prefix of the same seeded stream."""
    rng = random.Random(seed)
    moves: list[Move] = []
    for _ in range(n):
        source = rng.randint(1, accounts)
        target = rng.randint(1, accounts - 1)
        if target >= source:
            target += 1
        moves.append((source, target, rng.randint(1, AMOUNT_MAX)))
    return moves


def expected_balances(moves: Sequence[Move], accounts: int) -> dict[int, int]:
    """Final customer balances if every move is accepted (the order does not matter)."""
    balances = dict.fromkeys(range(1, accounts + 1), OPENING_BALANCE)
    for source, target, amount in moves:
        balances[source] -= amount
        balances[target] += amount
    return balances


def compare_balances(found: dict[int, int], expected: dict[int, int]) -> list[str]:
    """Problems (at most 3 named) where `found` differs from `expected`."""
    wrong = [i for i, b in expected.items() if found.get(i) != b]
    return [f"account {i}: balance {found.get(i)} != expected {expected[i]}" for i in wrong[:3]] + (
        [f"... {len(wrong) - 3} more wrong balances"] if len(wrong) > 3 else []
    )


# -- results ----------------------------------------------------------------------------


@dataclass
class Result:
    """One variant's measurement and its self-check."""

    variant: str
    ops: int
    seconds: float
    cpu_seconds: float
    accepted: int
    rejected: int
    problems: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ops_s(self) -> float:
        """Operations per second (accepted and refused ones alike)."""
        return self.ops / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_us_per_op(self) -> float:
        """Process CPU time (all threads) per operation: steadier than ops/s when other
        processes share the cores."""
        return self.cpu_seconds / self.ops * 1e6

    @property
    def verified(self) -> bool:
        """True when the variant's own checks found nothing wrong."""
        return not self.problems


def median_result(rounds: Sequence[Result]) -> Result:
    """The round with the median throughput (the lower middle one for an even count)."""
    ordered = sorted(rounds, key=lambda r: r.ops_s)
    return ordered[(len(ordered) - 1) // 2]


def round_ratios(runs: dict[str, list[Result]], variant: str, reference: str) -> list[float] | None:
    """`variant` over `reference`, round by round (each against its own round's reference)."""
    if variant not in runs or reference not in runs:
        return None
    return [
        r.ops_s / base.ops_s if base.ops_s > 0 else 0.0
        for r, base in zip(runs[variant], runs[reference], strict=True)
    ]


def run_threads(
    count: int, body: Callable[[int], tuple[int, int]], gc_mode: str
) -> tuple[float, float, int, int]:
    """Run `body(i)` on `count` threads released together; returns (seconds, CPU seconds
    of the whole process, accepted, refused). The clocks start when the last thread
    reaches the start line, and stop when the last one is done.

    `gc_mode` "throughput" runs the threads under `throughput_gc()`, the collector
    settings `bank simulate` uses (the pre-generated workload is frozen out of the
    collector's way, the young generation is collected less often); "default" leaves
    CPython's collector as it is.
    """
    started: list[float] = []

    def start() -> None:
        started[:] = [time.perf_counter(), time.process_time()]

    barrier = threading.Barrier(count, action=start)
    outcomes: list[tuple[int, int]] = [(0, 0)] * count
    errors: list[BaseException] = []

    def run(i: int) -> None:
        barrier.wait()
        try:
            outcomes[i] = body(i)
        except BaseException as exc:  # reported after the join, not lost in a thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,), name=f"bench-{i}") for i in range(count)]
    gc.collect()  # start each timed region with the same clean heap
    with throughput_gc() if gc_mode == "throughput" else contextlib.nullcontext():
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        stopped, cpu_stopped = time.perf_counter(), time.process_time()
    if errors:
        raise errors[0]
    return (
        stopped - started[0],
        cpu_stopped - started[1],
        sum(a for a, _ in outcomes),
        sum(r for _, r in outcomes),
    )


def audit_available() -> bool:
    """`Bank.audit()` needs `bank/ledger/audit.py`, written separately."""
    return importlib.util.find_spec("bank.ledger.audit") is not None


def remove_ledger(path: Path) -> None:
    """Delete a ledger file and its WAL companions, so a run never reopens an old one."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


# -- (a) the naive baseline ---------------------------------------------------------------


class NaiveBase(DeclarativeBase):
    """The tutorial's own declarative base: its tables never touch the ledger's."""


class NaiveAccountRow(NaiveBase):
    """A tutorial account row."""

    __tablename__ = "naive_accounts"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str]
    balance: Mapped[int]


class NaiveTransferRow(NaiveBase):
    """A tutorial transaction row, added and committed once per operation."""

    __tablename__ = "naive_transfers"

    id: Mapped[int] = mapped_column(primary_key=True)
    source_id: Mapped[int] = mapped_column(ForeignKey("naive_accounts.id"))
    target_id: Mapped[int] = mapped_column(ForeignKey("naive_accounts.id"))
    amount: Mapped[int]


class BankAccount:
    """The tutorial's account: an int balance behind an RLock."""

    def __init__(self, id: int, balance: int, overdraft_limit: int) -> None:
        self.id = id
        self.balance = balance
        self.overdraft_limit = overdraft_limit
        self.lock = threading.RLock()

    def withdraw(self, amount: int) -> None:
        """Check, then debit; raises `InsufficientFunds` past the overdraft limit."""
        with self.lock:
            if self.balance - amount < -self.overdraft_limit:
                raise InsufficientFunds(f"account {self.id} cannot pay {amount}")
            self.balance -= amount

    def deposit(self, amount: int) -> None:
        """Credit."""
        with self.lock:
            self.balance += amount


class NaiveBank:
    """The tutorial's bank: lock both accounts (in id order, so cycles cannot
    deadlock), check, mutate, `session.add(row)`, `session.commit()`."""

    def __init__(self, engine: Engine, accounts: dict[int, BankAccount]) -> None:
        self.accounts = accounts
        self._sessions = scoped_session(sessionmaker(engine))  # one Session per thread

    def transfer(self, source: int, target: int, amount: int) -> None:
        """Move `amount`; returns once its row is committed."""
        src, dst = self.accounts[source], self.accounts[target]
        first, second = (src, dst) if source < target else (dst, src)
        with first.lock, second.lock:
            src.withdraw(amount)
            dst.deposit(amount)
            session = self._sessions()
            session.add(NaiveTransferRow(source_id=source, target_id=target, amount=amount))
            session.commit()

    def close(self) -> None:
        """Drop the thread-local sessions."""
        self._sessions.remove()


def naive_engine(path: Path, durability: str) -> Engine:
    """A plain `create_engine` with the ledger engine's default pragmas: WAL,
    synchronous=FULL (or NORMAL), foreign_keys=ON, and the same busy timeout."""
    engine = create_engine(f"sqlite:///{path}")

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute(f"PRAGMA synchronous = {durability.upper()}")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    return engine


def bench_naive(
    variant: str,
    path: Path,
    moves: list[Move],
    accounts: int,
    durability: str,
    gc_mode: str,
    threads: int,
) -> Result:
    """(a)/(n): `threads` threads calling `NaiveBank.transfer` over the moves."""
    remove_ledger(path)
    engine = naive_engine(path, durability)
    NaiveBase.metadata.create_all(engine)
    with sessionmaker(engine)() as session, session.begin():
        session.add_all(
            NaiveAccountRow(id=i, name=f"acct-{i:04d}", balance=OPENING_BALANCE)
            for i in range(1, accounts + 1)
        )
    naive = NaiveBank(
        engine,
        {i: BankAccount(i, OPENING_BALANCE, OVERDRAFT_LIMIT) for i in range(1, accounts + 1)},
    )
    slices = [moves[i::threads] for i in range(threads)]

    def teller(i: int) -> tuple[int, int]:
        accepted = refused = 0
        try:
            for source, target, amount in slices[i]:
                try:
                    naive.transfer(source, target, amount)
                    accepted += 1
                except InsufficientFunds:
                    refused += 1
        finally:
            naive.close()
        return accepted, refused

    seconds, cpu, accepted, refused = run_threads(threads, teller, gc_mode)
    result = Result(variant, len(moves), seconds, cpu, accepted, refused)
    balances = {i: a.balance for i, a in naive.accounts.items()}
    total = sum(balances.values())
    if total != accounts * OPENING_BALANCE:
        result.problems.append(f"balances sum to {total}, not {accounts * OPENING_BALANCE}")
    result.checks.append("sum of balances conserved")
    if refused == 0:
        result.problems += compare_balances(balances, expected_balances(moves, accounts))
        result.checks.append("every balance exact")
    with engine.connect() as conn:
        rows = conn.execute(select(func.count()).select_from(NaiveTransferRow)).scalar_one()
    if rows != accepted:
        result.problems.append(f"{rows} rows committed for {accepted} accepted operations")
    result.checks.append("one row per accepted op")
    engine.dispose()
    return result


# -- (b), (c), (e): the engine -----------------------------------------------------------


WORKERS: int | None = None  # --workers; None: Bank.open's default, as a user meets it


def open_bank(path: Path | URL, accounts: int, durability: str) -> Bank:
    """A fresh ledger with `accounts` funded customer accounts (ids 1..accounts); a URL
    must name an empty database."""
    if isinstance(path, Path):
        remove_ledger(path)
    bank = (
        Bank.open(path, durability=durability)
        if WORKERS is None
        else Bank.open(path, durability=durability, workers=WORKERS)
    )
    ids = [
        bank.open_account(f"acct-{i:04d}", overdraft_limit=OVERDRAFT_LIMIT).id
        for i in range(1, accounts + 1)
    ]
    if ids != list(range(1, accounts + 1)):
        bank.close()
        raise RuntimeError(f"expected account ids 1..{accounts}, got {ids[:3]}...")
    for future in bank.submit_many(Deposit(account=i, amount=OPENING_BALANCE) for i in ids):
        future.result()
    return bank


def verify_bank(bank: Bank, result: Result, moves: Sequence[Move], accounts: int) -> None:
    """Conservation, exact balances and the ledger audit, into `result`."""
    snapshot = bank.snapshot()
    if snapshot.total != 0:
        result.problems.append(f"snapshot balances sum to {snapshot.total}, not 0")
    result.checks.append("snapshot sums to 0")
    if result.rejected == 0:
        result.problems += compare_balances(snapshot.balances, expected_balances(moves, accounts))
        result.checks.append("every balance exact")
    if audit_available():
        report = bank.audit()
        if not report.ok:
            result.problems.append(f"audit found {report.problems_total} problems")
        result.checks.append(f"audit ({report.transfers_checked:,} rows)")
    else:
        result.checks.append("no audit (bank/ledger/audit.py missing)")


def engine_stats(bank: Bank, before: Any) -> dict[str, Any]:
    """Group-commit figures of the timed region (counters after minus before)."""
    after = bank.stats()
    commits = after.commits - before.commits
    rows = after.accepted - before.accepted
    return {
        "commits": commits,
        "rows_per_commit": round(rows / commits, 1) if commits else 0.0,
        "queue_high_water": after.queue_high_water,
    }


def bench_blocking(
    ledger: Path | Bank,
    moves: list[Move],
    accounts: int,
    durability: str,
    gc_mode: str,
    variant: str = "b",
) -> Result:
    """(b): 8 threads each calling the blocking `transfer(source, target, amount)`
    (which builds its `Transfer` command inside, as any caller's would); (q) passes a
    bank it opened on PostgreSQL."""
    bank = ledger if isinstance(ledger, Bank) else open_bank(ledger, accounts, durability)
    try:
        slices = [moves[i::BLOCKING_THREADS] for i in range(BLOCKING_THREADS)]

        def teller(i: int) -> tuple[int, int]:
            accepted = refused = 0
            for source, target, amount in slices[i]:
                try:
                    bank.transfer(source, target, amount)
                    accepted += 1
                except InsufficientFunds:
                    refused += 1
            return accepted, refused

        before = bank.stats()
        seconds, cpu, accepted, refused = run_threads(BLOCKING_THREADS, teller, gc_mode)
        result = Result(variant, len(moves), seconds, cpu, accepted, refused)
        result.extra.update(engine_stats(bank, before))
        verify_bank(bank, result, moves, accounts)
    finally:
        bank.close()
    return result


def bench_window(
    variant: str,
    ledger: Path | Bank,
    moves: list[Move],
    accounts: int,
    durability: str,
    gc_mode: str,
    wait: str,
    how: str = "many",
) -> Result:
    """(c)/(e)/(g)/(s): 16 threads, each building 64 commands from its moves (inside the
    timed region), handing them over with `submit_many` (`how` "many") or `submit_batch`
    ("batch") and waiting for all 64 answers before the next window (`ledger` may be a
    bank already opened by `open_bank`)."""
    bank = ledger if isinstance(ledger, Bank) else open_bank(ledger, accounts, durability)
    try:
        windows = [
            [mine[j : j + WINDOW_OPS] for j in range(0, len(mine), WINDOW_OPS)]
            for mine in (moves[i::WINDOW_THREADS] for i in range(WINDOW_THREADS))
        ]

        def teller_result(i: int) -> tuple[int, int]:
            accepted = refused = 0
            for window in windows[i]:
                commands = [Transfer(source=s, target=t, amount=a) for s, t, a in window]
                for future in bank.submit_many(commands):
                    try:
                        future.result()
                        accepted += 1
                    except InsufficientFunds:
                        refused += 1
            return accepted, refused

        def teller_batch(i: int) -> tuple[int, int]:
            accepted = refused = 0
            for window in windows[i]:
                commands = [Transfer(source=s, target=t, amount=a) for s, t, a in window]
                for outcome in bank.execute(commands):
                    if isinstance(outcome, Receipt):
                        accepted += 1
                    elif isinstance(outcome, InsufficientFunds):
                        refused += 1
                    else:
                        raise outcome
            return accepted, refused

        def teller_wait(i: int) -> tuple[int, int]:
            accepted = refused = 0
            for window in windows[i]:
                commands = [Transfer(source=s, target=t, amount=a) for s, t, a in window]
                futures = bank.submit_many(commands)
                concurrent.futures.wait(futures)
                for future in futures:
                    exc = future.exception()
                    if exc is None:
                        accepted += 1
                    elif isinstance(exc, InsufficientFunds):
                        refused += 1
                    else:
                        raise exc
            return accepted, refused

        before = bank.stats()
        if how == "batch":
            teller = teller_batch
        else:
            teller = teller_result if wait == "result" else teller_wait
        seconds, cpu, accepted, refused = run_threads(WINDOW_THREADS, teller, gc_mode)
        result = Result(variant, len(moves), seconds, cpu, accepted, refused)
        result.extra.update(engine_stats(bank, before))
        if how == "many":
            result.extra["wait"] = wait
        verify_bank(bank, result, moves, accounts)
    finally:
        bank.close()
    return result


# -- (d) the ceiling: raw sqlite3 ----------------------------------------------------------

# The engine's table, so (d) inserts exactly the rows the engine writes.
_TRANSFER_COLUMNS = tuple(
    c.name
    for c in transfers.c
    if c.name not in ("hold_seq", "expires_us", "link_first", "link_count")  # 0006: NULL
)
_INSERT_TRANSFER = (
    f"INSERT INTO transfers ({', '.join(_TRANSFER_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(_TRANSFER_COLUMNS))})"
)


def bench_simulate(
    variant: str,
    path: Path,
    ops: int,
    seed: int,
    durability: str,
    in_flight: tuple[int, int] | None,
    accounts: int,
) -> Result:
    """`bank simulate --ops N` through the library (its own workload and audit), at its
    defaults ((f)) or at `in_flight` = (tellers, window) ((m): 16 x 64).

    Unlike (a)-(e) it generates its mixed workload while it runs, about 8% of it is
    refused, and it measures every operation's latency: the figure a user sees.
    """
    from bank.simulate.runner import SimulationConfig, run_simulation

    remove_ledger(path)
    config = SimulationConfig(
        db=str(path), ops=ops, seed=seed, durability=durability, accounts=accounts
    )
    if in_flight is not None:
        config = dataclasses.replace(config, tellers=in_flight[0], window=in_flight[1])
    cpu0 = time.process_time()
    sim = run_simulation(config)
    cpu = time.process_time() - cpu0
    result = Result(
        variant,
        sim.ops,
        sim.duration_s,
        cpu,  # includes setup and the audit: an upper bound
        sim.totals.committed,
        sim.totals.rejected_total,
        extra={
            "latency_ms": {k: round(v, 3) for k, v in sim.latency.as_dict().items()},
            "queue_high_water": sim.queue_high_water,
            "group_commits": sim.group_commits,
            "tellers": config.tellers,
            "window": config.window,
        },
    )
    if sim.totals.completed != sim.ops:
        result.problems.append(f"{sim.totals.completed} answered for {sim.ops} operations")
    if sim.total_balance != 0:
        result.problems.append(f"balances sum to {sim.total_balance}")
    result.checks.append("committed + rejected == ops, balances sum to 0")
    if sim.audit.ok:
        result.checks.append("audit")
    else:
        result.problems.append(f"audit: {sim.audit.problems_total} problem(s)")
    return result


def bench_open(path: Path, ops: int, seed: int, durability: str, accounts: int) -> Result:
    """(o): p99 latency at 80% of the maximum rate, as the load-tool issue defines it.

    The maximum is what an open flood (`--rate` at its largest, for `OPEN_FLOOD_S`)
    gets through at `bank simulate`'s defaults: a closed loop's window would understate
    it. Then `ops` operations are scheduled at 80% of it, and each latency runs from the
    operation's intended start (so queueing behind a slow spell counts, as wrk2 counts it).
    """
    from bank.simulate.runner import SimulationConfig, run_simulation
    from bank.simulate.schedule import RATE_MAX, Rate

    remove_ledger(path)
    base = SimulationConfig(db=str(path), seed=seed, durability=durability, accounts=accounts)
    flood = run_simulation(
        dataclasses.replace(base, ops=None, duration_s=OPEN_FLOOD_S, rate=Rate(RATE_MAX, RATE_MAX))
    )
    maximum = flood.throughput_ops_s
    rate = OPEN_LOAD_SHARE * maximum
    remove_ledger(path)
    cpu0 = time.process_time()
    sim = run_simulation(dataclasses.replace(base, ops=ops, rate=Rate(rate, rate)))
    cpu = time.process_time() - cpu0
    schedule = sim.schedule
    assert schedule is not None, "a --rate run reports its schedule"
    result = Result(
        "o",
        sim.ops,
        sim.duration_s,
        cpu,
        sim.totals.committed,
        sim.totals.rejected_total,
        extra={
            "max_rate_ops_s": round(maximum, 1),
            "rate_ops_s": round(rate, 1),
            "p50_ms": round(sim.latency.p50, 3),
            "p99_ms": round(sim.latency.p99, 3),
            "service_p99_ms": round(schedule.service.p99, 3),
            "late_pct": round(schedule.late_pct, 2),
        },
    )
    for what, run in (("flood", flood), ("run", sim)):
        if not run.audit.ok:
            result.problems.append(f"{what}: audit: {run.audit.problems_total} problem(s)")
        if run.total_balance != 0:
            result.problems.append(f"{what}: balances sum to {run.total_balance}")
    if schedule.dropped or schedule.submitted != ops or sim.totals.completed != ops:
        result.problems.append(
            f"{sim.totals.completed} answered, {schedule.submitted} sent for {ops} operations"
        )
    result.checks.append("every scheduled op answered, balances sum to 0, audit")
    return result


def rss_mb() -> float:
    """The process's resident set size now, in MiB (Linux's /proc; elsewhere the
    high-water mark from getrusage, which can only overstate growth)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pipelined(bank: Bank, moves: Sequence[Move], gc_mode: str) -> tuple[float, float, int]:
    """(s)'s callers on an open bank: 16 threads x `submit_batch` of 64 commands built in
    the loop. Returns (seconds, CPU seconds, operations answered with a receipt)."""
    slices = [moves[i::WINDOW_THREADS] for i in range(WINDOW_THREADS)]

    def teller(i: int) -> tuple[int, int]:
        mine = slices[i]
        accepted = 0
        for j in range(0, len(mine), WINDOW_OPS):
            commands = [
                Transfer(source=s, target=t, amount=a) for s, t, a in mine[j : j + WINDOW_OPS]
            ]
            accepted += sum(isinstance(o, Receipt) for o in bank.execute(commands))
        return accepted, 0

    seconds, cpu, accepted, _ = run_threads(WINDOW_THREADS, teller, gc_mode)
    return seconds, cpu, accepted


def bench_long(
    path: Path, accounts: int, durability: str, gc_mode: str, seed: int, ops: int
) -> dict[str, Any]:
    """`--long`: on one ledger, a throughput probe, then `ops` pipelined operations (RSS
    before and after), then the same probe on the ledger they left.

    The probes are `LONG_PROBE_OPS` operations each (at most `ops`), through (s)'s callers.
    RSS growth is read after the first probe (everything warmed up) and after the long
    run, with the default collector and no `gc` call in between: what an application sees.
    """
    probe = min(LONG_PROBE_OPS, ops)
    moves = make_moves(ops + 2 * probe, accounts, seed + 1)
    first, long_run, last = moves[:probe], moves[probe : probe + ops], moves[probe + ops :]
    bank = open_bank(path, accounts, durability)
    problems: list[str] = []
    try:
        empty_s, _, ok_first = pipelined(bank, first, gc_mode)
        rss_before = rss_mb()
        rows_before = bank.stats().seq
        long_s, long_cpu, ok_long = pipelined(bank, long_run, gc_mode)
        rss_after = rss_mb()
        rows_at = bank.stats().seq
        full_s, _, ok_last = pipelined(bank, last, gc_mode)
        if ok_first + ok_long + ok_last != len(moves):
            problems.append(f"{ok_first + ok_long + ok_last} receipts for {len(moves)} operations")
        snapshot = bank.snapshot()
        if snapshot.total != 0:
            problems.append(f"balances sum to {snapshot.total}")
        problems += compare_balances(snapshot.balances, expected_balances(moves, accounts))
        report = bank.audit()
        if not report.ok:
            problems.append(f"audit found {report.problems_total} problems")
    finally:
        bank.close()
    empty_ops_s = probe / empty_s
    full_ops_s = probe / full_s
    growth = rss_after - rss_before
    return {
        "ops": ops,
        "probe_ops": probe,
        "rows_before_probe_at_end": rows_at,
        "rows_before_long_run": rows_before,
        "long_run_ops_s": round(ops / long_s, 1),
        "long_run_cpu_us_per_op": round(long_cpu / ops * 1e6, 2),
        "rss_before_mb": round(rss_before, 1),
        "rss_after_mb": round(rss_after, 1),
        "rss_growth_mb": round(growth, 1),
        "rss_growth_target_mb": LONG_RSS_GROWTH_MB_MAX,
        "rss_target_met": growth < LONG_RSS_GROWTH_MB_MAX,
        "empty_ops_s": round(empty_ops_s, 1),
        "full_ops_s": round(full_ops_s, 1),
        "full_over_empty": round(full_ops_s / empty_ops_s, 3),
        "ratio_target": LONG_RATIO_MIN,
        "ratio_target_met": full_ops_s / empty_ops_s >= LONG_RATIO_MIN,
        "problems": problems,
        "verified": not problems,
    }


def bench_raw(
    path: Path,
    moves: list[Move],
    accounts: int,
    durability: str,
    gc_mode: str,
    how: str = "executemany",
) -> Result:
    """(d): the ledger the engine would write, with nothing but stdlib sqlite3.

    The schema and the funded accounts come from `Bank.open` (then closed); the rows,
    chained from the ledger's head hash, are built before the clock starts. Timed:
    `executemany` of 1,000 rows per transaction, and the postings every
    `POSTINGS_RUN_ROWS` rows as the engine writes them. The accounts' final balances are
    written once after the clock stops (the engine updates them per commit, so this
    makes the ceiling a little higher, never lower), then the ledger is reopened
    with `Bank.open` and verified like the engine's.
    """
    open_bank(path, accounts, durability).close()
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        seq, head = db.execute(
            "SELECT seq, hash FROM transfers ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        ts_us = time.time_ns() // 1000
        balances = dict(db.execute("SELECT id, balance FROM accounts").fetchall())
        batches: list[list[tuple[Any, ...]]] = []
        for start in range(0, len(moves), RAW_BATCH_ROWS):
            batch: list[tuple[Any, ...]] = []
            for source, target, amount in moves[start : start + RAW_BATCH_ROWS]:
                seq += 1
                ts_us += 1  # a timestamp per row, like the engine's
                balances[source] -= amount  # the running balances after the row (0005)
                balances[target] += amount
                after = (balances[source], balances[target])
                head = transfer_hash(
                    head, seq, "transfer", source, target, amount, ts_us, None, *after
                )
                batch.append((seq, None, "transfer", source, target, amount, ts_us, head, *after))
            batches.append(batch)
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute(f"PRAGMA synchronous = {durability.upper()}")
        db.execute("PRAGMA foreign_keys = ON")

        # The ledger the engine writes has its postings (revision 0007): every
        # POSTINGS_RUN_ROWS rows, the same sorted INSERT and watermark move before a COMMIT.
        def advance(upto: int, head: int) -> int:
            db.execute(postings.flush_sql("?1", "?2"), (upto, head))
            return db.execute(postings.advance_sql("?1", "?2"), (upto, head)).rowcount

        (upto,) = db.execute("SELECT seq FROM postings_upto WHERE id = 1").fetchone()
        flush_postings = bench_pg.PostingsRuns(upto, advance).flush

        def writer_executemany(_i: int) -> tuple[int, int]:
            for batch in batches:
                db.execute("BEGIN")
                db.executemany(_INSERT_TRANSFER, batch)
                flush_postings(batch[-1][0])
                db.execute("COMMIT")
            return len(moves), 0

        # --raw-insert values: the pages' statements and flat parameters are built
        # before the clock starts too.
        head_sql = _INSERT_TRANSFER.partition(" VALUES ")[0] + " VALUES "
        one_row = "(" + ", ".join("?" * len(_TRANSFER_COLUMNS)) + ")"
        paged: list[list[tuple[str, tuple[Any, ...]]]] = []
        for batch in batches if how == "values" else []:
            pages = [
                batch[i : i + RAW_VALUES_PAGE_ROWS]
                for i in range(0, len(batch), RAW_VALUES_PAGE_ROWS)
            ]
            paged.append(
                [
                    (head_sql + ", ".join([one_row] * len(page)), tuple(chain.from_iterable(page)))
                    for page in pages
                ]
            )

        def writer_values(_i: int) -> tuple[int, int]:
            for pages, batch in zip(paged, batches, strict=True):
                db.execute("BEGIN")
                for sql, params in pages:
                    db.execute(sql, params)
                flush_postings(batch[-1][0])
                db.execute("COMMIT")
            return len(moves), 0

        writer = writer_values if how == "values" else writer_executemany

        seconds, cpu, accepted, refused = run_threads(1, writer, gc_mode)
        upto, posted = db.execute(
            "SELECT (SELECT seq FROM postings_upto WHERE id = 1), (SELECT count(*) FROM postings)"
        ).fetchone()
        expected = expected_balances(moves, accounts)
        db.execute("BEGIN")
        db.executemany(
            "UPDATE accounts SET balance = ? WHERE id = ?", [(b, i) for i, b in expected.items()]
        )
        db.execute(
            "UPDATE accounts SET balance = ? WHERE id = 0",
            (-sum(expected.values()),),
        )
        db.execute("COMMIT")
    finally:
        db.close()
    result = Result("d", len(moves), seconds, cpu, accepted, refused)
    result.extra["insert"] = how
    if seq - upto >= postings.POSTINGS_RUN_ROWS + RAW_BATCH_ROWS or posted != 2 * upto:
        result.problems.append(f"postings: {posted} up to the watermark {upto}, head {seq}")
    else:
        result.checks.append(f"postings up to {upto}")
    with Bank.open(path, durability=durability) as bank:
        result.checks.append("reopened by Bank.open")
        verify_bank(bank, result, moves, accounts)
    return result


# -- (g), (h), (i): PostgreSQL --------------------------------------------------------------

PGBENCH_CLIENTS = 8
PGBENCH_THREADS = 2
PGBENCH_SCALE_DEFAULT = 8  # pgbench's advice: a scale at least the number of clients


class Unavailable(Exception):
    """A variant that cannot run here (no server, no pgbench, an engine without a
    PostgreSQL backend); the run goes on without it."""


@dataclass
class PgRun:
    """The server of this run and its scratch databases (one per variant, `bench_...`)."""

    server: bench_pg.Server
    tag: str = field(default_factory=lambda: f"{os.getpid()}")
    pgbench_url: URL | None = None  # initialised once per run, by the first round of (i)

    def database(self, purpose: str) -> URL:
        """A fresh, empty database for `purpose` (dropped at the end of the run)."""
        return self.server.fresh_database(f"bench_{purpose}_{self.tag}")


def bench_pg_engine(
    variant: str,
    pg: PgRun,
    moves: list[Move],
    accounts: int,
    durability: str,
    gc_mode: str,
    wait: str,
    how: str,
) -> Result:
    """(g)/(p): (c)'s and (s)'s workloads through `Bank.open(url)` on a fresh PostgreSQL
    database (`how`: "many" or "batch", as `bench_window` takes it)."""
    url = pg.database("engine")
    try:
        bank = open_bank(url, accounts, durability)
    except Exception as exc:  # an engine without a PostgreSQL backend: the run goes on
        raise Unavailable(f"engine on PostgreSQL: unavailable ({one_line(exc)})") from exc
    return bench_window(variant, bank, moves, accounts, durability, gc_mode, wait, how)


def bench_pg_blocking(
    pg: PgRun, moves: list[Move], accounts: int, durability: str, gc_mode: str
) -> Result:
    """(q): (b)'s workload, 8 threads x blocking `transfer()`, through `Bank.open(url)`
    on a fresh PostgreSQL database (no target: it shows the blocking path there)."""
    url = pg.database("blocking")
    try:
        bank = open_bank(url, accounts, durability)
    except Exception as exc:  # an engine without a PostgreSQL backend: the run goes on
        raise Unavailable(f"engine on PostgreSQL: unavailable ({one_line(exc)})") from exc
    return bench_blocking(bank, moves, accounts, durability, gc_mode, "q")


def one_line(exc: BaseException) -> str:
    """`Type: first line of the message`, at most 200 characters."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:200]


def bench_pg_raw(
    pg: PgRun,
    moves: list[Move],
    accounts: int,
    gc_mode: str,
    methods: Sequence[str],
    sizes: Sequence[int],
) -> Result:
    """(h): every candidate writer at every batch size, on the ledger's tables; the
    fastest (verified) one is this round's ceiling. Rows, hashes, statements and
    parameters are built before each candidate's clock starts."""
    url = pg.database("raw")
    candidates: dict[str, float] = {}
    cpu_us: dict[str, float] = {}  # the client's CPU per row: what the writer itself costs
    best: Result | None = None
    problems: list[str] = []
    for size in sizes:
        work = bench_pg.build_batches(moves, accounts, OPENING_BALANCE, size)
        for method in methods:
            name = f"{method}@{size}"
            bench_pg.create_ledger_tables(url, accounts, OPENING_BALANCE)
            conn = bench_pg.connect_durable(url)
            try:
                write = bench_pg.prepare_writer(method, conn, work)

                def writer(_i: int, write: Callable[[], None] = write) -> tuple[int, int]:
                    write()
                    return len(moves), 0

                seconds, cpu, accepted, refused = run_threads(1, writer, gc_mode)
            finally:
                conn.close()
            found = bench_pg.check_ceiling(url, work, accounts, OPENING_BALANCE)
            problems += [f"{name}: {p}" for p in found]
            candidate = Result("h", len(moves), seconds, cpu, accepted, refused)
            candidates[name] = round(candidate.ops_s, 1)
            cpu_us[name] = round(candidate.cpu_us_per_op, 2)
            if not found and (best is None or candidate.ops_s > best.ops_s):
                best, best.extra["method"] = candidate, name
    if best is None:
        best = Result("h", len(moves), 0.0, 0.0, 0, 0)
    best.problems += problems
    best.checks.append("rows, chain head and every balance exact, per candidate")
    best.extra["candidates_rows_s"] = candidates
    best.extra["candidates_cpu_us_per_row"] = cpu_us
    return best


def bench_pgbench(pg: PgRun, seconds: int, scale: int) -> Result:
    """(i): `pgbench -c 8 -j 2 -T seconds` (TPC-B-like, durable) on its own database,
    initialised once per run with `pgbench -i -s scale`; its TPS is the ops/s."""
    if bench_pg.postgres_bin("pgbench") is None:
        raise Unavailable("pgbench: not installed (PostgreSQL's client programs), skipped")
    if pg.pgbench_url is None:
        pg.pgbench_url = pg.database("pgbench")
        bench_pg.pgbench_init(pg.pgbench_url, scale)
    before = bench_pg.pgbench_sums(pg.pgbench_url)
    run = bench_pg.pgbench_run(pg.pgbench_url, PGBENCH_CLIENTS, PGBENCH_THREADS, seconds)
    result = Result(
        "i",
        run.transactions,
        run.transactions / run.tps if run.tps > 0 else 0.0,  # so that ops/s is its TPS
        run.cpu_seconds,  # pgbench's own CPU, not the server's
        run.transactions - run.failed,
        run.failed,
        extra={"command": run.command, "scale": scale},
    )
    if run.failed:
        result.problems.append(f"{run.failed} failed transactions")
    result.problems += bench_pg.pgbench_check(pg.pgbench_url, before)
    result.checks.append("no failed transaction, history deltas == every level's balances")
    return result


# -- report ---------------------------------------------------------------------------------


def ratio(results: dict[str, Result], variant: str, reference: str) -> float | None:
    """ops/s of `variant` over ops/s of `reference`, if both ran."""
    if variant not in results or reference not in results:
        return None
    base = results[reference].ops_s
    return results[variant].ops_s / base if base > 0 else None


def target_verdict(results: dict[str, Result], variant: str) -> tuple[str, bool | None]:
    """('>=8x (a)', met?) for a variant with targets; met is None if a reference is missing."""
    if variant in FIGURE_TARGETS:
        figure, highest = FIGURE_TARGETS[variant]
        value = results[variant].extra.get(figure)
        return f"{figure} <= {highest:g}", None if value is None else value <= highest
    goals = TARGETS.get(variant, [])
    if not goals:
        return "-", None
    text = ", ".join(f">={goal:g}x ({ref})" for ref, goal in goals)
    met: bool | None = True
    for ref, goal in goals:
        r = ratio(results, variant, ref)
        if r is None:
            return text, None
        met = met and r >= goal
    return text, met


def environment(durability: str, gc_mode: str) -> dict[str, Any]:
    """What the figures depend on."""
    return {
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "sqlalchemy": sqlalchemy.__version__,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "durability": durability,
        "gc": gc_mode,
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def medians(runs: dict[str, list[Result]]) -> dict[str, Result]:
    """Each variant's median round: what the table and the JSON report."""
    out = {}
    for variant, rounds in runs.items():
        if variant in FIGURE_TARGETS:  # the round with the median figure, not speed
            figure = FIGURE_TARGETS[variant][0]
            out[variant] = sorted(rounds, key=lambda r: r.extra[figure])[(len(rounds) - 1) // 2]
        else:
            out[variant] = median_result(rounds)
    return out


def print_report(console: Console, runs: dict[str, list[Result]], durability: str) -> None:
    """The side-by-side table (medians of the rounds), then the targets round by round."""
    results = medians(runs)
    count = len(next(iter(runs.values()))) if runs else 0
    table = Table(
        title=f"bank benchmark (durability={durability} for a-d and g; median of {count} round(s))"
    )
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("variant", "left"),
        ("ops", "right"),
        ("seconds", "right"),
        ("ops/s", "right"),
        ("range ops/s", "right"),
        ("CPU us/op", "right"),
        ("x (n)", "right"),
        ("x (d)", "right"),
        ("x (h)", "right"),
        ("x (i)", "right"),
        ("target", "left"),
        ("met", "left"),
        ("verified", "left"),
    )
    for name, justify in columns:
        table.add_column(name, justify=justify, no_wrap=True)
    for variant, result in results.items():
        # SQLite variants against SQLite's references, PostgreSQL's against PostgreSQL's.
        pg = variant in PG_VARIANTS
        to_n = None if pg else ratio(results, variant, "n")
        to_d = None if pg else ratio(results, variant, "d")
        to_h = ratio(results, variant, "h") if pg else None
        to_i = ratio(results, variant, "i") if pg else None
        target, met = target_verdict(results, variant)
        speeds = [r.ops_s for r in runs[variant]]
        table.add_row(
            SHORT[variant],
            f"{result.ops:,}",
            f"{result.seconds:.2f}",
            f"{result.ops_s:,.0f}",
            f"{min(speeds):,.0f}-{max(speeds):,.0f}",
            f"{result.cpu_us_per_op:,.1f}",
            "-" if to_n is None else f"{to_n:.2f}",
            "-" if to_d is None else f"{to_d:.3f}",
            "-" if to_h is None else f"{to_h:.3f}",
            "-" if to_i is None else f"{to_i:.2f}",
            target,
            {None: "n/a", True: "[green]yes[/]", False: "[red]no[/]"}[met],
            "[green]yes[/]" if all(r.verified for r in runs[variant]) else "[red]NO[/]",
        )
    console.print(table)
    targets = Table(title="targets: ratios measured in this run (medians, then round by round)")
    for name, justify in (
        ("figure", "left"),
        ("ratio", "right"),
        ("by round", "left"),
        ("target", "right"),
        ("met (median)", "left"),
        ("rounds met", "right"),
    ):
        targets.add_column(name, justify=justify, no_wrap=True)
    for variant, goals in TARGETS.items():
        for reference, goal in goals:
            each = round_ratios(runs, variant, reference)
            if each is None:
                continue
            median = ratio(results, variant, reference)
            hits = sum(r >= goal for r in each)
            targets.add_row(
                f"{SHORT[variant]} / {SHORT[reference]}",
                "-" if median is None else f"{median:.3g}",
                ", ".join(f"{r:.3g}" for r in each),
                f">= {goal:g}",
                "[green]yes[/]" if median is not None and median >= goal else "[red]no[/]",
                f"{hits} of {len(each)}",
            )
    for variant, (figure, highest) in FIGURE_TARGETS.items():
        if variant not in runs:
            continue
        each = [float(r.extra[figure]) for r in runs[variant]]
        median = results[variant].extra[figure]
        hits = sum(v <= highest for v in each)
        targets.add_row(
            f"{SHORT[variant]}: {figure}",
            f"{median:.3g}",
            ", ".join(f"{v:.3g}" for v in each),
            f"<= {highest:g}",
            "[green]yes[/]" if median <= highest else "[red]no[/]",
            f"{hits} of {len(each)}",
        )
    if targets.row_count:
        console.print(targets)
    for variant, result in results.items():
        label = LABELS[variant]
        if result.extra.get("insert") == "values":
            label = label.replace("executemany", "INSERT ... VALUES pages of 100 rows")
        if variant == "h":
            label += (
                f" (fastest: {result.extra.get('method')}; rows/s per round: "
                + "; ".join(
                    ", ".join(f"{k} {v:,.0f}" for k, v in r.extra["candidates_rows_s"].items())
                    for r in runs["h"]
                )
                + ")"
            )
        if variant == "i":
            label += f" ({result.extra['command']}, scale {result.extra['scale']})"
        console.print(f"  ({variant}) {label}")


def to_json(
    runs: dict[str, list[Result]], args: argparse.Namespace, argv: Sequence[str]
) -> dict[str, Any]:
    """The machine-readable result: each variant's median round, and every round."""
    results = medians(runs)
    variants: dict[str, Any] = {}
    for variant, result in results.items():
        target, met = target_verdict(results, variant)
        variants[variant] = {
            "label": LABELS[variant],
            "ops": result.ops,
            "seconds": round(result.seconds, 4),
            "ops_s": round(result.ops_s, 1),
            "cpu_seconds": round(result.cpu_seconds, 4),
            "cpu_us_per_op": round(result.cpu_us_per_op, 2),
            "accepted": result.accepted,
            "rejected": result.rejected,
            "ratio_to_a": ratio(results, variant, "a"),
            "ratio_to_n": ratio(results, variant, "n"),
            "ratio_to_s": ratio(results, variant, "s"),
            "ratio_to_d": ratio(results, variant, "d"),
            "ratio_to_h": ratio(results, variant, "h"),
            "ratio_to_i": ratio(results, variant, "i"),
            "target": target,
            "target_met": met,
            "verified": all(r.verified for r in runs[variant]),
            "checks": result.checks,
            "problems": [p for r in runs[variant] for p in r.problems],
            **result.extra,
            "rounds": [
                {
                    "ops_s": round(r.ops_s, 1),
                    "seconds": round(r.seconds, 4),
                    "cpu_us_per_op": round(r.cpu_us_per_op, 2),
                    "verified": r.verified,
                    **(
                        {"candidates_rows_s": r.extra["candidates_rows_s"]}
                        if variant == "h"
                        else {}
                    ),
                }
                for r in runs[variant]
            ],
            "round_ratios": {
                reference: each
                for reference, _ in TARGETS.get(variant, [])
                if (each := round_ratios(runs, variant, reference)) is not None
            },
        }
    return {
        "command": ["scripts/bench.py", *argv],
        "accounts": args.accounts,
        "seed": args.seed,
        "rounds": args.rounds,
        "environment": environment(args.durability, args.gc),
        "variants": variants,
        "verified": all(r.verified for rounds in runs.values() for r in rounds),
        "targets_met": all(target_verdict(results, v)[1] is not False for v in results),
    }


# -- command line ---------------------------------------------------------------------------


def parse_ops(text: str) -> dict[str, int]:
    """`--ops 1000` (every variant) or `--ops c=50000,d=100000`."""
    ops: dict[str, int] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            if not sep:
                return dict.fromkeys(OPS_DEFAULT, int(name))
            if name.strip() not in OPS_DEFAULT:
                raise ValueError
            ops[name.strip()] = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--ops takes N or VARIANT=N,... with variants {','.join(OPS_DEFAULT)} "
                f"(got {part!r}; (i) runs for --pgbench-seconds)"
            ) from None
    if any(n < 1 for n in ops.values()):
        raise argparse.ArgumentTypeError("--ops counts must be positive")
    return ops


def parse_only(text: str) -> list[str]:
    """`--only a,c`: variants in the canonical order."""
    chosen = {v.strip() for v in text.split(",") if v.strip()}
    unknown = chosen - set(VARIANTS)
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"--only takes variants among {','.join(VARIANTS)} (got {text!r})"
        )
    return [v for v in VARIANTS if v in chosen]


#: (h)'s default candidates: binary COPY (the fastest by median at 256, 512 and 1,000 rows
#: in paired sweeps of the writers on 2 shared cores) and the one-statement unnest writer with
#: text-literal and binary arrays (what an engine would send); "values" and "pipeline"
#: were 2-3x slower (`--pg-raw unnest,values,copy,pipeline --pg-raw-batch 256,512,1000`).
PG_RAW_DEFAULT = ("copy", "unnest-text", "unnest")


def parse_raw_methods(text: str) -> list[str]:
    """`--pg-raw copy,unnest`."""
    chosen = [m.strip() for m in text.split(",") if m.strip()]
    unknown = set(chosen) - set(bench_pg.RAW_METHODS)
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"--pg-raw takes writers among {','.join(bench_pg.RAW_METHODS)} (got {text!r})"
        )
    return list(dict.fromkeys(chosen))


def parse_sizes(text: str) -> list[int]:
    """`--pg-raw-batch 256,512,1000`."""
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or any(not 1 <= n <= 10_000 for n in sizes):
        raise argparse.ArgumentTypeError(
            f"--pg-raw-batch takes row counts from 1 to 10,000, comma-separated (got {text!r})"
        )
    return list(dict.fromkeys(sizes))


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="bench.py",
        description=(
            "Throughput of the bank engine against a naive ORM baseline (a) and the raw "
            "sqlite3 ceiling (d), measured side by side in one run."
        ),
        epilog=(
            "variants: "
            + "; ".join(f"({v}) {LABELS[v]}" for v in VARIANTS)
            + ". Targets at default durability and collector on 2 cores: "
            + "; ".join(
                f"({v}) >= {goal:g}x ({ref})" for v, goals in TARGETS.items() for ref, goal in goals
            )
            + f"; --long: RSS growth < {LONG_RSS_GROWTH_MB_MAX:g} MB, throughput at the long "
            f"run's ledger / empty >= {LONG_RATIO_MIN:g}."
        ),
    )
    parser.add_argument(
        "--only", type=parse_only, default=list(VARIANTS), help="variants to run (default: all)"
    )
    parser.add_argument(
        "--ops",
        type=parse_ops,
        default={},
        help="operations per variant: N for all, or VARIANT=N,... (defaults: "
        + ", ".join(f"{v}={n:,}" for v, n in OPS_DEFAULT.items())
        + ")",
    )
    parser.add_argument(
        "--ops-scale",
        type=float,
        default=1.0,
        help="multiply the default operation counts (e.g. 0.01 for a smoke run)",
    )
    parser.add_argument(
        "--durability",
        choices=("full", "normal"),
        default="full",
        help="SQLite synchronous level for (a)-(d) (default full; (e) is always normal)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=ROUNDS_DEFAULT,
        help=f"rounds of every chosen variant; each reports its median round "
        f"(default {ROUNDS_DEFAULT})",
    )
    parser.add_argument("--accounts", type=int, default=ACCOUNTS_DEFAULT, help="accounts (>= 2)")
    parser.add_argument("--seed", type=int, default=SEED_DEFAULT, help="workload seed")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="engine worker threads for (b), (c), (s), (e), (g) (default: Bank.open's)",
    )
    parser.add_argument(
        "--wait",
        choices=("result", "wait"),
        default="result",
        help="how (c)/(e) wait for a window: per-future .result() (default, faster) "
        "or concurrent.futures.wait",
    )
    parser.add_argument(
        "--gc",
        choices=("default", "throughput"),
        default="default",
        help="collector settings during every timed region: CPython's untouched defaults "
        "(default, as in an application) or bank.simulate.tuning.throughput_gc, to compare",
    )
    parser.add_argument(
        "--long",
        action="store_true",
        help="also measure, once, the RSS growth over --long-ops pipelined operations and "
        "the throughput on the ledger they leave against an empty one (minutes)",
    )
    parser.add_argument(
        "--long-ops",
        type=int,
        default=LONG_OPS_DEFAULT,
        help=f"operations of --long's run (default {LONG_OPS_DEFAULT:,})",
    )
    parser.add_argument(
        "--raw-insert",
        choices=("executemany", "values"),
        default="executemany",
        help="how (d) inserts each 1,000-row batch: DB-API executemany (default, as the issue "
        "defines the ceiling) or multi-row INSERT ... VALUES pages of 100 rows",
    )
    parser.add_argument(
        "--pg-url",
        default=os.environ.get("BANK_BENCH_POSTGRES_URL"),
        help="PostgreSQL server for (g)-(i) (an SQLAlchemy postgresql+psycopg:// URL; the "
        "run creates and drops its own bench_... databases there). Default: "
        "BANK_BENCH_POSTGRES_URL, else a throwaway cluster from the PostgreSQL binaries, "
        "else (g)-(i) are skipped",
    )
    parser.add_argument(
        "--pg-raw",
        type=parse_raw_methods,
        default=list(PG_RAW_DEFAULT),
        help="candidate writers of the raw PostgreSQL ceiling (h), the fastest of which is "
        f"the ceiling: some of {','.join(bench_pg.RAW_METHODS)} "
        f"(default {','.join(PG_RAW_DEFAULT)})",
    )
    parser.add_argument(
        "--pg-raw-batch",
        type=parse_sizes,
        default=[bench_pg.RAW_BATCH_DEFAULT],
        help=f"rows per transaction of (h), e.g. 256,512,1000 (default {bench_pg.RAW_BATCH_DEFAULT})",
    )
    parser.add_argument(
        "--pgbench-seconds",
        type=int,
        help=f"duration of (i) (default {PGBENCH_SECONDS_DEFAULT} s times --ops-scale, at least 1)",
    )
    parser.add_argument(
        "--pgbench-scale",
        type=int,
        default=PGBENCH_SCALE_DEFAULT,
        help=f"pgbench -i -s for (i) (default {PGBENCH_SCALE_DEFAULT}: one branch per client)",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the result as JSON")
    parser.add_argument(
        "--dir",
        type=Path,
        help="directory for the ledger files, kept after the run (default: a temporary one)",
    )
    return parser


def run_variant(
    variant: str,
    where: Path,
    ops: int,
    stream: list[Move],
    args: argparse.Namespace,
    pg: PgRun | None = None,
) -> Result:
    """One round of one variant, on a fresh ledger file (or database); it takes a prefix
    of `stream`. Raises `Unavailable` for a variant that cannot run here."""
    moves = stream[:ops]
    if variant in PG_VARIANTS:
        if pg is None:
            raise Unavailable("no PostgreSQL server")
        if variant in ("g", "p"):
            how = "batch" if variant == "p" else "many"
            return bench_pg_engine(
                variant, pg, moves, args.accounts, args.durability, args.gc, args.wait, how
            )
        if variant == "q":
            return bench_pg_blocking(pg, moves, args.accounts, args.durability, args.gc)
        if variant == "h":
            return bench_pg_raw(pg, moves, args.accounts, args.gc, args.pg_raw, args.pg_raw_batch)
        return bench_pgbench(pg, ops, args.pgbench_scale)
    path = where / f"bench-{variant}.db"
    remove_ledger(path)
    if variant in ("a", "n"):
        threads = NAIVE_THREADS if variant == "a" else 1
        return bench_naive(variant, path, moves, args.accounts, args.durability, args.gc, threads)
    if variant == "b":
        return bench_blocking(path, moves, args.accounts, args.durability, args.gc)
    if variant == "o":
        return bench_open(path, ops, args.seed, args.durability, args.accounts)
    if variant in ("f", "m"):
        shape = None if variant == "f" else (WINDOW_THREADS, WINDOW_OPS)
        return bench_simulate(variant, path, ops, args.seed, args.durability, shape, args.accounts)
    if variant in ("c", "e", "s"):
        durability = "normal" if variant == "e" else args.durability
        how = "batch" if variant == "s" else "many"
        return bench_window(
            variant, path, moves, args.accounts, durability, args.gc, args.wait, how
        )
    return bench_raw(path, moves, args.accounts, args.durability, args.gc, args.raw_insert)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen variants; exit status 0 if every variant verified its result."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.accounts < 2:
        parser.error("--accounts must be at least 2")
    if args.ops_scale <= 0:
        parser.error("--ops-scale must be positive")
    if not 1 <= args.rounds <= 100:
        parser.error("--rounds must be from 1 to 100")
    if args.workers is not None and not 1 <= args.workers <= 64:
        parser.error("--workers must be from 1 to 64")
    if args.pgbench_seconds is not None and args.pgbench_seconds < 1:
        parser.error("--pgbench-seconds must be at least 1")
    if args.pgbench_scale < 1:
        parser.error("--pgbench-scale must be at least 1")
    if args.long_ops < 1:
        parser.error("--long-ops must be at least 1")
    global WORKERS  # noqa: PLW0603 (a run-wide setting of this script)
    WORKERS = args.workers
    ops = {v: max(1, round(n * args.ops_scale)) for v, n in OPS_DEFAULT.items()}
    ops.update(args.ops)
    ops["i"] = args.pgbench_seconds or max(1, round(PGBENCH_SECONDS_DEFAULT * args.ops_scale))
    console = Console()
    if not console.is_terminal:
        console = Console(width=170)  # a log file: keep the table on one line per row
    console.print(
        f"[bold]workload[/]: transfers among {args.accounts} accounts (seed {args.seed}), "
        f"amounts 1..{AMOUNT_MAX:,} cents, opening balance {OPENING_BALANCE:,} and overdraft "
        f"limit {OVERDRAFT_LIMIT:,} per account (nothing is refused); every variant takes a "
        "prefix of the same stream of (source, target, amount) tuples, made before the clock "
        "starts; the callers build their commands while it runs (only the ceilings (d), (h) "
        "build their rows and hashes before)."
    )
    console.print(
        f"[bold]durability[/]: {args.durability} for (a)-(d): WAL + synchronous="
        f"{args.durability.upper()} + foreign_keys=ON, for the engine, the naive ORM file "
        "and raw sqlite3 alike; (e) uses normal."
    )
    console.print(
        f"[bold]gc[/]: {args.gc} in every timed region"
        + (
            " (bank.simulate.tuning.throughput_gc: what exists frozen out of the collector's "
            "way, young collections every 20,000 allocations)"
            if args.gc == "throughput"
            else " (CPython's defaults, untouched, as in an application)"
        )
        + f"; workers: {'Bank.open default' if WORKERS is None else WORKERS}"
    )
    load_before = os.getloadavg()[0]
    runs: dict[str, list[Result]] = {v: [] for v in args.only}
    skipped: dict[str, str] = {}
    # One seeded stream for the whole run: every variant and round takes a prefix of it
    # ((f), (m) generate their own workload, (i) is pgbench's).
    stream = make_moves(
        max((ops[v] for v in args.only if v not in ("f", "m", "o", "i")), default=0),
        args.accounts,
        args.seed,
    )
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="bank-bench-"))
        where = args.dir or Path(tmp)
        where.mkdir(parents=True, exist_ok=True)
        pg: PgRun | None = None
        server_note = ""
        if any(v in PG_VARIANTS for v in args.only):
            server, server_note = stack.enter_context(bench_pg.find_server(args.pg_url))
            pg = PgRun(server) if server is not None else None
            console.print(
                f"[bold]postgresql[/]: {server_note}"
                + (
                    "; synchronous_commit=on for (g), (p), (h), (i)"
                    if pg is not None
                    else "; (g), (p), (h), (i) skipped"
                )
            )
            if pg is None:
                for variant in PG_VARIANTS:
                    if variant in runs:
                        skipped[variant] = f"no PostgreSQL server ({server_note})"
                        del runs[variant]
            elif pg.server.fsync != "on":
                console.print(
                    "[red]the server runs with fsync off: no PostgreSQL figure is durable[/]"
                )
        for round_no in range(1, args.rounds + 1):
            for variant in args.only:
                if variant in skipped:
                    continue
                size = f"{ops[variant]} s" if variant == "i" else f"{ops[variant]:,} ops"
                console.print(
                    f"round {round_no}/{args.rounds}: ({variant}) {LABELS[variant]}: {size} ..."
                )
                try:
                    result = run_variant(variant, where, ops[variant], stream, args, pg)
                except Unavailable as exc:
                    skipped[variant] = str(exc)
                    del runs[variant]
                    console.print(f"    [yellow]{exc}[/]")
                    continue
                runs[variant].append(result)
                extra = ", ".join(f"{k} {v}" for k, v in result.extra.items())
                console.print(
                    f"    {result.ops_s:,.0f} ops/s ({result.seconds:.2f} s, "
                    f"{result.cpu_us_per_op:.1f} us CPU per op, "
                    f"{result.accepted:,} accepted, {result.rejected:,} refused"
                    + (f", {extra}" if extra else "")
                    + f"); checks: {', '.join(result.checks)}"
                    + (
                        f"; [red]PROBLEMS: {'; '.join(result.problems)}[/]"
                        if result.problems
                        else ""
                    )
                )
        long: dict[str, Any] | None = None
        if args.long:
            console.print(
                f"--long: {args.long_ops:,} pipelined operations ((s)'s callers) on one ledger, "
                "between two throughput probes ..."
            )
            long = bench_long(
                where / "bench-long.db",
                args.accounts,
                args.durability,
                args.gc,
                args.seed,
                args.long_ops,
            )
    print_report(console, runs, args.durability)
    if long is not None:
        console.print(
            f"  --long: RSS {long['rss_before_mb']:,.1f} -> {long['rss_after_mb']:,.1f} MiB over "
            f"{long['ops']:,} pipelined operations ({long['long_run_ops_s']:,.0f} ops/s, "
            f"{long['long_run_cpu_us_per_op']:.1f} us CPU per op): growth "
            f"{long['rss_growth_mb']:,.1f} MiB (target < {LONG_RSS_GROWTH_MB_MAX:g}: "
            f"{'met' if long['rss_target_met'] else 'NOT met'}); throughput at "
            f"{long['rows_before_probe_at_end']:,} rows {long['full_ops_s']:,.0f} ops/s against "
            f"{long['empty_ops_s']:,.0f} on the empty ledger: {long['full_over_empty']:.3g} "
            f"(target >= {LONG_RATIO_MIN:g}: {'met' if long['ratio_target_met'] else 'NOT met'})"
            + (f"; [red]PROBLEMS: {'; '.join(long['problems'])}[/]" if long["problems"] else "")
        )
    for variant, why in skipped.items():
        console.print(f"  ({variant}) skipped: {why}")
    document = to_json(runs, args, argv)
    document["skipped"] = skipped
    if long is not None:
        document["long"] = long
        document["verified"] = document["verified"] and long["verified"]
    env = document["environment"]
    env["load_average_1m_before"] = round(load_before, 2)
    if pg is not None:
        env["postgresql"] = {
            "version": pg.server.version,
            "fsync": pg.server.fsync,
            "server": server_note,
        }
    console.print(
        f"python {env['python']}, sqlite {env['sqlite']}, SQLAlchemy {env['sqlalchemy']}, "
        f"{env['cpus']} CPUs, load average {load_before:.2f} before and "
        f"{env['load_average_1m']:.2f} after. Ratios matter more than absolute figures on a "
        "noisy machine."
    )
    if args.json is not None:
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        console.print(f"wrote {args.json}")
    if not document["verified"]:
        console.print("[red]a variant failed its own verification[/]")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
