"""`--plot FILE`: throughput, latency percentiles, refusals and queue depth over a run.

PNG or SVG by the file's extension. Four panels on one time axis:
- throughput: answered ops/s per interval, the run's average, and in an open
  model the scheduled rate;
- latency percentiles (p50, p90, p99, max; in an open model also the start lag)
  on a log axis labelled only at 1-2-5 steps, in plain numbers;
- refusals per second by reason;
- the queue depth (the largest read in each interval) on its own scale (the capacity is named, not drawn: at
  4,096 it would flatten a depth of 0-128 into a line).
Legends sit to the right of their panel, outside the data, so they hide nothing.
matplotlib's object API with the Agg canvas, never `pyplot`: no display, no global state.
"""

from __future__ import annotations

import io
import math
from pathlib import PurePath

from bank.simulate.outputs import OutputError, Target, write_bytes
from bank.simulate.runner import SimulationResult

#: Extensions `--plot` accepts, and the format each one writes.
PLOT_FORMATS = {".png": "png", ".svg": "svg"}
#: Refusal reasons drawn one by one; the rest are summed as "other".
REASONS_SHOWN = 5
_STEPS = (1.0, 2.0, 5.0)


def plot_format(option: str, path: str) -> str:
    """The format for `path` from its extension; raise `OutputError` for anything else."""
    suffix = PurePath(path).suffix.lower()
    fmt = PLOT_FORMATS.get(suffix)
    if fmt is None:
        shown = f"extension {suffix!r}" if suffix else "no extension"
        raise OutputError(
            f"{option} {path}: {shown}; the plot is written as PNG (.png) or SVG (.svg)"
        )
    return fmt


def _step_below(value: float) -> float:
    """The largest 1-2-5 step (..., 0.5, 1, 2, 5, 10, ...) at or below `value` (> 0)."""
    decade = 10.0 ** math.floor(math.log10(value))
    return max(s * decade for s in _STEPS if s * decade <= value * (1 + 1e-9))


def _step_above(value: float) -> float:
    """The smallest 1-2-5 step at or above `value` (> 0)."""
    decade = 10.0 ** math.floor(math.log10(value))
    for s in (*_STEPS, 10.0):
        if s * decade >= value * (1 - 1e-9):
            return s * decade
    return 10 * decade


def _plain(value: float) -> str:
    """A tick label without exponents: 0.05, 0.5, 2, 20, 5,000."""
    if value >= 1:
        return f"{value:,.0f}"
    return f"{value:.6f}".rstrip("0").rstrip(".")


