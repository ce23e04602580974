"""Open-model arrival schedules: when each operation of a `--rate` run is due.

A closed loop (no `--rate`) sends the next operation when an answer frees room
in a teller's window, so a slow engine slows the load down and the latencies
it reports leave out the time operations would have waited (coordinated
omission). With `--rate`, operations are *due* at times fixed in advance and
latency is measured from that intended start (as wrk2 does), so a schedule the
engine cannot keep shows up as growing latency, late and dropped operations.

The schedule is a cumulative count `C(t)` of operations due by time `t`; its
inverse gives the intended start of operation number `n` (counted from 0 over
all tellers). A fixed rate R has `C(t) = R t`; a ramp from A to B over D
seconds has `C(t) = A t + (B - A) t**2 / (2 D)`, then stays at B.

- `fixed` arrivals: teller `i` of `T` takes operations `i, i + T, i + 2T, ...`,
  so the tellers interleave evenly.
- `poisson` arrivals: each teller is a Poisson process of rate `C'(t) / T`
  (seeded per teller): its k-th arrival is due at `C^-1(T * S_k)`, where `S_k`
  sums k unit exponential draws (a time change of a unit-rate process).
"""

from __future__ import annotations

import math
import random
from abc import abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from bank.simulate.workload import InvalidWorkload

#: The largest rate `--rate` accepts (operations per second, over all tellers).
RATE_MAX = 10_000_000.0
ARRIVALS = ("fixed", "poisson")
Arrival = Literal["fixed", "poisson"]


@dataclass(frozen=True, slots=True)
class Rate:
    """A target rate in operations per second: constant, or a linear ramp start -> end."""

    start: float
    end: float

    @property
    def ramp(self) -> bool:
        """True for `A:B` with A != B."""
        return self.start != self.end

    def spec(self) -> str:
        """The canonical `--rate` text (parse_rate(r.spec()) == r)."""
        if not self.ramp:
            return f"{self.start:g}"
        return f"{self.start:g}:{self.end:g}"

    def mean(self) -> float:
        """The average rate over the ramp (the rate itself when constant)."""
        return (self.start + self.end) / 2


def _rate_number(text: str, whole: str) -> float:
    cleaned = text.strip().replace("_", "")
    try:
        value = float(cleaned)
    except ValueError:
        raise InvalidWorkload(
            f"rate {whole!r}: {text.strip()!r} is not a number of operations per second"
        ) from None
    if not math.isfinite(value) or not 0 < value <= RATE_MAX:
        raise InvalidWorkload(
            f"rate {whole!r}: each rate must be more than 0 and at most {RATE_MAX:,.0f} ops/s"
        )
    return value


def parse_rate(text: str) -> Rate:
    """Parse `--rate`: `OPS_S` (e.g. `20000`, `2.5e4`, `20_000`) or a ramp `A:B`.

    Raises `InvalidWorkload` naming what is wrong (not a number, zero, negative,
    infinite, above `RATE_MAX`, more than one colon).
    """
    parts = text.split(":")
    if not text.strip():
        raise InvalidWorkload("rate is empty: expected OPS_S (e.g. 20000) or A:B (a ramp)")
    if len(parts) > 2:
        raise InvalidWorkload(f"rate {text!r}: expected OPS_S or A:B, not more than one ':'")
    values = [_rate_number(part, text) for part in parts]
    return Rate(values[0], values[-1])


