"""Counters, latency histograms and the per-second observer of a load simulation.

Latencies are recorded in whole microseconds into HdrHistograms (3 significant
digits), so percentiles are computed from every operation, not from a sample.
All shared state sits behind one lock: tellers record in batches, the observer
reads once a second, and nothing relies on the GIL.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

from hdrh.histogram import HdrHistogram

#: Latencies above an hour are clamped to it (the histogram needs an upper bound).
LATENCY_US_MAX = 3_600_000_000
LATENCY_DIGITS = 3
SAMPLE_INTERVAL_S = 1.0
#: A trailing partial interval shorter than this is folded away (its rate is noise).
SAMPLE_PARTIAL_S_MIN = 0.1

#: One answered operation: (latency in microseconds, reject reason or None if committed).
Outcome = tuple[int, str | None]


def _histogram() -> HdrHistogram:
    return HdrHistogram(1, LATENCY_US_MAX, LATENCY_DIGITS)


@dataclass(frozen=True, slots=True)
class LatencySummary:
    """Percentiles of a histogram, in milliseconds (0.0 when nothing was recorded)."""

    count: int
    p50: float
    p90: float
    p99: float
    max: float
    mean: float

    @classmethod
    def of(cls, hist: HdrHistogram) -> LatencySummary:
        """Read the percentiles of `hist` (microseconds) as milliseconds."""
        count = int(hist.get_total_count())
        if count == 0:
            return cls(0, 0.0, 0.0, 0.0, 0.0, 0.0)
        return cls(
            count=count,
            p50=hist.get_value_at_percentile(50.0) / 1000.0,
            p90=hist.get_value_at_percentile(90.0) / 1000.0,
            p99=hist.get_value_at_percentile(99.0) / 1000.0,
            max=hist.get_max_value() / 1000.0,
            mean=hist.get_mean_value() / 1000.0,
        )

    def as_dict(self) -> dict[str, float]:
        """`p50`, `p90`, `p99`, `max`, `mean` in ms, rounded to microseconds."""
        return {k: round(v, 3) for k, v in asdict(self).items() if k != "count"}


@dataclass(frozen=True, slots=True)
class Totals:
    """A consistent reading of the counters."""

    committed: int
    rejected: dict[str, int]

    @property
    def rejected_total(self) -> int:
        """Rejections of every reason."""
        return sum(self.rejected.values())

    @property
    def completed(self) -> int:
        """Operations answered so far, committed or rejected."""
        return self.committed + self.rejected_total


class Metrics:
    """What the tellers' operations did: counts by outcome and latency histograms."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._committed = 0
        self._rejected: Counter[str] = Counter()
        self._latency = _histogram()
        self._interval = _histogram()  # reset by every `take_interval`

    def record(self, outcomes: Iterable[Outcome]) -> None:
        """Add a batch of answered operations (one lock acquisition per batch)."""
        with self._lock:
            for latency_us, reason in outcomes:
                value = min(max(latency_us, 1), LATENCY_US_MAX)
                self._latency.record_value(value)
                self._interval.record_value(value)
                if reason is None:
                    self._committed += 1
                else:
                    self._rejected[reason] += 1

    def totals(self) -> Totals:
        """Committed and rejected counts so far."""
        with self._lock:
            return Totals(self._committed, dict(self._rejected))

    def latency(self) -> LatencySummary:
        """Latency percentiles over the whole run so far."""
        with self._lock:
            return LatencySummary.of(self._latency)

    def take_interval(self) -> tuple[Totals, LatencySummary]:
        """Counters now, and the latencies recorded since the previous call (then forgets them)."""
        with self._lock:
            summary = LatencySummary.of(self._interval)
            self._interval.reset()
            return Totals(self._committed, dict(self._rejected)), summary


@dataclass(frozen=True, slots=True)
class Sample:
    """One observer reading: what happened during the interval ending at `t_s`."""

    t_s: float
    ops_s: float
    completed: int
    committed: int
    rejected: int
    queue_depth: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    def as_dict(self) -> dict[str, float | int]:
        """Plain JSON-ready fields."""
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}


class Observer(threading.Thread):
    """Samples throughput, latency and queue depth once a second.

    A daemon thread: it only reads, so it must never hold up the exit of the
    process. `stop()` takes a last, partial sample so the tail of a run is plotted.
    """

    def __init__(
        self,
        metrics: Metrics,
        queue_depth: Callable[[], int],
        *,
        interval_s: float = SAMPLE_INTERVAL_S,
    ) -> None:
        super().__init__(name="observer", daemon=True)
        self._metrics = metrics
        self._queue_depth = queue_depth
        self._interval_s = interval_s
        self._halt = threading.Event()
        self._lock = threading.Lock()
        self._samples: list[Sample] = []
        self._t0 = time.monotonic()
        self._last_t = self._t0
        self._last_completed = 0

    def begin(self, t0: float) -> None:
        """Measure from `t0` (time.monotonic), the moment the tellers were released."""
        with self._lock:
            self._t0 = self._last_t = t0

    def run(self) -> None:
        tick = 1
        while True:
            with self._lock:
                due = self._t0 + tick * self._interval_s
            if self._halt.wait(max(0.0, due - time.monotonic())):
                return
            self._sample(time.monotonic())
            tick += 1
            # After a long stall (a busy GIL), skip the missed ticks rather than burst.
            with self._lock:
                behind = int((time.monotonic() - self._t0) / self._interval_s)
            tick = max(tick, behind + 1)

    def _sample(self, now: float) -> None:
        try:
            depth = self._queue_depth()
        except Exception:  # the bank may be closing; the depth is then meaningless
            depth = 0
        totals, latency = self._metrics.take_interval()
        with self._lock:
            dt = now - self._last_t
            if dt <= 0:
                return
            done = totals.completed - self._last_completed
            self._samples.append(
                Sample(
                    t_s=now - self._t0,
                    ops_s=done / dt,
                    completed=totals.completed,
                    committed=totals.committed,
                    rejected=totals.rejected_total,
                    queue_depth=depth,
                    p50_ms=latency.p50,
                    p90_ms=latency.p90,
                    p99_ms=latency.p99,
                    max_ms=latency.max,
                )
            )
            self._last_t = now
            self._last_completed = totals.completed

    def stop(self, now: float | None = None) -> None:
        """Stop sampling, after a final partial sample up to `now` if it is long enough."""
        self._halt.set()
        if self.is_alive():
            self.join()
        end = time.monotonic() if now is None else now
        with self._lock:
            partial = end - self._last_t
        if partial >= SAMPLE_PARTIAL_S_MIN or not self.samples():
            self._sample(end)

    def samples(self) -> list[Sample]:
        """The readings so far, oldest first."""
        with self._lock:
            return list(self._samples)
