"""`bank history` of one long account: build a ledger with ROWS transfers touching one account
(through the engine, so the chain and running balances are real), then time the CLI printing
it as CSV and report its peak memory (the child's max RSS).

    .venv/bin/python scripts/bench_history_cli.py --rows 1000000 --db /tmp/h.db
    .venv/bin/python scripts/bench_history_cli.py --db /tmp/h.db --formats csv,nl,json

A ledger already at the path is reused when it holds at least ROWS rows (building a million
takes a minute or two; printing is what is measured). Each format's output goes to /dev/null;
the baseline, measured in the same run, is the same CLI printing `--limit 1` (start-up cost).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import bank
from bank.commands import Deposit, Transfer, Withdrawal

CHUNK = 20_000


def build(path: Path, rows: int) -> None:
    """ROWS transfers, each touching account `hot` (deposits, withdrawals, transfers out)."""
    with bank.Bank.open(path, durability="normal") as b:
        existing = len(b.accounts())
        hot = b.open_account("hot").id if existing == 0 else b.accounts()[0].id
        other = b.open_account("other").id if existing == 0 else b.accounts()[1].id
        start = time.perf_counter()
        for base in range(0, rows, CHUNK):
            commands: list[Deposit | Withdrawal | Transfer] = []
            for i in range(base, min(rows, base + CHUNK)):
                if i % 3 == 0:
                    commands.append(Deposit(account=hot, amount=300))
                elif i % 3 == 1:
                    commands.append(Transfer(source=hot, target=other, amount=100))
                else:
                    commands.append(Withdrawal(account=hot, amount=100))
            for future in b.submit_many(commands):
                future.result()
        print(f"built {rows:,} rows in {time.perf_counter() - start:.1f} s", file=sys.stderr)


def measure(db: Path, fmt: str, extra: list[str]) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds and the child's peak RSS (KiB) of `bank history hot`."""
    bank_exe = Path(sys.executable).parent / "bank"
    start = time.perf_counter()
    with open(os.devnull, "w") as sink:
        child = subprocess.Popen(
            [bank_exe, "history", "hot", "--db", str(db), "--format", fmt, *extra], stdout=sink
        )
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage
        child.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.perf_counter() - start
    if child.returncode != 0:
        raise SystemExit(f"bank history exited {child.returncode}")
    return elapsed, usage.ru_utime + usage.ru_stime, usage.ru_maxrss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--formats", default="csv")
    args = parser.parse_args()
    if not args.db.exists():
        build(args.db, args.rows)
    base_s, base_cpu, base_kib = measure(args.db, "csv", ["--limit", "1"])
    print(
        f"baseline (--limit 1): {base_s:.2f} s wall, {base_cpu:.2f} s CPU, "
        f"peak RSS {base_kib / 1024:.0f} MiB"
    )
    for fmt in args.formats.split(","):
        seconds, cpu, kib = measure(args.db, fmt, [])
        print(
            f"{fmt}: {args.rows:,} rows in {seconds:.2f} s wall, {cpu:.2f} s CPU "
            f"({args.rows / cpu:,.0f} rows per CPU second), peak RSS {kib / 1024:.0f} MiB "
            f"(+{(kib - base_kib) / 1024:.0f} MiB over the baseline)"
        )


if __name__ == "__main__":
    main()
