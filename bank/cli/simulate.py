"""`bank simulate`: the load simulation over the library's `bank.simulate` runner."""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from bank.cli.common import Subcommands, UsageError, int_range
from bank.limits import (
    AMOUNT_MAX,
    QUEUE_CAPACITY_DEFAULT,
    QUEUE_CAPACITY_MAX,
    WORKERS_DEFAULT,
    WORKERS_MAX,
)
from bank.money import format_minor


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value <= 7 * 86400:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most a week, got {text}")
    return value


def _spec(parser: Callable[[str], object]) -> Callable[[str], str]:
    """Validate a --mix/--skew text at parse time (clear message), keep the text."""

    def check(text: str) -> str:
        try:
            parser(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text

    check.__name__ = "spec"
    return check


def register(sub: Subcommands) -> None:
    """Add `simulate` to the `bank` parser."""
    from bank.simulate import runner, workload

    sim = sub.add_parser(
        "simulate",
        help="run a load simulation (tellers, mixes, hot accounts), then audit the ledger",
        description=(
            "Run a load simulation: TELLERS teller threads, each keeping up to WINDOW operations "
            "in flight, submit a seeded mix of deposits, withdrawals and transfers; a live "
            "progress bar shows ops/s, committed, rejected and queue depth; at the end a summary "
            "(throughput, latency percentiles, rejects by reason, queue high-water) is printed "
            "and the ledger is audited. Exit 0 only if the audit is clean; 1 if it is not; 130 "
            "if Ctrl-C cut the run short (in-flight work is still finished and audited; a "
            "second Ctrl-C aborts at once)."
        ),
    )
    sim.add_argument(
        "--db",
        metavar="PATH|URL",
        help="ledger file or URL (created if missing; simulation accounts are reused if present); "
        "default: a temporary ledger, deleted afterwards",
    )
    sim.add_argument(
        "--tellers",
        type=int_range(1, runner.TELLERS_MAX),
        default=runner.TELLERS_DEFAULT,
        metavar="N",
        help=f"teller threads (default {runner.TELLERS_DEFAULT})",
    )
    sim.add_argument(
        "--window",
        type=int_range(1, runner.WINDOW_MAX),
        default=runner.WINDOW_DEFAULT,
        metavar="N",
        help="operations each teller keeps in flight; 1 waits for every answer "
        f"(default {runner.WINDOW_DEFAULT})",
    )
    sim.add_argument(
        "--workers",
        type=int_range(1, WORKERS_MAX),
        default=WORKERS_DEFAULT,
        metavar="N",
        help=f"the bank's worker threads (default {WORKERS_DEFAULT})",
    )
    sim.add_argument(
        "--accounts",
        type=int_range(1, runner.ACCOUNTS_MAX),
        default=runner.ACCOUNTS_DEFAULT,
        metavar="N",
        help=f"customer accounts (default {runner.ACCOUNTS_DEFAULT:,})",
    )
    sim.add_argument(
        "--initial-balance",
        type=int_range(0, AMOUNT_MAX),
        default=runner.INITIAL_BALANCE_DEFAULT,
        metavar="MINOR",
        help="opening balance of each new account, in minor units (cents) "
        f"(default {runner.INITIAL_BALANCE_DEFAULT}, i.e. "
        f"{format_minor(runner.INITIAL_BALANCE_DEFAULT)})",
    )
    end = sim.add_mutually_exclusive_group()
    end.add_argument(
        "--ops",
        type=int_range(1, 10**12),
        metavar="N",
        help=f"stop after N operations in all (default {runner.OPS_DEFAULT:,})",
    )
    end.add_argument(
        "--duration", type=_seconds, metavar="SECONDS", help="stop after this many seconds"
    )
    sim.add_argument(
        "--mix",
        type=_spec(workload.parse_mix),
        default=workload.MIX_DEFAULT,
        help=f"relative weights of the operations (default {workload.MIX_DEFAULT})",
    )
    sim.add_argument(
        "--skew",
        type=_spec(workload.parse_skew),
        default=workload.SKEW_DEFAULT,
        help="account choice: uniform, or zipf:S for hot accounts (e.g. zipf:1.1) "
        "(default uniform)",
    )
    sim.add_argument(
        "--seed",
        type=int_range(0, 2**63 - 1),
        metavar="N",
        help="seed of the workload: the same seed gives every teller the same commands "
        "(default: random, printed in the summary)",
    )
    sim.add_argument(
        "--durability",
        choices=runner.DURABILITIES,
        default="full",
        help="full: fsync every group commit before answering; normal: survive a process "
        "crash, not a power loss (default full)",
    )
    sim.add_argument(
        "--queue-capacity",
        type=int_range(1, QUEUE_CAPACITY_MAX),
        default=QUEUE_CAPACITY_DEFAULT,
        metavar="N",
        help=f"the bank's job queue capacity in operations (default {QUEUE_CAPACITY_DEFAULT})",
    )
    sim.add_argument("--json", metavar="FILE", help="write the result as JSON to FILE")
    sim.add_argument(
        "--plot",
        metavar="FILE",
        help="write a PNG of throughput, latency percentiles and queue depth over time",
    )
    sim.add_argument(
        "--history",
        metavar="FILE",
        help="record every operation (invoke/complete times, outcome, seq) and periodic "
        "snapshots as JSON lines in FILE, for `bank check-history`",
    )
    sim.add_argument(
        "--no-progress",
        action="store_true",
        help="no live progress (by default: a bar on a terminal, a line a second otherwise)",
    )
    sim.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the simulation, print its summary, write the files asked for."""
    from bank.simulate.progress import progress_for
    from bank.simulate.report import print_summary, write_json, write_plot
    from bank.simulate.runner import OPS_DEFAULT, SimulationConfig, run_simulation
    from bank.simulate.workload import InvalidWorkload

    for option, target in (
        ("--json", args.json),
        ("--plot", args.plot),
        ("--history", args.history),
    ):
        if target is not None and not Path(target).absolute().parent.is_dir():
            raise UsageError(f"{option} {target}: the directory does not exist")
    if args.history is not None and args.db is None:
        raise UsageError(
            "--history needs --db: the temporary ledger is deleted after the run, "
            "so the history could not be checked against it"
        )
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    ops = args.ops if args.ops is not None or args.duration is not None else OPS_DEFAULT
    tmpdir = None
    db = args.db
    if db is None:
        tmpdir = tempfile.mkdtemp(prefix="bank-simulate-")
        db = os.path.join(tmpdir, "ledger.db")
    try:
        try:
            config = SimulationConfig.from_specs(
                db=db,
                mix=args.mix,
                skew=args.skew,
                tellers=args.tellers,
                window=args.window,
                workers=args.workers,
                accounts=args.accounts,
                ops=ops,
                duration_s=args.duration,
                seed=seed,
                initial_balance=args.initial_balance,
                durability=args.durability,
                queue_capacity=args.queue_capacity,
            )
        except InvalidWorkload as exc:
            raise UsageError(str(exc)) from None
        display = progress_for(
            sys.stderr,
            total_ops=config.ops,
            duration_s=config.duration_s,
            enabled=not args.no_progress,
        )
        result = run_simulation(config, progress=display, history=args.history)
        print_summary(result, sys.stdout)
        if args.json:
            write_json(result, args.json)
            print(f"result written to {args.json}")
        if args.plot:
            write_plot(result, args.plot)
            print(f"plot written to {args.plot}")
        if args.history:
            print(f"history written to {args.history} (check it with `bank check-history`)")
        if tmpdir is None:
            print(f"ledger: {db} (check it again with `bank audit --db {db}`)")
        return result.exit_code()
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
