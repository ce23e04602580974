"""Benchmark of `bank audit`: throughput in transfers/s and peak memory at two ledger sizes.

The ledgers are written directly with sqlite3 and the documented chain formula
(much faster than running the engine; the audit is what is measured) and cached
in a temp directory, so a second run only audits. Memory is measured with
`tracemalloc` (peak Python allocations during the audit) and `ru_maxrss` (the
process high-water mark, so run it once per size with `--only` for clean RSS
numbers); the point is that neither grows with the ledger's length.

    .venv/bin/python scripts/bench_audit.py                  # 250k and 1M transfers
    .venv/bin/python scripts/bench_audit.py --sizes 100000 --json
    .venv/bin/python scripts/bench_audit.py --sizes 1000000 \
        --db postgresql+psycopg://postgres@127.0.0.1:55432/postgres   # on PostgreSQL

The target is 1,000,000 transfers/s on two cores (the audit splits the hash check
across processes, `bank.ledger.audit_parallel`); each result also gives the CPU
seconds spent (parent and workers) and the load average, because on a shared
machine the wall-clock figure says as much about the neighbours as about the audit.

With `--floor` it measures what no audit can skip, one step at a time in one process:
reading a transfer's row from sqlite3, building its chain message, SHA-256 and the
compare. Their sum per row, over the cores, bounds the audit from above:

    .venv/bin/python scripts/bench_audit.py --floor --sizes 1000000

With `--open` it measures `Bank.open` instead (the open-time verification of
`bank.ledger.verify` plus migration check, recovery and thread start, then
close), on the same ledgers; the target is at most 3 s for 1,000,000 transfers:

    .venv/bin/python scripts/bench_audit.py --open --sizes 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sqlite3
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bank.engine import Bank
from bank.ledger import models, verify
from bank.ledger.audit import audit
from bank.ledger.audit_parallel import processes_default
from bank.ledger.chain import GENESIS, account_event_hash, transfer_hash
from bank.ledger.migrate import head_revision, upgrade_to_head
from bank.ledger.postings import POSTINGS_RUN_ROWS
from bank.ledger.sqlite import Durability, create_ledger_engine, ledger_url
from bank.limits import CASH_ACCOUNT_ID

TARGET_TRANSFERS_PER_S = 1_000_000
TARGET_OPEN_S = 3.0
OPEN_RUNS = 3
ROWS_PER_COMMIT = 50_000


def _generate(
    event_prev: str,
    transfers: int,
    accounts: int,
    seed: int,
    add_account: Callable[[tuple[Any, ...], tuple[Any, ...]], None],
    add_transfers: Callable[[list[tuple[Any, ...]]], None],
) -> list[int]:
    """Make the rows of a valid ledger after its `@cash` opening (`event_prev` is that
    event's hash); returns the final balances by account id.

    80% transfers, 10% deposits, 10% withdrawals, one row in ten with a key; a
    move that would break an overdraft limit is replaced by a deposit, so the
    ledger audits clean. Rows are handed over `ROWS_PER_COMMIT` at a time.
    """
    rng = random.Random(seed)
    limits = [0] * (accounts + 1)
    ts_us = 1_700_000_000_000_000
    for i in range(1, accounts + 1):
        limit = rng.choice((0, 0, 0, 10_000, 1_000_000))
        limits[i] = limit
        name = f"acct-{i:07d}"
        event_prev = account_event_hash(event_prev, i + 1, i, "open", limit, 0, ts_us, name)
        add_account((i, name, limit, 0), (i + 1, i, "open", name, limit, 0, ts_us, event_prev))
    balances = [0] * (accounts + 1)

    def after(debit: int, credit: int) -> tuple[int, int]:
        return balances[debit], balances[credit]

    prev = GENESIS
    rows: list[tuple[Any, ...]] = []
    for seq in range(1, transfers + 1):
        roll = rng.random()
        amount = rng.randint(1, 10_000)
        a = rng.randint(1, accounts)
        if roll < 0.1:
            kind, debit, credit = "deposit", CASH_ACCOUNT_ID, a
        elif roll < 0.2:
            kind, debit, credit = "withdrawal", a, CASH_ACCOUNT_ID
        else:
            b = rng.randint(1, accounts - 1)
            kind, debit, credit = "transfer", a, b if b < a else b + 1
        if debit != CASH_ACCOUNT_ID and balances[debit] - amount < -limits[debit]:
            kind, debit, credit = "deposit", CASH_ACCOUNT_ID, debit
        balances[debit] -= amount
        balances[credit] += amount
        key = f"k-{seq}" if seq % 10 == 0 else None
        ts_us += 7
        # The running balances after the row (revision 0005) close each row; hash format 3
        # (revision 0006) covers them.
        running = after(debit, credit)
        prev = transfer_hash(prev, seq, kind, debit, credit, amount, ts_us, key, *running)
        rows.append((seq, key, kind, debit, credit, amount, ts_us, prev, *running))
        if len(rows) >= ROWS_PER_COMMIT:
            add_transfers(rows)
            rows = []
    add_transfers(rows)
    return balances


#: Postings as the batch writer leaves them (revision 0007): every run of
#: POSTINGS_RUN_ROWS rows flushed, the rest of the rows a tail above the watermark W.
_POSTINGS_SQL = (
    "INSERT INTO postings (account_id, seq) SELECT account_id, seq FROM ("
    "SELECT debit_account_id AS account_id, seq FROM transfers WHERE seq <= {w} UNION ALL "
    "SELECT credit_account_id AS account_id, seq FROM transfers WHERE seq <= {w}"
    ") AS sides ORDER BY account_id, seq"
)


def _postings_statements(transfers: int) -> list[str]:
    """The SQL that gives a ledger of `transfers` rows its postings and W (none before 0007)."""
    if "postings" not in models.Base.metadata.tables:
        return []
    w = transfers - transfers % POSTINGS_RUN_ROWS
    return [_POSTINGS_SQL.format(w=w), f"UPDATE postings_upto SET seq = {w}"]


def build_ledger(path: Path, transfers: int, accounts: int = 1000, seed: int = 1) -> None:
    """Write a valid SQLite ledger of `transfers` rows over `accounts` customer accounts."""
    engine = create_ledger_engine(ledger_url(path), Durability.NORMAL)
    upgrade_to_head(engine)
    engine.dispose()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA synchronous = OFF")
    db.execute("BEGIN")
    event_prev = db.execute("SELECT hash FROM account_events ORDER BY seq DESC LIMIT 1").fetchone()[
        0
    ]

    def add_account(account: tuple[Any, ...], event: tuple[Any, ...]) -> None:
        db.execute("INSERT INTO accounts VALUES (?, ?, ?, ?)", account)
        db.execute(
            "INSERT INTO account_events (seq, account_id, kind, name, overdraft_limit, "
            "transfer_seq, ts_us, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            event,
        )

    def add_transfers(rows: list[tuple[Any, ...]]) -> None:
        db.executemany(
            "INSERT INTO transfers (seq, key, kind, debit_account_id, credit_account_id, amount, "
            "ts_us, hash, debit_balance, credit_balance) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )

    balances = _generate(event_prev, transfers, accounts, seed, add_account, add_transfers)
    db.executemany(
        "UPDATE accounts SET balance = ? WHERE id = ?", [(b, i) for i, b in enumerate(balances)]
    )
    for statement in _postings_statements(transfers):
        db.execute(statement)
    db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()


def build_postgres_ledger(url: str, transfers: int, accounts: int = 1000, seed: int = 1) -> None:
    """Write the same ledger into the empty PostgreSQL database at `url`, with COPY.

    The migrations create the tables; the rows they write (`@cash`, its opening,
    `chain_formats`) are replaced by those of a scratch SQLite ledger at head, so that
    both backends hold the same rows with the same hashes.
    """
    import psycopg
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        upgrade_to_head(engine)
        with engine.begin() as conn:
            for table in ("transfers", "account_events", "accounts", "chain_formats"):
                conn.execute(text(f"DELETE FROM {table}"))
            conn.execute(text("DELETE FROM alembic_version"))
    finally:
        engine.dispose()
    with tempfile.TemporaryDirectory() as scratch:
        seed_path = Path(scratch) / "seed.db"
        seed_engine = create_ledger_engine(ledger_url(seed_path), Durability.NORMAL)
        upgrade_to_head(seed_engine)
        seed_engine.dispose()
        src = sqlite3.connect(seed_path)
        initial: dict[str, tuple[list[str], list[Any]]] = {}
        for table in ("accounts", "account_events", "chain_formats", "alembic_version"):
            names = [row[1] for row in src.execute(f"PRAGMA table_info({table})")]
            rows = src.execute(f"SELECT {', '.join(names)} FROM {table}").fetchall()
            initial[table] = (names, rows)
        src.close()
    info = url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(info) as pg, pg.cursor() as cur:
        for table, (names, rows) in initial.items():
            with cur.copy(f"COPY {table} ({', '.join(names)}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        event_names, event_rows = initial["account_events"]
        event_prev = max(event_rows)[event_names.index("hash")]
        new_accounts: list[tuple[Any, ...]] = []
        new_events: list[tuple[Any, ...]] = []

        def add_account(account: tuple[Any, ...], event: tuple[Any, ...]) -> None:
            new_accounts.append(account)
            new_events.append(event)

        def add_transfers(rows: list[tuple[Any, ...]]) -> None:
            if new_accounts:  # the accounts first: transfers reference them
                with cur.copy("COPY accounts (id, name, overdraft_limit, balance) FROM STDIN") as c:
                    for row in new_accounts:
                        c.write_row(row)
                with cur.copy(
                    "COPY account_events (seq, account_id, kind, name, overdraft_limit, "
                    "transfer_seq, ts_us, hash) FROM STDIN"
                ) as c:
                    for row in new_events:
                        c.write_row(row)
                new_accounts.clear()
            with cur.copy(
                "COPY transfers (seq, key, kind, debit_account_id, credit_account_id, amount, "
                "ts_us, hash, debit_balance, credit_balance) FROM STDIN"
            ) as c:
                for row in rows:
                    c.write_row(row)

        balances = _generate(event_prev, transfers, accounts, seed, add_account, add_transfers)
        cur.executemany(
            "UPDATE accounts SET balance = %s WHERE id = %s",
            [(b, i) for i, b in enumerate(balances)],
        )
        for statement in _postings_statements(transfers):
            cur.execute(statement)
    with psycopg.connect(info, autocommit=True) as pg:
        pg.execute("VACUUM ANALYZE")


def cached_ledger(cache: Path, transfers: int) -> Path:
    """The ledger of that size in `cache`, built on first use."""
    path = cache / f"bench-audit-r{head_revision()}-{transfers}.db"  # a revision of its own
    if not path.exists():
        partial = path.with_suffix(".partial")
        for stale in cache.glob(partial.name + "*"):
            stale.unlink()
        started = time.perf_counter()
        build_ledger(partial, transfers)
        partial.rename(path)
        print(f"built {path} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return path


def _cpu_s() -> float:
    """CPU seconds of this process and of its waited-for children (the audit's workers)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def measure(db: Path | str, processes: int | None = None) -> dict[str, Any]:
    """Audit `db` (a path or URL) four times: warm the cache, time two runs, trace one
    run's memory (the timed runs are not traced: `tracemalloc` slows every allocation).

    Reports the faster timed run, the CPU seconds per run (this process and its worker
    processes: what the audit costs on a machine shared with other work) and the
    load average seen, so that a figure taken on a busy machine can be judged.
    """
    audit(db, processes=processes)
    rss_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    runs = []
    for _ in range(2):
        cpu_before = _cpu_s()
        report = audit(db, processes=processes)
        runs.append((report.duration_s, _cpu_s() - cpu_before, report))
    rss_after_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children_rss_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    tracemalloc.start()
    audit(db, processes=processes)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    duration_s, cpu_s, report = min(runs, key=lambda run: run[0])
    return {
        "db": str(db),
        "transfers": report.transfers_checked,
        "ok": report.ok,
        "duration_s": round(duration_s, 3),
        "durations_s": [round(run[0], 3) for run in runs],
        "transfers_per_s": round(report.transfers_checked / duration_s),
        "cpu_s": round(cpu_s, 3),
        "transfers_per_cpu_s": round(report.transfers_checked / cpu_s) if cpu_s else 0,
        "processes": processes or processes_default(),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "tracemalloc_peak_mib": round(peak / 2**20, 2),
        "max_rss_mib": round(rss_after_kb / 1024, 1),
        "max_rss_growth_mib": round((rss_after_kb - rss_before_kb) / 1024, 1),
        "worker_max_rss_mib": round(children_rss_kb / 1024, 1),
    }


def cached_postgres_ledger(server: str, transfers: int) -> str:
    """The URL of a database `audit_bench_<transfers>` on `server` holding that ledger,
    built with COPY on first use (drop it with `DROP DATABASE` when done)."""
    import psycopg

    name = f"audit_bench_{transfers}_r{head_revision()}"
    base, _, _ = server.rpartition("/")
    url = f"{base}/{name}"
    admin = server.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(admin, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if exists is not None:
            try:
                with psycopg.connect(url.replace("+psycopg", "", 1)) as db:
                    row = db.execute("SELECT count(*) FROM transfers").fetchone()
                if row is not None and row[0] == transfers:
                    return url
            except psycopg.Error:
                pass
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    started = time.perf_counter()
    build_postgres_ledger(url, transfers)
    print(f"built {url} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return url


def measure_open(path: Path, runs: int = OPEN_RUNS) -> dict[str, Any]:
    """Time `Bank.open` (and, apart, `verify_ledger` alone) `runs` times after a warm-up
    open; report the median and the worst. A refused open is a failure."""
    opens: list[float] = []
    verifies: list[float] = []
    Bank.open(path).close()  # warm the page cache
    for _ in range(runs):
        started = time.perf_counter()
        bank = Bank.open(path)
        opens.append(time.perf_counter() - started)
        bank.close()
        engine = create_ledger_engine(ledger_url(path), Durability.FULL)
        try:
            with engine.connect() as conn:
                started = time.perf_counter()
                report = verify.verify_ledger(conn)
                verifies.append(time.perf_counter() - started)
        finally:
            engine.dispose()
        if not report.ok:
            raise SystemExit(f"{path}: {report.problems}")
    opens.sort()
    verifies.sort()
    return {
        "transfers": int(path.stem.rsplit("-", 1)[1]),
        "open_s_median": round(opens[len(opens) // 2], 3),
        "open_s_max": round(opens[-1], 3),
        "verify_s_median": round(verifies[len(verifies) // 2], 3),
    }


def main_open(args: argparse.Namespace) -> int:
    """`--open`: the cost of opening each ledger size."""
    results = [measure_open(cached_ledger(args.cache, n)) for n in args.sizes]
    passed = all(r["open_s_median"] <= TARGET_OPEN_S for r in results)
    if args.json:
        print(json.dumps({"target_open_s": TARGET_OPEN_S, "results": results}, indent=2))
    else:
        table = Table(
            title=f"Bank.open benchmark (target <= {TARGET_OPEN_S} s, median of {OPEN_RUNS})"
        )
        for column in ("transfers", "open s (median)", "open s (max)", "verify s (median)"):
            table.add_column(column, justify="right")
        for r in results:
            table.add_row(
                f"{r['transfers']:,}",
                f"{r['open_s_median']:.3f}",
                f"{r['open_s_max']:.3f}",
                f"{r['verify_s_median']:.3f}",
            )
        Console().print(table)
    return 0 if passed else 1


#: The columns the fast path reads of every transfer (`bank.ledger.audit_ranges`).
FLOOR_COLUMNS = (
    "seq, key, kind, debit_account_id, credit_account_id, amount, ts_us, hash, "
    "debit_balance, credit_balance, hold_seq, expires_us, link_first, link_count"
)


def measure_floor(path: Path, rows: int) -> dict[str, Any]:
    """What one transfer costs at the least, in one process, for the steps no audit can
    skip: read its row from sqlite3, build its chain message, SHA-256 it and compare.
    Each step is timed alone over the first `rows` transfers (format-3 messages, every
    one checked against its stored hash); their sum per row, over the cores, bounds the
    audit's transfers/s from above, before any other check (postings, integrity, replay)."""
    import gc
    from hashlib import sha256

    from bank.ledger.audit_chain import KIND_CODES
    from bank.ledger.audit_ranges import _V3_KEY, _V3_NO_KEY

    db = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
    gc.disable()  # as in the audit's worker processes (this script is the application)
    try:
        query = f"SELECT {FLOOR_COLUMNS} FROM transfers WHERE seq <= ?"
        fetched = db.execute(query, (rows,)).fetchall()  # warms the page cache, untimed
        started = time.perf_counter()
        for _ in db.execute(query, (rows,)):
            pass
        read_s = time.perf_counter() - started
    finally:
        db.close()
        gc.enable()
    accounts = {i: f"i{i};" for r in fetched for i in (r[3], r[4])}
    gc.disable()
    started = time.perf_counter()
    prev = GENESIS
    texts = []
    for r in fetched:  # each message chained to the stored hash before it
        code, debit, credit = KIND_CODES[r[2]], accounts[r[3]], accounts[r[4]]
        if r[1] is None:
            texts.append(_V3_NO_KEY % (prev, r[0], code, debit, credit, r[5], r[6], r[8], r[9]))
        else:
            size = len(r[1].encode())
            texts.append(
                _V3_KEY % (prev, r[0], code, debit, credit, r[5], r[6], size, r[1], r[8], r[9])
            )
        prev = r[7]
    format_s = time.perf_counter() - started
    stored = [r[7] for r in fetched]
    started = time.perf_counter()
    same = sum(map(str.__eq__, (sha256(t.encode()).hexdigest() for t in texts), stored))
    hash_s = time.perf_counter() - started
    gc.enable()
    n = len(fetched)
    if same != n:  # the floor is only a floor if it did the real check
        raise SystemExit(f"the floor's messages hashed to {same} of {n} stored hashes")
    per_row_us = {
        "read": 1e6 * read_s / n,
        "format": 1e6 * format_s / n,
        "sha256": 1e6 * hash_s / n,
    }
    total_us = sum(per_row_us.values())
    cores = processes_default()
    return {
        "rows": n,
        "hashes_verified": same,
        "us_per_row": {k: round(v, 3) for k, v in per_row_us.items()},
        "us_per_row_total": round(total_us, 3),
        "cores": cores,
        "ceiling_transfers_per_s": round(cores * 1e6 / total_us),
        "load": round(os.getloadavg()[0], 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[250_000, 1_000_000],
        help="ledger lengths in transfers (default: 250000 1000000)",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(tempfile.gettempdir()) / "bank-bench-audit",
        help="directory where built ledgers are kept between runs",
    )
    parser.add_argument(
        "--db",
        help="a PostgreSQL server URL (postgresql+psycopg://...): audit a ledger in a database "
        "audit_bench_<size> there (built with COPY on first use) instead of an SQLite file",
    )
    parser.add_argument(
        "--processes", type=int, default=None, help="audit processes (default: one per core)"
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--open", action="store_true", help="measure Bank.open (its verification) instead"
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="measure the per-row floor of the hash check (read, format, SHA-256) instead",
    )
    args = parser.parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    if args.open:
        return main_open(args)
    if args.floor:
        floors = [measure_floor(cached_ledger(args.cache, n), min(n, 500_000)) for n in args.sizes]
        for floor in floors:
            print(json.dumps(floor) if args.json else floor)
        return 0
    if args.db is not None:
        results = [measure(cached_postgres_ledger(args.db, n), args.processes) for n in args.sizes]
    else:
        results = [measure(cached_ledger(args.cache, n), args.processes) for n in args.sizes]
    passed = all(r["ok"] and r["transfers_per_s"] >= TARGET_TRANSFERS_PER_S for r in results)
    if args.json:
        print(
            json.dumps(
                {"target_transfers_per_s": TARGET_TRANSFERS_PER_S, "results": results}, indent=2
            )
        )
    else:
        table = Table(
            title=f"bank audit benchmark (target >= {TARGET_TRANSFERS_PER_S:,} transfers/s)"
        )
        for column in (
            "transfers",
            "clean",
            "seconds",
            "transfers/s",
            "CPU s",
            "processes",
            "load",
            "traced peak MiB",
            "max RSS MiB",
            "worker RSS MiB",
        ):
            table.add_column(column, justify="right")
        for r in results:
            table.add_row(
                f"{r['transfers']:,}",
                "yes" if r["ok"] else "NO",
                f"{r['duration_s']:.2f}",
                f"{r['transfers_per_s']:,}",
                f"{r['cpu_s']:.2f}",
                str(r["processes"]),
                f"{r['load_average_1m']:.1f}",
                f"{r['tracemalloc_peak_mib']:.2f}",
                f"{r['max_rss_mib']:.1f}",
                f"{r['worker_max_rss_mib']:.1f}",
            )
        Console().print(table)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
