"""What revision 0005 costs the write path: pipelined transfers/s with and without it.

Revision 0005 makes every transfer row carry its two running balances and keeps two
(account, seq) indexes, so that history pages and balances as of a seq are index
look-ups. This measures what that costs writers: `scripts/bench.py`'s pipelined
variants ((c) on SQLite, (g) on PostgreSQL with `--pg-url`) run alternately on this
tree and on a tree of the code before 0005 (`--base`, a git revision, exported with
`git archive` into a temporary directory), round after round, so a slow spell of the
shared machine hits both alike. It reports each side's median transfers/s and CPU
microseconds per operation, and the ratio (target: at most 15% fewer transfers/s with
0005).

Both trees run with the same settings: `--gc` (default: CPython's untouched collector)
and `--accounts` (default 1,000) are passed to both bench.py. The trees' own defaults
differ (before commit 2b21434 bench.py ran its timed regions under `throughput_gc`
with 100 accounts; since, CPython's defaults with 1,000) and comparing them measured
the harness: 0.54x, where the same settings give 0.68x (throughput_gc) to 1.21x
(CPython's defaults), see README's write-path figures.

    .venv/bin/python scripts/bench_write_cost.py --base a71de3c --rounds 3
    .venv/bin/python scripts/bench_write_cost.py --base a71de3c --new 66dc913 --only c
    .venv/bin/python scripts/bench_write_cost.py --base a71de3c --only g \\
        --pg-url postgresql+psycopg://postgres@127.0.0.1:55441/postgres

It compares any two trees the same way: `--only b` (8 threads x blocking `transfer()`)
measured the blocking path's changes.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPS_DEFAULT = {"c": 200_000, "g": 100_000, "b": 100_000}


def export_tree(revision: str, into: Path) -> Path:
    """The code of `revision`, importable as `bank` from `into` (migrations included)."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", revision], check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    # The installed package maps `bank._migrations` to this tree's migrations/: the old
    # tree must find its own first, on its own path.
    (into / "bank" / "_migrations").symlink_to(into / "migrations")
    return into


def run_bench(
    tree: Path,
    variant: str,
    ops: int,
    pg_url: str | None,
    out: Path,
    accounts: int | None = None,
    gc_mode: str | None = None,
) -> tuple[float, float]:
    """One round of one variant of `tree`'s bench.py; its transfers/s and CPU us/op."""
    command = [
        sys.executable,
        str(tree / "scripts" / "bench.py"),
        "--only",
        variant,
        "--ops",
        f"{variant}={ops}",
        "--rounds",
        "1",
        "--json",
        str(out),
    ]
    if pg_url is not None:
        command += ["--pg-url", pg_url]
    if accounts is not None:
        command += ["--accounts", str(accounts)]
    if gc_mode is not None:
        command += ["--gc", gc_mode]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    subprocess.run(command, check=True, cwd=tree, env=env, stdout=subprocess.DEVNULL)
    figures = json.loads(out.read_text())["variants"][variant]
    return float(figures["ops_s"]), float(figures["cpu_us_per_op"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="git revision of the code before 0005")
    parser.add_argument(
        "--new", help="git revision of the code with 0005 (default: this working tree)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="pairs of runs per variant")
    parser.add_argument(
        "--only",
        default="c",
        help="variants of bench.py: c (SQLite), g (PostgreSQL), b (SQLite, blocking calls), "
        "comma-separated",
    )
    parser.add_argument("--ops", type=int, help="operations per run (default c=200000, g=100000)")
    parser.add_argument("--pg-url", help="PostgreSQL server for (g) (an SQLAlchemy URL)")
    parser.add_argument(
        "--accounts",
        type=int,
        default=1_000,
        help="accounts, passed to both trees' bench.py (default 1,000; their own defaults "
        "differ: 100 before commit 2b21434, 1,000 since)",
    )
    parser.add_argument(
        "--gc",
        choices=("default", "throughput"),
        default="default",
        help="collector of both trees' timed regions: CPython's defaults (default) or "
        "throughput_gc (their own defaults differ: throughput_gc before commit 2b21434)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.only.split(",") if v.strip()]
    if not variants or any(v not in OPS_DEFAULT for v in variants):
        parser.error("--only takes c, g and b, comma-separated")
    if "g" in variants and args.pg_url is None:
        parser.error("(g) needs --pg-url")
    figures: dict[str, dict[str, list[float]]] = {}
    cpu: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-write-cost-") as scratch:
        base = export_tree(args.base, Path(scratch) / "base")
        new = ROOT if args.new is None else export_tree(args.new, Path(scratch) / "new")
        out = Path(scratch) / "result.json"
        for variant in variants:
            ops = args.ops or OPS_DEFAULT[variant]
            runs: dict[str, list[float]] = {"base": [], "0005": []}
            cpu_runs: dict[str, list[float]] = {"base": [], "0005": []}
            for i in range(args.rounds):
                # Alternate which goes first, so neither always meets a warmer machine.
                order = [("base", base), ("0005", new)]
                for name, tree in order if i % 2 == 0 else order[::-1]:
                    rate, cpu_us = run_bench(
                        tree, variant, ops, args.pg_url, out, args.accounts, args.gc
                    )
                    runs[name].append(rate)
                    cpu_runs[name].append(cpu_us)
                    print(
                        f"({variant}) round {i + 1} {name}: {rate:,.0f} transfers/s, "
                        f"{cpu_us:.1f} us CPU per op",
                        flush=True,
                    )
            figures[variant] = runs
            cpu[variant] = cpu_runs
    summary: dict[str, dict[str, float]] = {}
    for variant, runs in figures.items():
        base_median = statistics.median(runs["base"])
        new_median = statistics.median(runs["0005"])
        ratio = new_median / base_median
        base_cpu = statistics.median(cpu[variant]["base"])
        new_cpu = statistics.median(cpu[variant]["0005"])
        summary[variant] = {
            "base": base_median,
            "0005": new_median,
            "ratio": ratio,
            "base_cpu_us_per_op": base_cpu,
            "0005_cpu_us_per_op": new_cpu,
        }
        pairs = ", ".join(f"{n / b:.2f}" for b, n in zip(runs["base"], runs["0005"], strict=True))
        print(
            f"({variant}) median {base_median:,.0f} -> {new_median:,.0f} transfers/s: "
            f"{ratio:.2f}x ({(1 - ratio) * 100:+.1f}% fewer; per round {pairs}); "
            f"target >= 0.85x: {'met' if ratio >= 0.85 else 'NOT met'}; "
            f"CPU {base_cpu:.1f} -> {new_cpu:.1f} us per op (medians)"
        )
    if args.json is not None:
        args.json.write_text(
            json.dumps({"runs": figures, "cpu_us_per_op": cpu, "summary": summary}, indent=2) + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
