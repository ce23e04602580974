"""History pages and balances as of a seq on a long ledger: latency of each call.

Builds (once per `--cache` directory) a valid SQLite ledger of `--transfers` rows
(default 1,000,000) over 1,000 accounts, one of which (the hot account, id 1) is on
one side of a tenth of the rows (100,000), with chained hashes and running balances
as the engine writes them; with `--db URL` it is copied (`bank copy`) into that empty
PostgreSQL database, or reused if the database already holds it. Then, through
`Bank.open`, it times `history(hot, after_seq=X, limit=1000)` and
`balance(hot, at_seq=X)` for random X over the whole ledger, and the same through the
read-only `LedgerReader`: median and p99 over `--calls` calls each (targets: under 10
ms each), and checks a sample of point balances against the generator's replay.

The postings (revision 0007) cover every row but the last `TAIL` (POSTINGS_RUN_ROWS - 1,
the most a writer leaves above the watermark between two flushes), on both backends:
the reads pay for the largest tail they normally meet.

    .venv/bin/python scripts/bench_history.py --cache /tmp/bench-ledgers
    .venv/bin/python scripts/bench_history.py --cache /tmp/bench-ledgers \\
        --db postgresql+psycopg://postgres@127.0.0.1:55441/history_bench
"""

import argparse
import json
import os
import random
import sqlite3
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from bank import Bank
from bank.ledger.chain import GENESIS, account_event_hash, transfer_hash
from bank.ledger.copy import copy_ledger
from bank.ledger.migrate import upgrade_to_head
from bank.ledger.postings import POSTINGS_RUN_ROWS, flush_sql
from bank.ledger.reader import LedgerReader
from bank.ledger.sqlite import Durability, create_ledger_engine, ledger_url
from bank.limits import CASH_ACCOUNT_ID

