"""What a durable batch of transfers costs on PostgreSQL, written three ways, per batch size.

Writes the same batches (N transfers between random accounts, then the batch's final
balances) from one Python thread, one commit per batch, `synchronous_commit=on`:

- `unnest`: the backend's own writer (`PostgresBatchWriter`): one prepared statement
  `WITH ins AS (INSERT ... SELECT * FROM unnest(...)) UPDATE ... FROM unnest(...)`,
  binary arrays, BEGIN + statement pipelined; `unnest+fence` adds the lease check;
- `executemany`: psycopg's executemany of one-row INSERT and UPDATE (pipelined by psycopg);
- `values`: multi-row `INSERT ... VALUES` pages and `UPDATE ... FROM (VALUES ...)`.

    .venv/bin/python scripts/pg_writer_cost.py --url postgresql+psycopg://postgres@127.0.0.1:55432/postgres
    .venv/bin/python scripts/pg_writer_cost.py --sizes 64,512,1000 --rows 100000

It creates (and drops) a database `pg_cost_<pid>` on that server.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from collections.abc import Callable
from itertools import chain
from typing import Any

import psycopg
from sqlalchemy import Engine, make_url
from sqlalchemy.engine import URL

from bank.ledger.backend import Durability, WriteBatch
from bank.ledger.migrate import upgrade_to_head
from bank.ledger.postgres import engine as pg_engine
from bank.ledger.postgres import lease as pg_lease
from bank.ledger.postgres.lease import FENCE_KEY
from bank.ledger.postgres.url import connect_kwargs, engine_url
from bank.ledger.postgres.writer import FENCE_SQL, ROW_COLUMNS, PostgresBatchWriter
from bank.records import Receipt

ACCOUNTS = 1000
REPEAT = 3  # rounds per measurement; the best counts
PAGE_ROWS_MAX = 1000 // 10 * 10  # rows per VALUES page (10 parameters a row)

Writer = Callable[[psycopg.Connection[Any], WriteBatch], None]


def make_batches(rows: int, size: int, start_seq: int) -> list[WriteBatch]:
    """Random transfers in batches of `size`, with each batch's final balances."""
    rng = random.Random(size)
    balances = dict.fromkeys(range(ACCOUNTS), 0)
    out: list[WriteBatch] = []
    seq = start_seq
    for _ in range(rows // size):
        batch = WriteBatch()
        for _ in range(size):
            seq += 1
            debit, credit = rng.sample(range(ACCOUNTS), 2)
            amount = rng.randint(1, 1000)
            balances[debit] -= amount
            balances[credit] += amount
            batch.transfers.append(
                Receipt(
                    seq, "transfer", None, amount, debit, credit, time.time_ns() // 1000, "0" * 64
                )
            )
            batch.running.append((balances[debit], balances[credit]))
            batch.balances[debit] = balances[debit]
            batch.balances[credit] = balances[credit]
        out.append(batch)
    return out


def executemany(conn: psycopg.Connection[Any], batch: WriteBatch) -> None:
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(
            f"INSERT INTO transfers ({', '.join(ROW_COLUMNS)}) VALUES ({', '.join(['%s'] * len(ROW_COLUMNS))})",
            [(*r, *after) for r, after in zip(batch.transfers, batch.running, strict=True)],
        )
        cur.executemany(
            "UPDATE accounts SET balance = %s WHERE id = %s",
            [(b, a) for a, b in batch.balances.items()],
        )


def values(conn: psycopg.Connection[Any], batch: WriteBatch) -> None:
    with conn.transaction(), conn.cursor() as cur:
        rows = [(*r, *after) for r, after in zip(batch.transfers, batch.running, strict=True)]
        for start in range(0, len(rows), PAGE_ROWS_MAX):
            page = rows[start : start + PAGE_ROWS_MAX]
            row = "(" + ", ".join(["%s"] * 10) + ")"
            cur.execute(
                f"INSERT INTO transfers ({', '.join(ROW_COLUMNS)}) VALUES "
                + ", ".join([row] * len(page)),
                list(chain.from_iterable(page)),
            )
        items = list(batch.balances.items())
        for start in range(0, len(items), PAGE_ROWS_MAX):
            pairs = items[start : start + PAGE_ROWS_MAX]
            cur.execute(
                "UPDATE accounts SET balance = v.b FROM (VALUES "
                + ", ".join(["(%s::int, %s::bigint)"] * len(pairs))
                + ") AS v(id, b) WHERE accounts.id = v.id",
                list(chain.from_iterable(pairs)),
            )


def run(label: str, batches: list[WriteBatch], write: Callable[[WriteBatch], None]) -> None:
    """Write `batches` in a few rounds; print the best round's rate (the machine is shared)."""
    rounds = [batches[i::REPEAT] for i in range(REPEAT)]
    elapsed = float("inf")
    for part in rounds:
        t0 = time.perf_counter()
        for batch in part:
            write(batch)
        elapsed = min(elapsed, (time.perf_counter() - t0) * len(batches) / len(part))
    rows = sum(len(b.transfers) for b in batches)
    per_batch_ms = elapsed / len(batches) * 1000
    print(f"{label:14} {len(batches[0].transfers):6} {rows / elapsed:10.0f} {per_batch_ms:10.2f}")


def statement_cost(url: URL, lease: pg_lease.Lease, n: int = 2000) -> None:
    """The lease check's own cost, against a bare round trip (`SELECT 1`), both prepared."""
    with psycopg.connect(**connect_kwargs(url)) as conn, conn.cursor() as cur:
        for label, sql, params in (
            ("SELECT 1", "SELECT 1", ()),
            ("lease check", FENCE_SQL, (FENCE_KEY, lease.backend_pid)),
        ):
            best = float("inf")
            for _ in range(REPEAT):
                t0 = time.perf_counter()
                for _ in range(n):
                    cur.execute(sql, params, prepare=True)
                    cur.fetchone()
                best = min(best, time.perf_counter() - t0)
                conn.rollback()
            print(f"{label:14} {best / n * 1e6:8.1f} us per statement (one round trip)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--url",
        default=os.environ.get(
            "BANK_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:55432/postgres"
        ),
    )
    parser.add_argument("--sizes", default="1,16,64,256,512,1000,2000")
    parser.add_argument("--rows", type=int, default=60_000)
    args = parser.parse_args()
    admin = engine_url(make_url(args.url))
    name = f"pg_cost_{os.getpid()}"
    with psycopg.connect(**connect_kwargs(admin), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    url = admin.set(database=name)
    engine: Engine | None = None
    try:
        engine = pg_engine.create_ledger_engine(url, Durability.FULL)
        upgrade_to_head(engine)
        with engine.begin() as c:
            c.exec_driver_sql("DELETE FROM account_events")
            c.exec_driver_sql(
                "INSERT INTO accounts SELECT i, 'a' || i, 0, 0 FROM generate_series(1, %s) i"
                % (ACCOUNTS - 1)
            )
        lease = pg_lease.acquire(url, name, wait_s=0)
        statement_cost(url, lease)
        print(f"{'method':14} {'batch':>6} {'rows/s':>10} {'ms/batch':>10}")
        seq = 0
        for size in (int(s) for s in args.sizes.split(",")):
            rows = min(args.rows, max(size * 60 * REPEAT, 600))
            for label, fenced in (("unnest", False), ("unnest+fence", True)):
                batches = make_batches(rows, size, seq)
                seq += len(batches) * size
                writer = PostgresBatchWriter(engine, lease if fenced else None, name)

                def write(batch: WriteBatch, w: PostgresBatchWriter = writer) -> None:
                    w.begin()
                    w.write(batch)
                    w.commit()

                run(label, batches, write)
                writer.close()
            for label, method in (("executemany", executemany), ("values", values)):
                if size > 2000:
                    continue
                batches = make_batches(rows, size, seq)
                seq += len(batches) * size
                raw = engine.raw_connection()
                driver: psycopg.Connection[Any] = raw.driver_connection  # type: ignore[assignment]
                driver.autocommit = True

                def write_raw(
                    batch: WriteBatch, m: Writer = method, d: psycopg.Connection[Any] = driver
                ) -> None:
                    m(d, batch)

                run(label, batches, write_raw)
                driver.autocommit = False
                raw.close()
        lease.release()
    finally:
        if engine is not None:
            engine.dispose()
        with psycopg.connect(**connect_kwargs(admin), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name}")


if __name__ == "__main__":
    main()
