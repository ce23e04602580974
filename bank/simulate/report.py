"""How a simulation result is shown: the summary table, the JSON document and the interval CSV.

The plot is in `bank.simulate.plot` (matplotlib is imported only when one is asked for).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table

from bank.simulate.metrics import Sample
from bank.simulate.outputs import Target, write_text
from bank.simulate.runner import SimulationResult
from bank.simulate.thresholds import Verdict

#: Bumped when a key of the JSON document changes meaning (new keys do not bump it).
#: 2: `samples` are per-interval counts with `interval_s` and `rejected_by_reason`.
JSON_FORMAT_VERSION = 2


def result_json(result: SimulationResult, verdicts: Sequence[Verdict] = ()) -> dict[str, Any]:
    """The `--json` document: DESIGN.md section 3's keys first, then everything useful.

    `ops == committed + sum(rejected.values())` always holds.
    """
    config = result.config
    totals = result.totals
    doc: dict[str, Any] = {
        "ops": result.ops,
        "committed": totals.committed,
        "rejected": dict(sorted(totals.rejected.items())),
        "duration_s": round(result.duration_s, 6),
        "throughput_ops_s": round(result.throughput_ops_s, 3),
        "latency_ms": result.latency.as_dict(),
        "audit": {
            "ok": result.audit.ok,
            "problems": list(result.audit.problems),
            "problems_total": result.audit.problems_total,
            "seq": result.audit.seq,
            "head_hash": result.audit.head_hash,
        },
        "format_version": JSON_FORMAT_VERSION,
        "ok": result.ok,
        "thresholds": [v.as_dict() for v in verdicts],
        "thresholds_ok": all(v.ok for v in verdicts),
        "interrupted": result.interrupted,
        "errors": list(result.errors),
        "error_answers": totals.errors,
        "rejected_total": totals.rejected_total,
        "reject_share": round(totals.rejected_total / result.ops, 6) if result.ops else 0.0,
        "rejected_pct": round(result.rejected_pct, 6),
        "model": "closed" if result.schedule is None else "open",
        "schedule": None,
        "queue_high_water": result.queue_high_water,
        "queue_capacity": result.queue_capacity,
        "group_commits": result.group_commits,
        "ops_per_commit": round(result.ops / result.group_commits, 3)
        if result.group_commits
        else 0.0,
        "ledger_seq": result.ledger_seq,
        "total_balance": result.total_balance,
        "db": config.db,
        "tellers": config.tellers,
        "window": config.window,
        "workers": config.workers,
        "accounts": config.accounts,
        "requested_ops": config.ops,
        "requested_duration_s": config.duration_s,
        "mix": config.mix.spec(),
        "skew": config.skew.spec(),
        "seed": config.seed,
        "initial_balance": config.initial_balance,
        "durability": config.durability,
        "gc": config.gc,
        "per_teller_ops": list(result.per_teller_ops),
        "interval_s": round(result.interval_s, 6),
        "samples": [s.as_dict() for s in result.samples],
    }
    schedule = result.schedule
    if schedule is not None:
        doc["schedule"] = {
            "rate": schedule.rate.spec(),
            "rate_start_ops_s": schedule.rate.start,
            "rate_end_ops_s": schedule.rate.end,
            "arrival": schedule.arrival,
            "due": schedule.due,
            "submitted": schedule.submitted,
            "late": schedule.late,
            "late_pct": round(schedule.late_pct, 6),
            "late_after_ms": schedule.late_after_ms,
            "dropped": schedule.dropped,
            "dropped_pct": round(schedule.dropped_pct, 6),
            "lag_max_ms": round(schedule.lag_max_ms, 3),
            "latency_from": "intended start",
            "service_latency_ms": schedule.service.as_dict(),
        }
    return doc


def write_json(result: SimulationResult, target: Target, verdicts: Sequence[Verdict] = ()) -> None:
    """Write `result_json(result)` to `target` (see `bank.simulate.outputs`)."""
    write_text(target, json.dumps(result_json(result, verdicts), indent=2) + "\n")


# -- the interval CSV ----------------------------------------------------------------------


def csv_text(result: SimulationResult) -> str:
    """One row per interval: time, counts, refusals by reason, latency percentiles, queue depth.

    Refusal columns are `rejected_<Reason>` for every reason seen in the run
    (sorted); an open-model run adds `due`, `submitted`, `late` and `lag_ms`.
    """
    samples = result.samples
    reasons = sorted({reason for s in samples for reason in s.rejected})
    open_model = result.schedule is not None
    header = [
        "t_s",
        "interval_s",
        "ops",
        "ops_s",
        "committed",
        "rejected",
        *(f"rejected_{reason}" for reason in reasons),
        "p50_ms",
        "p90_ms",
        "p99_ms",
        "max_ms",
        "mean_ms",
        "queue_depth",
    ]
    if open_model:
        header += ["due", "submitted", "late", "lag_ms"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for s in samples:
        lat = s.summary()
        row: list[object] = [
            f"{s.t_s:.3f}",
            f"{s.interval_s:.3f}",
            s.ops,
            f"{s.ops_s:.1f}",
            s.committed,
            s.rejected_total,
            *(s.rejected.get(reason, 0) for reason in reasons),
            f"{lat.p50:.3f}",
            f"{lat.p90:.3f}",
            f"{lat.p99:.3f}",
            f"{lat.max:.3f}",
            f"{lat.mean:.3f}",
            s.queue_depth,
        ]
        if open_model:
            row += [f"{s.due:.1f}", s.submitted, s.late, f"{s.lag_ms:.3f}"]
        writer.writerow(row)
    return buffer.getvalue()


def write_csv(result: SimulationResult, target: Target) -> None:
    """Write `csv_text(result)` to `target`."""
    write_text(target, csv_text(result))


# -- the summary ---------------------------------------------------------------------------


def _ms(value: float) -> str:
    return f"{value:,.3f} ms"


def _samples_note(samples: list[Sample], interval_s: float) -> str:
    return f"{len(samples)} intervals of {interval_s:.3g} s"


def print_summary(result: SimulationResult, out: TextIO, verdicts: Sequence[Verdict] = ()) -> None:
    """Print the end-of-run summary table, as wide as the terminal (COLUMNS, else 80)."""
    config = result.config
    totals = result.totals
    console = Console(file=out, highlight=False, soft_wrap=False)
    title = "bank simulate" + (" (interrupted)" if result.interrupted else "")
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("what", style="bold", no_wrap=True)
    table.add_column("value", justify="right", no_wrap=True)
    table.add_column("note", overflow="fold")
    table.add_row(
        "tellers",
        f"{config.tellers} x window {config.window}",
        f"{config.workers} workers, durability {config.durability}"
        + (", gc throughput" if config.gc == "throughput" else ""),
    )
    table.add_row(
        "workload",
        f"{config.accounts:,} accounts",
        f"{config.mix.spec().replace(',', ', ')}; skew {config.skew.spec()}, seed {config.seed}",
    )
    schedule = result.schedule
    if schedule is None:
        table.add_row("model", "closed loop", "each teller sends when an answer frees room")
    else:
        rate = schedule.rate
        shown = (
            f"{rate.start:,.0f} ops/s"
            if not rate.ramp
            else f"{rate.start:,.0f} -> {rate.end:,.0f} ops/s"
        )
        table.add_row("model", "open", f"--rate {shown}, {schedule.arrival} arrivals")
    table.add_row("operations", f"{result.ops:,}", f"in {result.duration_s:,.2f} s")
    table.add_row(
        "throughput",
        f"{result.throughput_ops_s:,.0f} ops/s",
        _samples_note(result.samples, result.interval_s),
    )
    table.add_row("committed", f"{totals.committed:,}", "")
    table.add_row(
        "rejected", f"{totals.rejected_total:,}", f"{result.rejected_pct:.1f}% of operations"
    )
    for reason, count in sorted(totals.rejected.items(), key=lambda kv: (-kv[1], kv[0])):
        table.add_row(f"  {reason}", f"{count:,}", "")
    lat = result.latency
    origin = "submit to answer" if schedule is None else "intended start to answer"
    table.add_row("latency p50", _ms(lat.p50), f"{origin}, every operation")
    table.add_row("latency p90", _ms(lat.p90), "")
    table.add_row("latency p99", _ms(lat.p99), "")
    table.add_row("latency max", _ms(lat.max), "")
    if schedule is not None:
        table.add_row(
            "service p99",
            _ms(schedule.service.p99),
            "submit to answer (what a closed loop would report)",
        )
        table.add_row(
            "late",
            f"{schedule.late:,}",
            f"{schedule.late_pct:.1f}% sent > {schedule.late_after_ms} ms after their start",
        )
        table.add_row(
            "dropped",
            f"{schedule.dropped:,}",
            f"{schedule.dropped_pct:.1f}% of {schedule.due:,} due, never sent",
        )
        table.add_row("start lag max", _ms(schedule.lag_max_ms), "intended start to submit")
    table.add_row(
        "queue high-water",
        f"{result.queue_high_water:,}",
        f"of capacity {result.queue_capacity:,}",
    )
    per_commit = result.ops / result.group_commits if result.group_commits else 0.0
    table.add_row(
        "group commits", f"{result.group_commits:,}", f"{per_commit:,.1f} operations per commit"
    )
    table.add_row(
        "conservation",
        "ok" if result.total_balance == 0 else "BROKEN",
        f"sum of all balances = {result.total_balance}",
    )
    verdict = "[green]clean[/green]" if result.audit.ok else "[red]FAILED[/red]"
    problems = result.audit.problems_total
    table.add_row("audit", verdict, f"{problems} problem(s), ledger seq {result.ledger_seq:,}")
    for v in verdicts:
        mark = "[green]pass[/green]" if v.ok else "[red]FAIL[/red]"
        table.add_row("threshold", mark, f"{v.threshold.expr} (measured {v.value:,.6g})")
    console.print(table)
    for problem in result.audit.problems[:20]:
        console.print(f"  audit: {problem.get('kind')}: {problem.get('message')}", markup=False)
    for error in result.errors:
        console.print(f"  error: {error}", markup=False)