ACCOUNTS = 1000
HOT = 1
HOT_SHARE = 0.1  # of the rows: 100,000 of 1,000,000
INSERT_ROW = (
    "INSERT INTO transfers (seq, key, kind, debit_account_id, credit_account_id, amount, ts_us,"
    " hash, debit_balance, credit_balance) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
ROWS_PER_COMMIT = 50_000
PAGE = 1000
#: Rows left above the watermark W (the tail every read also ranges over).
TAIL = POSTINGS_RUN_ROWS - 1
TARGET_MS = 10.0


def build(path: Path, transfers: int, seed: int) -> dict[int, int]:
    """Write the ledger; returns {seq: the hot account's balance after it} for a sample."""
    engine = create_ledger_engine(ledger_url(path), Durability.NORMAL)
    upgrade_to_head(engine)
    engine.dispose()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA synchronous = OFF")
    db.execute("BEGIN")
    (event_prev,) = db.execute("SELECT hash FROM account_events ORDER BY seq DESC").fetchone()
    ts_us = 1_700_000_000_000_000
    for i in range(1, ACCOUNTS + 1):
        name = f"acct-{i:04d}"
        event_prev = account_event_hash(event_prev, i + 1, i, "open", 1_000_000, 0, ts_us, name)
        db.execute("INSERT INTO accounts VALUES (?, ?, 1000000, 0)", (i, name))
        db.execute(
            "INSERT INTO account_events VALUES (?, ?, 'open', ?, 1000000, 0, ?, ?)",
            (i + 1, i, name, ts_us, event_prev),
        )
    rng = random.Random(seed)
    balances = [0] * (ACCOUNTS + 1)
    sample: dict[int, int] = {}
    prev = GENESIS
    rows: list[tuple[Any, ...]] = []
    for seq in range(1, transfers + 1):
        amount = rng.randint(1, 10_000)
        a = HOT if rng.random() < HOT_SHARE else rng.randint(2, ACCOUNTS)
        roll = rng.random()
        if roll < 0.1:
            kind, debit, credit = "deposit", CASH_ACCOUNT_ID, a
        elif roll < 0.2:
            kind, debit, credit = "withdrawal", a, CASH_ACCOUNT_ID
        else:
            b = rng.randint(2, ACCOUNTS)
            b = b if b != a else 2 + (b - 1) % (ACCOUNTS - 1)
            kind, debit, credit = "transfer", a, b
            if rng.random() < 0.5:
                debit, credit = credit, debit
        if debit != CASH_ACCOUNT_ID and balances[debit] - amount < -1_000_000:
            kind, debit, credit = "deposit", CASH_ACCOUNT_ID, debit
        balances[debit] -= amount
        balances[credit] += amount
        ts_us += 3
        prev = transfer_hash(
            prev, seq, kind, debit, credit, amount, ts_us, None, balances[debit], balances[credit]
        )
        rows.append(
            (seq, None, kind, debit, credit, amount, ts_us, prev, balances[debit], balances[credit])
        )
        if seq % 997 == 0:
            sample[seq] = balances[HOT]
        if len(rows) >= ROWS_PER_COMMIT:
            db.executemany(INSERT_ROW, rows)
            rows = []
    db.executemany(INSERT_ROW, rows)
    db.executemany(
        "UPDATE accounts SET balance = ? WHERE id = ?", [(b, i) for i, b in enumerate(balances)]
    )
    upto = max(0, transfers - TAIL)
    db.execute(flush_sql("?1", "?2"), (0, upto))
    db.execute("UPDATE postings_upto SET seq = ?", (upto,))
    db.execute("COMMIT")
    db.execute("ANALYZE")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return sample


def cached(cache: Path, transfers: int, seed: int) -> tuple[Path, dict[int, int]]:
    """The SQLite ledger and its sample of hot balances, built on first use."""
    path = cache / f"bench-history-{transfers}-{seed}-postings.db"
    sample_path = path.with_suffix(".sample.json")
    if not path.exists() or not sample_path.exists():
        partial = path.with_suffix(".partial")
        for stale in cache.glob(partial.name + "*"):
            stale.unlink()
        started = time.perf_counter()
        sample = build(partial, transfers, seed)
        sample_path.write_text(json.dumps(sample))
        partial.rename(path)
        print(f"built {path} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    sample = {int(k): v for k, v in json.loads(sample_path.read_text()).items()}
    return path, sample


def on_postgres(url: str, source: Path) -> str:
    """The ledger in the database at `url`: copied there unless it already holds it."""
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            has = conn.execute(
                text(
                    "SELECT count(*) FROM information_schema.tables WHERE table_name = 'transfers'"
                )
            ).scalar()
            count = conn.execute(text("SELECT count(*) FROM transfers")).scalar() if has else 0
    finally:
        engine.dispose()
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    (want,) = src.execute("SELECT count(*) FROM transfers").fetchone()
    src.close()
    if count == want:
        return url
    started = time.perf_counter()
    report = copy_ledger(source, url)
    print(f"copied to {url} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    if not report.ok:
        raise SystemExit(f"the copy did not audit clean: {report}")
    raw = create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    with raw.connect() as conn:
        # The copy rebuilt every posting (W = head): the same tail as the SQLite ledger.
        upto = max(0, want - TAIL)
        conn.execute(text("DELETE FROM postings WHERE seq > :w"), {"w": upto})
        conn.execute(text("UPDATE postings_upto SET seq = :w"), {"w": upto})
        conn.execute(text("VACUUM ANALYZE"))
    raw.dispose()
    return url


def timed(call: Callable[[int], object], points: list[int]) -> dict[str, float]:
    """Milliseconds per call over `points`: median, p99 and max of the wall clock, and the
    median of this process's CPU time (less disturbed by other jobs on shared cores)."""
    call(points[0])  # warm
    spent = []
    cpu = []
    for x in points:
        start, start_cpu = time.perf_counter(), time.process_time()
        call(x)
        spent.append((time.perf_counter() - start) * 1000)
        cpu.append((time.process_time() - start_cpu) * 1000)
    spent.sort()
    return {
        "median_ms": round(statistics.median(spent), 3),
        "p99_ms": round(spent[min(len(spent) - 1, int(len(spent) * 0.99))], 3),
        "max_ms": round(spent[-1], 3),
        "cpu_median_ms": round(statistics.median(cpu), 3),
    }


def measure(db: str | Path, sample: dict[int, int], calls: int, seed: int) -> dict[str, Any]:
    """Both calls through the bank and through the reader, at random points."""
    rng = random.Random(seed)
    out: dict[str, Any] = {}
    with Bank.open(db) as bank:
        head = bank.stats().committed_seq
        points = [rng.randint(0, head) for _ in range(calls)]
        for seq, want in list(sample.items())[:: max(1, len(sample) // 50)]:
            got = bank.balance(HOT, at_seq=seq)
            if got != want:
                raise SystemExit(f"balance at seq {seq}: {got}, the replay says {want}")
        rows = len(bank.history(HOT, after_seq=head // 2, limit=PAGE))
        if rows != PAGE:
            raise SystemExit(f"a page in the middle of the hot history held {rows} rows")
        out["bank.history"] = timed(lambda x: bank.history(HOT, after_seq=x, limit=PAGE), points)
        out["bank.balance_at"] = timed(lambda x: bank.balance(HOT, at_seq=x), points)
        out["bank.balance_at_cash"] = timed(
            lambda x: bank.balance(CASH_ACCOUNT_ID, at_seq=x), points
        )
    with LedgerReader(db) as reader:
        out["reader.history"] = timed(
            lambda x: reader.history(HOT, after_seq=x, limit=PAGE), points
        )
        out["reader.balance_at"] = timed(lambda x: reader.balance(HOT, at_seq=x), points)
    out["head"] = head
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, required=True, help="directory of built ledgers")
    parser.add_argument("--transfers", type=int, default=1_000_000, help="ledger length")
    parser.add_argument("--calls", type=int, default=2000, help="timed calls of each kind")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--db", help="also measure on this empty (or already filled) PostgreSQL")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    args.cache.mkdir(parents=True, exist_ok=True)
    path, sample = cached(args.cache, args.transfers, args.seed)
    results: dict[str, Any] = {"sqlite": measure(path, sample, args.calls, args.seed)}
    if args.db:
        results["postgresql"] = measure(on_postgres(args.db, path), sample, args.calls, args.seed)
    ok = True
    load = os.getloadavg()[0]
    print(f"load average {load:.2f} (2 cores shared: the wall clock waits for the CPU)")
    results["load_average_1m"] = {"after": round(load, 2)}
    for backend, figures in results.items():
        if backend == "load_average_1m":
            continue
        print(f"{backend}: {args.transfers:,} transfers, hot account {HOT} on ~{HOT_SHARE:.0%}")
        for name, f in figures.items():
            if name == "head":
                continue
            met = f["p99_ms"] < TARGET_MS
            ok &= met or name.endswith("_cash")
            print(
                f"  {name:22} median {f['median_ms']:7.3f} ms  p99 {f['p99_ms']:7.3f} ms  "
                f"max {f['max_ms']:7.3f} ms  cpu {f['cpu_median_ms']:6.3f} ms  "
                f"{'<' if met else '>='} {TARGET_MS:g} ms"
            )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
