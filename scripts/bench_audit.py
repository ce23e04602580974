"""Benchmark of `bank audit`: throughput in transfers/s and peak memory at two ledger sizes.

The ledgers are written directly with sqlite3 and the documented chain formula
(much faster than running the engine; the audit is what is measured) and cached
in a temp directory, so a second run only audits. Memory is measured with
`tracemalloc` (peak Python allocations during the audit) and `ru_maxrss` (the
process high-water mark, so run it once per size with `--only` for clean RSS
numbers); the point is that neither grows with the ledger's length.

    .venv/bin/python scripts/bench_audit.py                  # 250k and 1M transfers
    .venv/bin/python scripts/bench_audit.py --sizes 100000 --json

With `--open` it measures `Bank.open` instead (the open-time verification of
`bank.ledger.verify` plus migration check, recovery and thread start, then
close), on the same ledgers; the target is at most 3 s for 1,000,000 transfers:

    .venv/bin/python scripts/bench_audit.py --open --sizes 1000000
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import sqlite3
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bank.engine import Bank
from bank.ledger import verify
from bank.ledger.audit import audit_ledger
from bank.ledger.chain import GENESIS, account_event_hash, transfer_hash
from bank.ledger.migrate import upgrade_to_head
from bank.ledger.sqlite import Durability, create_ledger_engine, ledger_url
from bank.limits import CASH_ACCOUNT_ID

TARGET_TRANSFERS_PER_S = 200_000
TARGET_OPEN_S = 3.0
OPEN_RUNS = 3
ROWS_PER_COMMIT = 50_000


def build_ledger(path: Path, transfers: int, accounts: int = 1000, seed: int = 1) -> None:
    """Write a valid ledger of `transfers` rows over `accounts` customer accounts.

    80% transfers, 10% deposits, 10% withdrawals, one row in ten with a key; a
    move that would break an overdraft limit is replaced by a deposit, so the
    ledger audits clean.
    """
    engine = create_ledger_engine(ledger_url(path), Durability.NORMAL)
    upgrade_to_head(engine)
    engine.dispose()
    rng = random.Random(seed)
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA synchronous = OFF")
    db.execute("BEGIN")
    event_prev = db.execute("SELECT hash FROM account_events ORDER BY seq DESC LIMIT 1").fetchone()[
        0
    ]
    limits = [0] * (accounts + 1)
    ts_us = 1_700_000_000_000_000
    for i in range(1, accounts + 1):
        limit = rng.choice((0, 0, 0, 10_000, 1_000_000))
        limits[i] = limit
        name = f"acct-{i:07d}"
        event_prev = account_event_hash(event_prev, i + 1, i, "open", limit, 0, ts_us, name)
        db.execute("INSERT INTO accounts VALUES (?, ?, ?, 0)", (i, name, limit))
        db.execute(
            "INSERT INTO account_events VALUES (?, ?, 'open', ?, ?, 0, ?, ?)",
            (i + 1, i, name, limit, ts_us, event_prev),
        )
    balances = [0] * (accounts + 1)
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
        prev = transfer_hash(prev, seq, kind, debit, credit, amount, ts_us, key)
        rows.append((seq, key, kind, debit, credit, amount, ts_us, prev))
        if len(rows) >= ROWS_PER_COMMIT:
            db.executemany("INSERT INTO transfers VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            rows.clear()
    db.executemany("INSERT INTO transfers VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
    db.executemany(
        "UPDATE accounts SET balance = ? WHERE id = ?", [(b, i) for i, b in enumerate(balances)]
    )
    db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()


def cached_ledger(cache: Path, transfers: int) -> Path:
    """The ledger of that size in `cache`, built on first use."""
    path = cache / f"bench-audit-{transfers}.db"
    if not path.exists():
        partial = path.with_suffix(".partial")
        for stale in cache.glob(partial.name + "*"):
            stale.unlink()
        started = time.perf_counter()
        build_ledger(partial, transfers)
        partial.rename(path)
        print(f"built {path} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return path


def measure(path: Path) -> dict[str, Any]:
    """Audit `path` three times: warm the page cache, time one run, trace one run's memory.

    The timed run is not traced: `tracemalloc` slows every allocation several-fold.
    """
    audit_ledger(path)
    rss_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report = audit_ledger(path)
    rss_after_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    audit_ledger(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "transfers": report.transfers_checked,
        "ok": report.ok,
        "duration_s": round(report.duration_s, 3),
        "transfers_per_s": round(report.transfers_per_s),
        "tracemalloc_peak_mib": round(peak / 2**20, 2),
        "max_rss_mib": round(rss_after_kb / 1024, 1),
        "max_rss_growth_mib": round((rss_after_kb - rss_before_kb) / 1024, 1),
    }


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
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--open", action="store_true", help="measure Bank.open (its verification) instead"
    )
    args = parser.parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    if args.open:
        return main_open(args)
    results = [measure(cached_ledger(args.cache, n)) for n in args.sizes]
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
            "traced peak MiB",
            "max RSS MiB",
        ):
            table.add_column(column, justify="right")
        for r in results:
            table.add_row(
                f"{r['transfers']:,}",
                "yes" if r["ok"] else "NO",
                f"{r['duration_s']:.2f}",
                f"{r['transfers_per_s']:,}",
                f"{r['tracemalloc_peak_mib']:.2f}",
                f"{r['max_rss_mib']:.1f}",
            )
        Console().print(table)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