def render_plot(result: SimulationResult, fmt: str) -> bytes:
    """The plot of `result` as PNG or SVG bytes."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullFormatter

    samples = result.samples
    t = [s.t_s for s in samples]
    fig = Figure(figsize=(11, 10), dpi=100, layout="constrained")
    ax_ops, ax_lat, ax_rej, ax_q = fig.subplots(4, 1, sharex=True, height_ratios=[3, 3, 1.6, 1.6])
    marker = "o" if len(samples) < 8 else None
    legend = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0), "fontsize": 9, "frameon": False}

    ax_ops.plot(t, [s.ops_s for s in samples], color="tab:blue", marker=marker, label="answered")
    if result.schedule is not None:
        ax_ops.plot(
            t,
            [s.due / s.interval_s if s.interval_s > 0 else 0.0 for s in samples],
            color="tab:olive",
            linestyle="--",
            marker=marker,
            label="scheduled",
        )
    ax_ops.axhline(
        result.throughput_ops_s,
        color="tab:gray",
        linestyle=":",
        linewidth=1,
        label=f"run average\n{result.throughput_ops_s:,.0f} ops/s",
    )
    ax_ops.set_ylabel("throughput (ops/s)")
    ax_ops.set_ylim(bottom=0)
    ax_ops.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax_ops.legend(**legend)
    ax_ops.grid(True, alpha=0.3)

    # With few operations in an interval p99 == max: max is drawn as small markers on
    # top, so that both stay visible where they coincide.
    series = [
        ("p50", "tab:green", "-", 1.6, None, [s.p50_ms for s in samples]),
        ("p90", "tab:orange", "-", 1.6, None, [s.p90_ms for s in samples]),
        ("p99", "tab:red", "-", 1.6, None, [s.p99_ms for s in samples]),
        ("max", "tab:purple", ":", 0.8, "^", [s.max_ms for s in samples]),
    ]
    if result.schedule is not None:
        series.append(("start lag (max)", "tab:gray", "--", 1.0, None, [s.lag_ms for s in samples]))
    for name, color, style, width, symbol, values in series:
        ax_lat.plot(
            t,
            [v if v > 0 else math.nan for v in values],  # no answers: a gap, not a 0 on a log axis
            color=color,
            linestyle=style,
            linewidth=width,
            # Small dots always: an interval between two without answers is a lone
            # point, which a line alone would not draw.
            marker=symbol or marker or ".",
            markersize=3.5 if symbol else (6 if marker else 3),
            label=name,
        )
    positive = [v for *_, values in series for v in values if v > 0]
    if positive:
        # Some headroom, so that no line runs along the frame.
        low, high = _step_below(min(positive) / 1.15), _step_above(max(positive) * 1.15)
        if high <= low:
            high = _step_above(low * 1.01)
        ax_lat.set_yscale("log")
        ax_lat.set_ylim(low, high)
        ticks = [
            s * 10.0**d
            for d in range(math.floor(math.log10(low)) - 1, math.ceil(math.log10(high)) + 1)
            for s in _STEPS
            if low * (1 - 1e-9) <= s * 10.0**d <= high * (1 + 1e-9)
        ]
        ax_lat.yaxis.set_major_locator(FixedLocator(ticks))
        ax_lat.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _plain(v)))
        ax_lat.yaxis.set_minor_formatter(NullFormatter())
    origin = "intended start" if result.schedule is not None else "submit"
    ax_lat.set_ylabel(f"latency (ms, log)\nfrom {origin}")
    ax_lat.legend(**legend)
    ax_lat.grid(True, which="major", alpha=0.3)

    reasons: dict[str, int] = {}
    for s in samples:
        for reason, count in s.rejected.items():
            reasons[reason] = reasons.get(reason, 0) + count
    ranked = sorted(reasons, key=lambda r: (-reasons[r], r))
    shown, rest = ranked[:REASONS_SHOWN], ranked[REASONS_SHOWN:]
    colors = ["tab:red", "tab:orange", "tab:brown", "tab:pink", "tab:cyan"]
    for reason, color in zip(shown, colors, strict=False):
        ax_rej.plot(
            t,
            [
                s.rejected.get(reason, 0) / s.interval_s if s.interval_s > 0 else 0.0
                for s in samples
            ],
            color=color,
            marker=marker,
            label=reason,
        )
    if rest:
        ax_rej.plot(
            t,
            [
                sum(s.rejected.get(r, 0) for r in rest) / s.interval_s if s.interval_s > 0 else 0.0
                for s in samples
            ],
            color="tab:gray",
            marker=marker,
            label=f"{len(rest)} other reason(s)",
        )
    if not ranked:
        ax_rej.plot(t, [0.0 for _ in samples], color="tab:gray", marker=marker, label="none")
    ax_rej.set_ylabel("refused (ops/s)")
    ax_rej.set_ylim(bottom=0)
    ax_rej.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax_rej.legend(**legend)
    ax_rej.grid(True, alpha=0.3)

    depths = [s.queue_depth for s in samples]
    ax_q.plot(t, depths, color="tab:brown", marker=marker, label="queue depth")
    ax_q.set_ylabel("queue depth\n(max per interval)")
    ax_q.set_xlabel("time since start (s)")
    ax_q.set_ylim(0, max(1, max(depths, default=0)) * 1.15)
    ax_q.yaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
    ax_q.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax_q.legend(
        [
            f"queue depth\n(high-water {result.queue_high_water:,}\nof capacity {result.queue_capacity:,})"
        ],
        **legend,
    )
    ax_q.grid(True, alpha=0.3)
    ax_q.set_xlim(left=0)

    config = result.config
    lat = result.latency
    audit = "audit clean" if result.audit.ok else "AUDIT FAILED"
    model = "closed loop"
    if result.schedule is not None:
        sched = result.schedule
        model = (
            f"open model, --rate {sched.rate.spec()} ({sched.arrival}), "
            f"late {sched.late_pct:.1f}%, dropped {sched.dropped:,}"
        )
    fig.suptitle(
        f"bank simulate: {result.ops:,} ops in {result.duration_s:,.1f} s, "
        f"{result.throughput_ops_s:,.0f} ops/s, p50 {lat.p50:.2f} / p99 {lat.p99:.2f} / "
        f"max {lat.max:.1f} ms, {audit}\n"
        f"{config.tellers} tellers x window {config.window}, {config.workers} workers, "
        f"{config.accounts:,} accounts, {config.mix.spec()}, skew {config.skew.spec()}, "
        f"seed {config.seed}, durability {config.durability}\n"
        f"{model}; {len(samples)} intervals of {result.interval_s:.3g} s",
        fontsize=10,
    )
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt)
    return buffer.getvalue()


def write_plot(result: SimulationResult, target: Target) -> None:
    """Write the plot to `target`, PNG or SVG by its extension."""
    fmt = plot_format(target.option, target.path)
    write_bytes(target, render_plot(result, fmt))
