"""`--threshold EXPR`: pass/fail conditions over the figures of a run's summary (k6's thresholds).

An expression is `FIGURE OP NUMBER`, e.g. `p99_ms<10`, `throughput_ops_s>=20000`,
`rejected_pct<25`, `errors==0`; OP is one of `<`, `<=`, `>`, `>=`, `==`, `!=`.
The figures are those of `figures()` (the names of the summary's values and of
the JSON document); the open-model ones need `--rate`.
"""

from __future__ import annotations

import difflib
import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bank.simulate.runner import SimulationResult

_OPERATORS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    ">": operator.gt,
}
_EXPR = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=|==|!=|<|>)\s*(\S+)\s*$")

#: Every figure a threshold can name, with what it means (units in the name).
FIGURES: dict[str, str] = {
    "ops": "operations answered",
    "committed": "operations committed",
    "rejected": "operations refused",
    "rejected_pct": "refused operations, % of those answered",
    "errors": "answers that are neither a receipt nor a refusal, plus teller errors",
    "duration_s": "length of the run",
    "throughput_ops_s": "operations answered per second",
    "p50_ms": "median latency",
    "p90_ms": "90th percentile latency",
    "p99_ms": "99th percentile latency",
    "max_ms": "largest latency",
    "mean_ms": "mean latency",
    "queue_high_water": "most operations the bank's queue held",
    "ops_per_commit": "operations per group commit",
}
#: Figures of the open model only (`--rate`).
OPEN_FIGURES: dict[str, str] = {
    "late": "operations sent late (after their intended start + the late margin)",
    "late_pct": "late operations, % of those sent",
    "dropped": "operations due before the run stopped but never sent",
    "dropped_pct": "dropped operations, % of those due",
    "lag_max_ms": "largest delay between an intended start and the submit",
}


class InvalidThreshold(ValueError):
    """A `--threshold` expression that does not parse or names an unknown figure."""


@dataclass(frozen=True, slots=True)
class Threshold:
    """One parsed `--threshold`."""

    expr: str
    figure: str
    op: str
    limit: float

    def holds(self, value: float) -> bool:
        """Whether `value` meets this threshold."""
        return _OPERATORS[self.op](value, self.limit)


@dataclass(frozen=True, slots=True)
class Verdict:
    """A threshold with the run's value of its figure, and whether it held."""

    threshold: Threshold
    value: float
    ok: bool

    def as_dict(self) -> dict[str, object]:
        """The JSON form: expression, figure, operator, limit, value, ok."""
        t = self.threshold
        return {
            "expr": t.expr,
            "figure": t.figure,
            "op": t.op,
            "limit": t.limit,
            "value": self.value,
            "ok": self.ok,
        }


def _known(open_model: bool) -> list[str]:
    return [*FIGURES, *OPEN_FIGURES] if open_model else list(FIGURES)


def parse_threshold(text: str, *, open_model: bool = True) -> Threshold:
    """Parse one expression; raise `InvalidThreshold` saying what is wrong and what is known.

    `open_model=False` (no `--rate`) refuses the figures only an open-model run has.
    """
    match = _EXPR.match(text)
    if match is None:
        raise InvalidThreshold(
            f"threshold {text!r} does not parse: expected FIGURE OP NUMBER, e.g. p99_ms<10 "
            "(OP: < <= > >= == !=)"
        )
    figure, op, number = match.groups()
    if figure not in FIGURES and figure not in OPEN_FIGURES:
        close = difflib.get_close_matches(figure, [*FIGURES, *OPEN_FIGURES], n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise InvalidThreshold(
            f"threshold {text!r}: unknown figure {figure!r}{hint}; known: "
            + ", ".join(_known(True))
        )
    if figure in OPEN_FIGURES and not open_model:
        raise InvalidThreshold(
            f"threshold {text!r}: {figure} is measured only with --rate (an open-model run)"
        )
    try:
        limit = float(number.replace("_", ""))
    except ValueError:
        raise InvalidThreshold(f"threshold {text!r}: {number!r} is not a number") from None
    if not math.isfinite(limit):
        raise InvalidThreshold(f"threshold {text!r}: the limit must be a finite number")
    return Threshold(text.strip(), figure, op, limit)


def figures(result: SimulationResult) -> dict[str, float]:
    """The run's figures by name (the open-model ones only for an open-model run)."""
    lat = result.latency
    values: dict[str, float] = {
        "ops": result.ops,
        "committed": result.totals.committed,
        "rejected": result.totals.rejected_total,
        "rejected_pct": round(result.rejected_pct, 6),
        "errors": result.totals.errors + len(result.errors),
        "duration_s": round(result.duration_s, 6),
        "throughput_ops_s": round(result.throughput_ops_s, 3),
        "p50_ms": lat.p50,
        "p90_ms": lat.p90,
        "p99_ms": lat.p99,
        "max_ms": lat.max,
        "mean_ms": round(lat.mean, 3),
        "queue_high_water": result.queue_high_water,
        "ops_per_commit": round(result.ops / result.group_commits, 3)
        if result.group_commits
        else 0.0,
    }
    schedule = result.schedule
    if schedule is not None:
        values.update(
            late=schedule.late,
            late_pct=round(schedule.late_pct, 6),
            dropped=schedule.dropped,
            dropped_pct=round(schedule.dropped_pct, 6),
            lag_max_ms=schedule.lag_max_ms,
        )
    return values


def evaluate(thresholds: list[Threshold], result: SimulationResult) -> list[Verdict]:
    """Each threshold against the run's figures, in the order given."""
    values = figures(result)
    verdicts = []
    for threshold in thresholds:
        value = values.get(threshold.figure)
        if value is None:  # an open-model figure on a closed run: parse_threshold refuses it
            raise InvalidThreshold(
                f"threshold {threshold.expr!r}: {threshold.figure} was not measured in this run"
            )
        verdicts.append(Verdict(threshold, value, threshold.holds(value)))
    return verdicts
