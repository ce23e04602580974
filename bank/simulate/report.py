"""How a simulation result is shown: a summary table, a JSON document and a PNG plot."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table

from bank.simulate.runner import SimulationResult

#: Bumped when a key of the JSON document changes meaning (new keys do not bump it).
JSON_FORMAT_VERSION = 1


def result_json(result: SimulationResult) -> dict[str, Any]:
    """The `--json` document: DESIGN.md section 3's keys first, then everything useful.

    `ops == committed + sum(rejected.values())` always holds.
    """
    config = result.config
    totals = result.totals
    return {
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
        "interrupted": result.interrupted,
        "errors": list(result.errors),
        "rejected_total": totals.rejected_total,
        "reject_share": round(totals.rejected_total / result.ops, 6) if result.ops else 0.0,
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
        "per_teller_ops": list(result.per_teller_ops),
        "samples": [s.as_dict() for s in result.samples],
    }


def write_json(result: SimulationResult, path: str | os.PathLike[str]) -> None:
    """Write `result_json(result)` to `path` (atomically: a reader never sees half a file)."""
    text = json.dumps(result_json(result), indent=2) + "\n"
    # Through symlinks, so the file is replaced and the link kept.
    target = Path(os.path.realpath(path))
    if target.exists() and not target.is_file():
        # /dev/stdout, a FIFO, a device: write through it. Renaming a temporary file
        # over it would replace the device itself (as root, /dev/stdout for everyone).
        with target.open("w", encoding="utf-8") as out:
            out.write(text)
        return
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(target)


def _ms(value: float) -> str:
    return f"{value:,.3f} ms"


def print_summary(result: SimulationResult, out: TextIO) -> None:
    """Print the end-of-run summary table (plain text when `out` is not a terminal)."""
    config = result.config
    totals = result.totals
    console = Console(file=out, highlight=False, soft_wrap=False, width=100)
    title = "bank simulate" + (" (interrupted)" if result.interrupted else "")
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    table.add_column("note")
    table.add_row(
        "tellers",
        f"{config.tellers} x window {config.window}",
        f"{config.workers} workers, durability {config.durability}",
    )
    table.add_row(
        "workload",
        f"{config.accounts:,} accounts",
        f"{config.mix.spec()}, skew {config.skew.spec()}, seed {config.seed}",
    )
    table.add_row("operations", f"{result.ops:,}", f"in {result.duration_s:,.2f} s")
    table.add_row("throughput", f"{result.throughput_ops_s:,.0f} ops/s", "")
    table.add_row("committed", f"{totals.committed:,}", "")
    share = 100 * totals.rejected_total / result.ops if result.ops else 0.0
    table.add_row("rejected", f"{totals.rejected_total:,}", f"{share:.1f}% of operations")
    for reason, count in sorted(totals.rejected.items(), key=lambda kv: (-kv[1], kv[0])):
        table.add_row(f"  {reason}", f"{count:,}", "")
    lat = result.latency
    table.add_row("latency p50", _ms(lat.p50), "submit to answer, every operation")
    table.add_row("latency p90", _ms(lat.p90), "")
    table.add_row("latency p99", _ms(lat.p99), "")
    table.add_row("latency max", _ms(lat.max), "")
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
    console.print(table)
    for problem in result.audit.problems[:20]:
        console.print(f"  audit: {problem.get('kind')}: {problem.get('message')}", markup=False)
    for error in result.errors:
        console.print(f"  error: {error}", markup=False)


def write_plot(result: SimulationResult, path: str | os.PathLike[str]) -> None:
    """Write a PNG: throughput, latency percentiles and queue depth over time.

    Uses matplotlib's object API with the Agg canvas, never `pyplot`, so it needs
    no display and keeps no global state.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    samples = result.samples
    t = [s.t_s for s in samples]
    fig = Figure(figsize=(10, 8.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax_ops, ax_lat, ax_q = fig.subplots(3, 1, sharex=True, height_ratios=[3, 3, 1.5])
    marker = "o" if len(samples) < 3 else None

    ax_ops.plot(t, [s.ops_s for s in samples], color="tab:blue", marker=marker, label="answered")
    ax_ops.axhline(
        result.throughput_ops_s,
        color="tab:gray",
        linestyle="--",
        linewidth=1,
        label=f"run average {result.throughput_ops_s:,.0f} ops/s",
    )
    ax_ops.set_ylabel("throughput (ops/s)")
    ax_ops.set_ylim(bottom=0)
    ax_ops.legend(loc="lower right")
    ax_ops.grid(True, alpha=0.3)

    for name, color in (("p50", "tab:green"), ("p90", "tab:orange"), ("p99", "tab:red")):
        values = [getattr(s, f"{name}_ms") for s in samples]
        ax_lat.plot(t, values, color=color, marker=marker, label=name)
    ax_lat.plot(
        t, [s.max_ms for s in samples], color="tab:purple", linewidth=0.8, alpha=0.6, label="max"
    )
    if any(s.max_ms > 0 for s in samples):
        ax_lat.set_yscale("log")
        ax_lat.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax_lat.set_ylabel("latency per second (ms)")
    ax_lat.legend(loc="upper right", ncol=4)
    ax_lat.grid(True, which="both", alpha=0.3)

    ax_q.plot(t, [s.queue_depth for s in samples], color="tab:brown", marker=marker)
    ax_q.axhline(result.queue_capacity, color="tab:gray", linestyle=":", linewidth=1)
    ax_q.set_ylabel("queue depth")
    ax_q.set_xlabel("time since start (s)")
    ax_q.set_ylim(bottom=0, top=max(1, result.queue_capacity) * 1.05)
    ax_q.grid(True, alpha=0.3)

    config = result.config
    lat = result.latency
    audit = "audit clean" if result.audit.ok else "AUDIT FAILED"
    fig.suptitle(
        f"bank simulate: {result.ops:,} ops in {result.duration_s:,.1f} s, "
        f"{result.throughput_ops_s:,.0f} ops/s, p50 {lat.p50:.2f} / p99 {lat.p99:.2f} / "
        f"max {lat.max:.1f} ms, {audit}\n"
        f"{config.tellers} tellers x window {config.window}, {config.workers} workers, "
        f"{config.accounts:,} accounts, {config.mix.spec()}, skew {config.skew.spec()}, "
        f"seed {config.seed}, durability {config.durability}",
        fontsize=10,
    )
    fig.savefig(os.fspath(path), format="png")
