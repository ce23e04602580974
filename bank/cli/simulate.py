"""`bank simulate`: the load simulation over the library's `bank.simulate` runner.

Exit codes (`bank.exit_codes`): 0 the audit is clean and every `--threshold` held;
1 the audit failed, money was not conserved or a teller hit an error (this wins over
everything else); 130 Ctrl-C cut the run short (the thresholds are still shown, but a
cut-short run is no verdict on them); 3 a threshold failed; 2 the run could not start.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from bank.cli.common import Subcommands, UsageError, int_range
from bank.exit_codes import EXIT_OK, EXIT_THRESHOLD
from bank.limits import (
    AMOUNT_MAX,
    QUEUE_CAPACITY_DEFAULT,
    QUEUE_CAPACITY_MAX,
    WORKERS_DEFAULT,
    WORKERS_MAX,
)
from bank.money import format_minor

if TYPE_CHECKING:
    from bank.simulate.outputs import Target
    from bank.simulate.runner import SimulationResult
    from bank.simulate.thresholds import Verdict


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


def _threshold_text(text: str) -> str:
    """Validate a --threshold at parse time (the figure names are checked); keep the text."""
    from bank.simulate.thresholds import InvalidThreshold, parse_threshold

    try:
        parse_threshold(text)
    except InvalidThreshold as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _interval(text: str) -> float:
    from bank.simulate.metrics import INTERVAL_S_MIN

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not INTERVAL_S_MIN <= value <= 3600:
        raise argparse.ArgumentTypeError(
            f"must be from {INTERVAL_S_MIN:g} to 3600 seconds, got {text}"
        )
    return value


def register(sub: Subcommands) -> None:
    """Add `simulate` to the `bank` parser."""
    from bank.simulate import runner, workload
    from bank.simulate.metrics import INTERVAL_S_MAX, INTERVAL_S_MIN, SAMPLES_MIN
    from bank.simulate.schedule import ARRIVALS, parse_rate
    from bank.simulate.thresholds import FIGURES, OPEN_FIGURES

    sim = sub.add_parser(
        "simulate",
        help="run a load simulation (tellers, mixes, hot accounts), then audit the ledger",
        description=(
            "Run a load simulation: TELLERS teller threads, each keeping up to WINDOW operations "
            "in flight, submit a seeded mix of deposits, withdrawals and transfers, as fast as "
            "answers come (a closed loop) or on a schedule (--rate: an open model, latency "
            "measured from each operation's intended start); a live progress bar shows ops/s, "
            "committed, rejected and queue depth; at the end a summary (throughput, latency "
            "percentiles, rejects by reason, late and dropped operations, queue high-water, "
            "thresholds) is printed and the ledger is audited. Exit 0 if the audit is clean and "
            "every --threshold held; 1 if the audit is not clean (this wins); 130 if Ctrl-C cut "
            "the run short (in-flight work is still finished and audited; a second Ctrl-C "
            "aborts at once); 3 if a threshold failed; 2 if the run could not start."
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
    sim.add_argument(
        "--gc",
        choices=runner.GC_MODES,
        default="default",
        help="the garbage collector during the run: CPython's defaults (default, as an "
        "application has them) or frozen start-up objects and rarer young collections "
        "(throughput), to compare",
    )
    sim.add_argument(
        "--rate",
        type=_spec(parse_rate),
        metavar="OPS_S|A:B",
        help="open model: schedule operations at this many per second over all tellers, "
        "or ramp linearly from A to B over the run; latency is measured from each "
        "operation's intended start, and late and dropped operations are reported "
        "(default: a closed loop, each teller sending when an answer frees room)",
    )
    sim.add_argument(
        "--arrival",
        choices=ARRIVALS,
        default="fixed",
        help="with --rate: evenly spaced (fixed) or Poisson arrivals, seeded (default fixed)",
    )
    sim.add_argument(
        "--threshold",
        action="append",
        default=[],
        type=_threshold_text,
        metavar="EXPR",
        help="fail the run (exit 3) unless EXPR holds, e.g. p99_ms<10, "
        "throughput_ops_s>20000, rejected_pct<25, errors==0; repeatable. Figures: "
        + ", ".join([*FIGURES, *OPEN_FIGURES])
        + " (the last five need --rate)",
    )
    sim.add_argument(
        "--json",
        metavar="FILE|-",
        help="write the result as JSON to FILE; `-` writes it to stdout (the summary then "
        "goes to stderr)",
    )
    sim.add_argument(
        "--csv",
        metavar="FILE|-",
        help="write one row per interval: time, ops, ops/s, committed, rejected by reason, "
        "latency percentiles, queue depth (and the schedule's figures with --rate)",
    )
    sim.add_argument(
        "--interval",
        type=_interval,
        metavar="SECONDS",
        help="the sampling interval of the CSV, the plot and the JSON samples "
        f"({INTERVAL_S_MIN:g} to 3600; default: adapt, at least {SAMPLES_MIN} intervals "
        f"and at most {INTERVAL_S_MAX:g} s)",
    )
    sim.add_argument(
        "--plot",
        metavar="FILE",
        help="write a plot of throughput, latency percentiles, refusals and queue depth "
        "over time: PNG for FILE.png, SVG for FILE.svg",
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


def _needs_extra() -> None:
    """Say in one line how to install what the simulator needs, if it is missing."""
    missing = []
    for module in ("numpy", "rich"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise UsageError(
            f"bank simulate needs {' and '.join(missing)}: pip install 'bank[simulate]'"
        )


def _targets(args: argparse.Namespace) -> dict[str, Target]:
    """Check every output option before the run (a long run must not end in 'cannot write')."""
    from bank.simulate.outputs import OutputError, check_distinct, check_target
    from bank.simulate.plot import plot_format

    targets: dict[str, Target] = {}
    try:
        if args.json is not None:
            targets["json"] = check_target("--json", args.json)
        if args.csv is not None:
            targets["csv"] = check_target("--csv", args.csv)
        if args.plot is not None:
            if args.plot == "-":
                raise OutputError("--plot -: the plot needs a file name ending .png or .svg")
            plot_format("--plot", args.plot)
            targets["plot"] = check_target("--plot", args.plot)
        if args.history is not None:
            targets["history"] = check_target("--history", args.history, devices=False)
        check_distinct(list(targets.values()))
    except OutputError as exc:
        raise UsageError(str(exc)) from None
    return targets


def run(args: argparse.Namespace) -> int:
    """Run the simulation, print its summary, write the files asked for; the exit code."""
    _needs_extra()
    from bank.simulate.outputs import OutputError
    from bank.simulate.progress import progress_for
    from bank.simulate.report import print_summary, write_csv, write_json
    from bank.simulate.runner import OPS_DEFAULT, SimulationConfig, run_simulation
    from bank.simulate.thresholds import InvalidThreshold, evaluate, parse_threshold
    from bank.simulate.workload import InvalidWorkload

    targets = _targets(args)
    if args.history is not None and args.db is None:
        raise UsageError(
            "--history needs --db: the temporary ledger is deleted after the run, "
            "so the history could not be checked against it"
        )
    if args.arrival != "fixed" and args.rate is None:
        raise UsageError("--arrival poisson needs --rate (a closed loop has no arrivals)")
    try:
        thresholds = [parse_threshold(t, open_model=args.rate is not None) for t in args.threshold]
    except InvalidThreshold as exc:
        raise UsageError(str(exc)) from None
    # With a result on stdout, everything else a person reads goes to stderr.
    to_stdout = any(t.how == "stdout" for t in targets.values())
    out = sys.stderr if to_stdout else sys.stdout
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
                rate=args.rate,
                arrival=args.arrival,
                interval_s=args.interval,
                gc=args.gc,
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
        verdicts = evaluate(thresholds, result)
        print_summary(result, out, verdicts)
        written = []
        try:
            if "json" in targets:
                write_json(result, targets["json"], verdicts)
                written.append(f"result written to {_shown(targets['json'])}")
            if "csv" in targets:
                write_csv(result, targets["csv"])
                written.append(f"intervals written to {_shown(targets['csv'])}")
            if "plot" in targets:
                from bank.simulate.plot import write_plot

                write_plot(result, targets["plot"])
                written.append(f"plot written to {args.plot}")
        except OutputError as exc:
            raise UsageError(str(exc)) from None
        for line in written:
            print(line, file=out)
        if args.history:
            print(
                f"history written to {args.history} (check it with `bank check-history`)",
                file=out,
            )
        if tmpdir is None:
            print(f"ledger: {db} (check it again with `bank audit --db {db}`)", file=out)
        return exit_code(result, verdicts)
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)


def _shown(target: Target) -> str:
    return "stdout" if target.how == "stdout" else target.path


def exit_code(result: SimulationResult, verdicts: Sequence[Verdict]) -> int:
    """1 if the ledger or a teller went wrong, else 130 if interrupted, else 3 if a threshold
    failed, else 0 (see the module docstring)."""
    code = result.exit_code()
    if code == EXIT_OK and not all(v.ok for v in verdicts):
        return EXIT_THRESHOLD
    return code