@dataclass(frozen=True, slots=True)
class Schedule:
    """The intended start of every operation of an open-model run, over all tellers.

    `duration_s` is the length of the ramp (for a constant rate it only says
    when the run's schedule ends).
    """

    rate: Rate
    duration_s: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.duration_s) and self.duration_s > 0):
            raise InvalidWorkload(f"schedule duration must be > 0 s, got {self.duration_s}")

    @classmethod
    def for_ops(cls, rate: Rate, ops: int) -> Schedule:
        """The schedule that has exactly `ops` operations due by its end."""
        return cls(rate, ops / rate.mean())

    def due_by(self, t: float) -> float:
        """C(t): how many operations are due by `t` seconds (a real number)."""
        a, b, d = self.rate.start, self.rate.end, self.duration_s
        if t <= d:
            return a * t + (b - a) * t * t / (2 * d)
        return (a + b) * d / 2 + b * (t - d)

    def rate_at(self, t: float) -> float:
        """C'(t): the target rate at `t` seconds, in operations per second."""
        a, b, d = self.rate.start, self.rate.end, self.duration_s
        return a + (b - a) * min(t, d) / d

    def time_of(self, n: float) -> float:
        """C^-1(n): the second at which `n` operations are due (n >= 0)."""
        a, b, d = self.rate.start, self.rate.end, self.duration_s
        if a == b:
            return n / a
        at_end = (a + b) * d / 2
        if n >= at_end:
            return d + (n - at_end) / b
        k = (b - a) / (2 * d)
        # Roots of k t^2 + a t - n = 0; this form does not cancel for small k.
        return 2 * n / (a + math.sqrt(max(0.0, a * a + 4 * k * n)))

    def teller_times(self, teller: int, tellers: int, arrival: Arrival, seed: int) -> Arrivals:
        """The intended starts (seconds from the start) of teller `teller`'s operations."""
        if not 0 <= teller < tellers:
            raise InvalidWorkload(f"teller {teller} is not one of {tellers}")
        if arrival == "fixed":
            return FixedArrivals(self, teller, tellers)
        return PoissonArrivals(self, teller, tellers, seed)


class Arrivals(Iterator[float]):
    """One teller's intended starts, in order, and how many are due before a time.

    `due_before` lets a run that stopped count what it dropped without drawing
    every arrival it skipped: at `--rate 10M` for a minute that would be 600
    million draws after the run.
    """

    def __init__(self, schedule: Schedule, tellers: int) -> None:
        self._schedule = schedule
        self._tellers = tellers

    def __iter__(self) -> Arrivals:
        return self

    @abstractmethod
    def __next__(self) -> float: ...

    @abstractmethod
    def due_before(self, cut_s: float) -> int:
        """How many of the arrivals not yet yielded are due before `cut_s` seconds."""


class FixedArrivals(Arrivals):
    """Teller `i` of `T` takes operations `i, i + T, i + 2T, ...` of the whole schedule."""

    def __init__(self, schedule: Schedule, teller: int, tellers: int) -> None:
        super().__init__(schedule, tellers)
        self._n = teller

    def __next__(self) -> float:
        t = self._schedule.time_of(self._n)
        self._n += self._tellers
        return t

    def due_before(self, cut_s: float) -> int:
        # Operation m is due before the cut when m < C(cut); ours are n, n + T, ...
        ahead = self._schedule.due_by(cut_s) - self._n
        return max(0, math.ceil(ahead / self._tellers))


class PoissonArrivals(Arrivals):
    """A Poisson process of rate `C'(t) / T`, seeded per teller (a time-changed unit process)."""

    #: Above this many expected arrivals, `due_before` samples their count instead of drawing each.
    EXACT_COUNT_MAX = 10_000

    def __init__(self, schedule: Schedule, teller: int, tellers: int, seed: int) -> None:
        super().__init__(schedule, tellers)
        self._rng = random.Random(f"bank.simulate.arrival:{seed}:{teller}")
        self._s = 0.0

    def __next__(self) -> float:
        self._s += self._rng.expovariate(1.0)
        return self._schedule.time_of(self._tellers * self._s)

    def due_before(self, cut_s: float) -> int:
        # In the unit-rate time, the arrivals after s that come before the cut number
        # Poisson(end - s) (memoryless); a large mean is sampled by its normal limit.
        mean = self._schedule.due_by(cut_s) / self._tellers - self._s
        if mean <= 0:
            return 0
        if mean > self.EXACT_COUNT_MAX:
            return max(0, round(self._rng.gauss(mean, math.sqrt(mean))))
        count, s = 0, self._s
        while True:
            s += self._rng.expovariate(1.0)
            if s >= self._s + mean:
                return count
            count += 1
