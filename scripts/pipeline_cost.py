"""What one operation costs in each stage of the engine, with no thread hand-offs.

A white-box diagnostic for performance work: it drives the engine's own stages
on the calling thread, in the order the threads would run them, and times
each one. The stages are the futures a caller creates, the worker's apply and
staging (`Worker._run_job`), the writer's statements (`LedgerWriter._prepare`)
and COMMIT, the answers, and the caller's `result()`. It uses the real ledger
file, pragmas and durability. Comparing its total with the CPU per operation of
`scripts/bench.py` (c) shows what spreading the same work over threads adds.

    .venv/bin/python scripts/pipeline_cost.py
    .venv/bin/python scripts/pipeline_cost.py --answers batch     # submit_batch's slots
    .venv/bin/python scripts/pipeline_cost.py --ops 100000 --batch 256 --json cost.json

`--answers future` (default) gives every operation its own `EngineFuture`, as
`submit_many` does; `batch` gives every window of 64 one `BatchAnswer` and each
operation a slot of it, as `submit_batch` does. CPython's collector runs with its
defaults (`--gc throughput` for `bank.simulate.tuning.throughput_gc`).

The ledger is audited at the end, so a run also checks that this path writes
what the threaded engine writes.
"""

import argparse
import contextlib
import gc
import json
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from bank import Bank
from bank.account import Account
from bank.answers import Answer, BatchAnswer, EngineFuture
from bank.buffer import BoundedBuffer
from bank.commands import Transfer
from bank.idempotency import KeyClaims
from bank.ledger import store
from bank.ledger.audit import audit_ledger
from bank.ledger.sqlite import Durability, SqliteBatchWriter, create_ledger_engine, ledger_url
from bank.ledger.writer import LedgerWriter
from bank.simulate.tuning import throughput_gc
from bank.worker import Job, Worker

JOB_OPS = 64  # operations per job, like one window of bench.py (c)
STAGES = ("futures", "worker", "write", "commit", "answer", "result")
LABELS = {
    "futures": "callers create the futures (or batch slots)",
    "worker": "worker: set running, apply under the locks, stage (seq, hash, receipt)",
    "write": "writer: BEGIN, INSERT transfers, UPDATE balances",
    "commit": "writer: COMMIT (WAL write and fsync at durability full)",
    "answer": "writer: release keys, set_result on every future",
    "result": "callers: result() on every future",
}


def fund_ledger(path: Path, accounts: int, durability: str) -> None:
    """A fresh ledger with `accounts` customer accounts that never run short."""
    with Bank.open(path, durability=durability) as bank:
        for i in range(accounts):
            bank.open_account(f"acct-{i:04d}", overdraft_limit=10**15)


def measure(
    path: Path,
    ops: int,
    batch: int,
    accounts: int,
    seed: int,
    durability: str,
    answers: str = "future",
    gc_mode: str = "default",
) -> tuple[float, float, dict[str, float]]:
    """Run `ops` transfers through the stages, `batch` per commit, answered through
    futures or batch slots (`answers`).

    Returns (wall seconds, process CPU seconds, seconds per stage).
    """
    engine = create_ledger_engine(ledger_url(path), Durability(durability))
    with engine.connect() as conn:
        rows = store.load_accounts(conn)
        seq, head, event_seq, event_head = store.chain_heads(conn)
    registry = {r.id: Account(r.id, r.name, r.overdraft_limit, r.balance) for r in rows}
    claims = KeyClaims()
    writer = LedgerWriter(
        lambda: SqliteBatchWriter(engine),
        claims,
        seq=seq,
        head_hash=head,
        event_seq=event_seq,
        event_head_hash=event_head,
    )
    unused: BoundedBuffer[Job] = BoundedBuffer(1)
    worker = Worker(0, unused, registry, writer, claims, engine)
    rnd = random.Random(seed)
    commands = []
    for _ in range(ops):
        source, target = rnd.sample(range(1, accounts + 1), 2)
        commands.append(Transfer(source=source, target=target, amount=rnd.randint(1, 10_000)))
    batch_writer = SqliteBatchWriter(engine)
    spent: dict[str, float] = dict.fromkeys(STAGES, 0.0)
    clock = time.perf_counter

    def lap(stage: str, since: float) -> float:
        now = clock()
        spent[stage] += now - since
        return now

    with throughput_gc() if gc_mode == "throughput" else contextlib.nullcontext():
        wall0, cpu0 = clock(), time.process_time()
        for start in range(0, ops, batch):
            chunk = commands[start : start + batch]
            t = clock()
            futures: list[Answer]
            batches: list[BatchAnswer] = []
            if answers == "batch":
                batches = [
                    BatchAnswer(len(chunk[j : j + JOB_OPS])) for j in range(0, len(chunk), JOB_OPS)
                ]
                futures = [slot for b in batches for slot in b.slots()]
            else:
                futures = [EngineFuture() for _ in chunk]
            t = lap("futures", t)
            for j in range(0, len(chunk), JOB_OPS):
                worker._run_job(list(chunk[j : j + JOB_OPS]), futures[j : j + JOB_OPS])
            t = lap("worker", t)
            pending = writer.sequencer.pending[:]  # what the writer thread would take
            writer.sequencer.pending.clear()
            prepared = writer._prepare(batch_writer, pending)
            t = lap("write", t)
            batch_writer.commit()
            t = lap("commit", t)
            writer._answer(prepared)
            t = lap("answer", t)
            if answers == "batch":
                for answered in batches:
                    answered.future.result()
            else:
                for future in futures:
                    assert isinstance(future, Future)
                    future.result()
            lap("result", t)
        wall, cpu = clock() - wall0, time.process_time() - cpu0
    batch_writer.close()
    engine.dispose()
    return wall, cpu, spent


