"""Soak of the history checker: a long `bank simulate --history` run, checked by `bank check-history`.

    python scripts/history_soak.py [--ops 200000] [--dir DIR] [--seed N] [-- simulate options]

Runs both commands as real subprocesses (the console script's code path), prints
the operation count, the simulate and check times and the check's verdict, and
exits with the check's exit code (0 consistent). The files are kept in `--dir`
(default: a temporary directory, deleted afterwards).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def soak(ops: int, directory: Path, seed: int, extra: list[str]) -> dict[str, object]:
    """Run the simulation and the check; returns the figures (and the check's verdict)."""
    db, history = directory / "soak.db", directory / "soak.jsonl"
    bank = [sys.executable, "-m", "bank"]
    simulate = [*bank, "simulate", "--db", str(db), "--ops", str(ops), "--seed", str(seed)]
    simulate += ["--history", str(history), "--no-progress", *extra]
    t0 = time.perf_counter()
    sim = subprocess.run(simulate, capture_output=True, text=True, check=False)
    simulate_s = time.perf_counter() - t0
    if sim.returncode != 0:
        raise SystemExit(f"simulate exited {sim.returncode}:\n{sim.stdout}\n{sim.stderr}")
    check = [*bank, "check-history", str(history), "--db", str(db), "--json"]
    t0 = time.perf_counter()
    chk = subprocess.run(check, capture_output=True, text=True, check=False)
    check_s = time.perf_counter() - t0
    if chk.returncode not in (0, 1):
        raise SystemExit(f"check-history exited {chk.returncode}: {chk.stderr.strip()}")
    verdict = json.loads(chk.stdout)
    return {
        "ops": verdict["ops"],
        "acknowledged": verdict["acknowledged"],
        "refused": verdict["refused"],
        "unknown": verdict["unknown"],
        "snapshots": verdict["snapshots"],
        "history_mb": round(history.stat().st_size / 1e6, 1),
        "simulate_s": round(simulate_s, 1),
        "check_s": round(check_s, 1),
        "check_inner_s": verdict["duration_s"],
        "exit_code": chk.returncode,
        "violations_total": verdict["violations_total"],
        "violation_counts": verdict["violation_counts"],
        "command": " ".join(simulate[2:]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=9)
    parser.add_argument("--dir", type=Path, help="keep the ledger and history here")
    parser.add_argument("extra", nargs="*", help="more `bank simulate` options (after --)")
    args = parser.parse_args(argv)
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
        figures = soak(args.ops, args.dir, args.seed, args.extra)
    else:
        with tempfile.TemporaryDirectory(prefix="history-soak-") as tmp:
            figures = soak(args.ops, Path(tmp), args.seed, args.extra)
    print(json.dumps(figures, indent=2))
    code = figures["exit_code"]
    assert isinstance(code, int)
    return code


if __name__ == "__main__":
    sys.exit(main())