def report(
    console: Console, ops: int, wall: float, cpu: float, spent: dict[str, float]
) -> dict[str, Any]:
    """Print the per-stage table; returns the same figures for --json."""
    table = Table(title=f"one operation, stage by stage, on one thread ({ops:,} transfers)")
    table.add_column("stage")
    table.add_column("us per op", justify="right")
    table.add_column("share", justify="right")
    total = sum(spent.values())
    for stage in STAGES:
        table.add_row(
            LABELS[stage], f"{spent[stage] / ops * 1e6:.2f}", f"{spent[stage] / total:.0%}"
        )
    table.add_row("[bold]total[/]", f"[bold]{total / ops * 1e6:.2f}[/]", "100%")
    console.print(table)
    console.print(
        f"{ops / wall:,.0f} ops/s on one thread; {cpu / ops * 1e6:.2f} us of process CPU per "
        "operation (compare with the CPU us/op of scripts/bench.py (c))"
    )
    return {
        "ops": ops,
        "ops_s": round(ops / wall, 1),
        "cpu_us_per_op": round(cpu / ops * 1e6, 3),
        "stages_us_per_op": {stage: round(spent[stage] / ops * 1e6, 3) for stage in STAGES},
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, audit the ledger, print; exit 1 if the audit finds a problem."""
    parser = argparse.ArgumentParser(prog="pipeline_cost.py", description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=300_000, help="transfers (default 300,000)")
    parser.add_argument(
        "--batch", type=int, default=384, help="operations per commit (default 384)"
    )
    parser.add_argument("--accounts", type=int, default=1_000, help="accounts (default 1,000)")
    parser.add_argument("--seed", type=int, default=1, help="workload seed")
    parser.add_argument("--durability", choices=("full", "normal"), default="full")
    parser.add_argument(
        "--answers",
        choices=("future", "batch"),
        default="future",
        help="a future per operation (submit_many) or a slot of a batch (submit_batch)",
    )
    parser.add_argument(
        "--gc",
        choices=("default", "throughput"),
        default="default",
        help="CPython's collector as it is (default) or under throughput_gc",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if args.ops < 1 or args.batch < 1 or args.accounts < 2:
        parser.error("--ops and --batch must be positive and --accounts at least 2")
    console = Console()
    with tempfile.TemporaryDirectory(prefix="bank-cost-") as tmp:
        path = Path(tmp) / "cost.db"
        fund_ledger(path, args.accounts, args.durability)
        gc.collect()
        wall, cpu, spent = measure(
            path,
            args.ops,
            args.batch,
            args.accounts,
            args.seed,
            args.durability,
            args.answers,
            args.gc,
        )
        audit = audit_ledger(path)
    figures = report(console, args.ops, wall, cpu, spent)
    figures["audit_ok"] = audit.ok
    console.print(f"audit: {'clean' if audit.ok else f'{audit.problems_total} problem(s)'}")
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if audit.ok else 1


if __name__ == "__main__":
    sys.exit(main())
