"""Counters, latencies and the interval observer of a load simulation.

The tellers' done callbacks only count and append (one lock acquisition per
batch of operations); everything statistical is computed when it is shown: the
observer folds each interval's latencies into a sparse histogram
(`bank.simulate.histogram`), and percentiles are read from those when the
progress line, the summary, the CSV or the plot asks. Nothing relies on the
GIL: all shared state sits behind one lock.

The observer's interval adapts to the run: with `interval_s=None` it starts
at 1/20 of the expected duration (or `ADAPTIVE_START_S` when that is not
known), at most 1 s, and whenever it holds `2 * SAMPLES_MIN` samples below a
1-s interval it merges neighbours pairwise and doubles the interval, so a
short run still has at least `SAMPLES_MIN` intervals (one of unknown length, once it
lasts `SAMPLES_MIN * ADAPTIVE_START_S`, about 20 ms) and a long one has 1-s
intervals.
"""

from __future__ import annotations

import math
import threading
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from bank.simulate.histogram import Histogram

#: A run aims for at least this many intervals (a short run gets shorter intervals).
SAMPLES_MIN = 20
#: The longest interval the observer adapts to (a long run is sampled once a second).
INTERVAL_S_MAX = 1.0
#: The first interval when the run's length is unknown (1 s / 2**10: doublings reach
#: 1 s). A closed run of 3,000 operations can end in 60 ms: at 1/256 s it got 19 intervals.
ADAPTIVE_START_S = INTERVAL_S_MAX / 1024
#: The shortest interval `--interval` accepts.
INTERVAL_S_MIN = 0.01
#: How often the observer reads the queue depth within an interval (it keeps the maximum).
DEPTH_POLL_S = 0.02
#: A trailing partial interval shorter than this share of an interval is folded away.
SAMPLE_PARTIAL_SHARE_MIN = 0.1


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
    def of(cls, hist: Histogram) -> LatencySummary:
        """Read the percentiles of `hist` (microseconds) as milliseconds."""
        if hist.count == 0:
            return cls(0, 0.0, 0.0, 0.0, 0.0, 0.0)
        return cls(
            count=hist.count,
            p50=hist.percentile_us(50.0) / 1000.0,
            p90=hist.percentile_us(90.0) / 1000.0,
            p99=hist.percentile_us(99.0) / 1000.0,
            max=hist.max_us / 1000.0,
            mean=hist.mean_us() / 1000.0,
        )

    def as_dict(self) -> dict[str, float]:
        """`p50`, `p90`, `p99`, `max`, `mean` in ms, rounded to microseconds."""
        return {
            "p50": round(self.p50, 3),
            "p90": round(self.p90, 3),
            "p99": round(self.p99, 3),
            "max": round(self.max, 3),
            "mean": round(self.mean, 3),
        }


@dataclass(frozen=True, slots=True)
class Totals:
    """A consistent reading of the counters."""

    committed: int
    rejected: dict[str, int]
    #: Answers that are not a receipt or a refusal: `LedgerUnavailable`, `BankClosed`,
    #: cancelled futures, anything unexpected (counted in `rejected` too, by name).
    errors: int = 0

    @property
    def rejected_total(self) -> int:
        """Rejections of every reason."""
        return sum(self.rejected.values())

    @property
    def completed(self) -> int:
        """Operations answered so far, committed or rejected."""
        return self.committed + self.rejected_total


@dataclass(frozen=True, slots=True)
class Sample:
    """What happened during one interval, ending `t_s` seconds after the start.

    Counts are of the interval (`completed` is cumulative); `queue_depth` is the
    largest of the depths read during it (every `DEPTH_POLL_S`); the latency
    figures are computed from `latency` when read.
    """

    t_s: float
    interval_s: float
    ops: int
    committed: int
    rejected: dict[str, int]
    completed: int
    queue_depth: int
    latency: Histogram
    #: Open model only (0 in a closed loop): operations due by the schedule in the
    #: interval, submitted, submitted late, and the largest start lag seen (ms).
    due: float = 0.0
    submitted: int = 0
    late: int = 0
    lag_ms: float = 0.0

    @property
    def ops_s(self) -> float:
        """Answered operations per second in the interval."""
        return self.ops / self.interval_s if self.interval_s > 0 else 0.0

    @property
    def rejected_total(self) -> int:
        """Refusals of every reason in the interval."""
        return sum(self.rejected.values())

    def summary(self) -> LatencySummary:
        """The interval's latency percentiles."""
        return LatencySummary.of(self.latency)

    @property
    def p50_ms(self) -> float:
        """Median latency of the interval (ms)."""
        return self.latency.percentile_us(50.0) / 1000.0

    @property
    def p90_ms(self) -> float:
        """90th percentile latency of the interval (ms)."""
        return self.latency.percentile_us(90.0) / 1000.0

    @property
    def p99_ms(self) -> float:
        """99th percentile latency of the interval (ms)."""
        return self.latency.percentile_us(99.0) / 1000.0

    @property
    def max_ms(self) -> float:
        """Largest latency of the interval (ms)."""
        return self.latency.max_us / 1000.0

    def merged(self, later: Sample) -> Sample:
        """This interval and the one right after it as one interval."""
        rejected = dict(self.rejected)
        for reason, count in later.rejected.items():
            rejected[reason] = rejected.get(reason, 0) + count
        return Sample(
            t_s=later.t_s,
            interval_s=self.interval_s + later.interval_s,
            ops=self.ops + later.ops,
            committed=self.committed + later.committed,
            rejected=rejected,
            completed=later.completed,
            queue_depth=max(self.queue_depth, later.queue_depth),
            latency=self.latency.merge(later.latency),
            due=self.due + later.due,
            submitted=self.submitted + later.submitted,
            late=self.late + later.late,
            lag_ms=max(self.lag_ms, later.lag_ms),
        )

    def as_dict(self) -> dict[str, object]:
        """Plain JSON-ready fields (latencies in ms)."""
        lat = self.summary()
        return {
            "t_s": round(self.t_s, 3),
            "interval_s": round(self.interval_s, 3),
            "ops": self.ops,
            "ops_s": round(self.ops_s, 3),
            "completed": self.completed,
            "committed": self.committed,
            "rejected": self.rejected_total,
            "rejected_by_reason": dict(sorted(self.rejected.items())),
            "queue_depth": self.queue_depth,
            "p50_ms": round(lat.p50, 3),
            "p90_ms": round(lat.p90, 3),
            "p99_ms": round(lat.p99, 3),
            "max_ms": round(lat.max, 3),
            "mean_ms": round(lat.mean, 3),
            "due": round(self.due, 1),
            "submitted": self.submitted,
            "late": self.late,
            "lag_ms": round(self.lag_ms, 3),
        }


@dataclass(slots=True)
class _Interval:
    """What the callbacks appended since the observer last took it (guarded by Metrics' lock)."""

    values: array[int] = field(default_factory=lambda: array("q"))
    weights: array[int] = field(default_factory=lambda: array("q"))
    service_values: array[int] = field(default_factory=lambda: array("q"))
    service_weights: array[int] = field(default_factory=lambda: array("q"))
    committed: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    submitted: int = 0
    late: int = 0
    lag_us: int = 0


def _histogram(values: array[int], weights: array[int]) -> Histogram:
    if not values:
        return Histogram.empty()
    import numpy as np

    return Histogram.of(
        np.frombuffer(values, dtype=np.int64), np.frombuffer(weights, dtype=np.int64)
    )


class Metrics:
    """What the tellers' operations did: counts by outcome, latencies, schedule keeping.

    `record` is called from done callbacks (any thread), once per answered batch.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._committed = 0
        self._rejected: dict[str, int] = {}
        self._errors = 0
        self._late = 0
        self._lag_us_max = 0
        self._submitted = 0
        self._interval = _Interval()
        self._service = Histogram.empty()

    def record(
        self,
        latency_us: int | list[int],
        count: int,
        committed: int,
        rejected: dict[str, int] | None = None,
        errors: int = 0,
        service_us: int | None = None,
    ) -> None:
        """Add one answered batch of `count` operations.

        `latency_us` is one latency for all of them (a closed-loop batch: sent and
        answered together) or one per operation (open model: each from its own
        intended start). `service_us` (open model) is the batch's time from its
        actual submit to its answer.
        """
        with self._lock:
            interval = self._interval
            if isinstance(latency_us, int):
                interval.values.append(latency_us)
                interval.weights.append(count)
            else:
                interval.values.extend(latency_us)
                interval.weights.extend([1] * len(latency_us))
            if service_us is not None:
                interval.service_values.append(service_us)
                interval.service_weights.append(count)
            self._committed += committed
            interval.committed += committed
            if rejected:
                for reason, n in rejected.items():
                    self._rejected[reason] = self._rejected.get(reason, 0) + n
                    interval.rejected[reason] = interval.rejected.get(reason, 0) + n
            self._errors += errors

    def submitted(self, count: int, late: int, lag_us: int) -> None:
        """Open model: `count` operations went out, `late` of them late, the oldest `lag_us` behind."""
        with self._lock:
            interval = self._interval
            interval.submitted += count
            interval.late += late
            interval.lag_us = max(interval.lag_us, lag_us)
            self._submitted += count
            self._late += late
            self._lag_us_max = max(self._lag_us_max, lag_us)

    def totals(self) -> Totals:
        """Committed and rejected counts so far."""
        with self._lock:
            return Totals(self._committed, dict(self._rejected), self._errors)

    def schedule_totals(self) -> tuple[int, int, int]:
        """Open model: (submitted, late, largest start lag in us) so far."""
        with self._lock:
            return self._submitted, self._late, self._lag_us_max

    def take_interval(self) -> tuple[Totals, _Interval]:
        """Counters now, and what was recorded since the previous call (then forgets it)."""
        with self._lock:
            taken, self._interval = self._interval, _Interval()
            totals = Totals(self._committed, dict(self._rejected), self._errors)
        # Outside the lock: the callbacks never wait for the folding.
        service = _histogram(taken.service_values, taken.service_weights)
        if service.count:
            self._service = self._service.merge(service)  # only the observer thread writes it
        return totals, taken

    def service_latency(self) -> LatencySummary:
        """Open model: latency from each batch's actual submit (what a closed loop would report)."""
        return LatencySummary.of(self._service)


class Observer(threading.Thread):
    """Samples throughput, latency, queue depth (and schedule keeping) every interval.

    A daemon thread: it only reads, so it must never hold up the exit of the
    process. `stop()` takes a last, partial sample so the tail of a run is there.
    """

    def __init__(
        self,
        metrics: Metrics,
        queue_depth: Callable[[], int],
        *,
        interval_s: float | None = None,
        expected_s: float | None = None,
        due_by: Callable[[float], float] | None = None,
    ) -> None:
        super().__init__(name="observer", daemon=True)
        self._metrics = metrics
        self._queue_depth = queue_depth
        self.adaptive = interval_s is None
        if interval_s is None:
            # A known length aims a little above SAMPLES_MIN: sampling jitter and a
            # folded tail must not leave it one short.
            start = ADAPTIVE_START_S if expected_s is None else expected_s / (SAMPLES_MIN + 4)
            interval_s = min(INTERVAL_S_MAX, max(ADAPTIVE_START_S, start))
        self.interval_s = interval_s
        self._due_by = due_by
        self._halt = threading.Event()
        self._lock = threading.Lock()
        self._samples: list[Sample] = []
        self._t0 = time.monotonic()
        self._last_t = self._t0
        self._last_completed = 0
        self._latency = Histogram.empty()
        self._depth_max = 0

    def begin(self, t0: float) -> None:
        """Measure from `t0` (time.monotonic), the moment the tellers were released."""
        with self._lock:
            self._t0 = self._last_t = t0

    def run(self) -> None:
        while True:
            # Intervals end on a grid from the start (no drift); after a stall (a busy
            # GIL) one longer interval ends now and the next ends on the grid again.
            # A grid point less than half an interval after the last sample is skipped.
            with self._lock:
                t0, step = self._t0, self.interval_s
                k = math.floor((self._last_t - t0) / step + 0.5) + 1
            due = t0 + k * step
            # The queue depth is read every DEPTH_POLL_S meanwhile: its interval maximum
            # is what the plot shows (one reading a second mostly found it empty).
            while (left := due - time.monotonic()) > 0:
                if self._halt.wait(min(left, DEPTH_POLL_S)):
                    return
                self._poll_depth()
            self._sample(time.monotonic())

    def _poll_depth(self) -> int:
        try:
            depth = self._queue_depth()
        except Exception:  # the bank may be closing; the depth is then meaningless
            return 0
        with self._lock:
            self._depth_max = max(self._depth_max, depth)
        return depth

    def _sample(self, now: float) -> None:
        self._poll_depth()
        totals, taken = self._metrics.take_interval()
        hist = _histogram(taken.values, taken.weights)
        with self._lock:
            depth, self._depth_max = self._depth_max, 0
            dt = now - self._last_t
            if dt <= 0:
                return
            start, end = self._last_t - self._t0, now - self._t0
            due = self._due_by(end) - self._due_by(start) if self._due_by is not None else 0.0
            self._samples.append(
                Sample(
                    t_s=end,
                    interval_s=dt,
                    ops=totals.completed - self._last_completed,
                    committed=taken.committed,
                    rejected=taken.rejected,
                    completed=totals.completed,
                    queue_depth=depth,
                    latency=hist,
                    due=due,
                    submitted=taken.submitted,
                    late=taken.late,
                    lag_ms=taken.lag_us / 1000.0,
                )
            )
            self._latency = self._latency.merge(hist)
            self._last_t = now
            self._last_completed = totals.completed
            if (
                self.adaptive
                and len(self._samples) >= 2 * SAMPLES_MIN
                and self.interval_s < INTERVAL_S_MAX
            ):
                pairs = self._samples
                merged = [a.merged(b) for a, b in zip(pairs[0::2], pairs[1::2], strict=False)]
                if len(pairs) % 2:
                    merged.append(pairs[-1])
                self._samples = merged
                self.interval_s = min(INTERVAL_S_MAX, self.interval_s * 2)

    def stop(self, now: float | None = None) -> None:
        """Stop sampling, after a final partial sample up to `now` if it is long enough."""
        self._halt.set()
        if self.is_alive():
            self.join()
        end = time.monotonic() if now is None else now
        with self._lock:
            partial = end - self._last_t
            empty = not self._samples
        if partial >= SAMPLE_PARTIAL_SHARE_MIN * self.interval_s or empty:
            self._sample(end)
        else:
            self._fold_tail(end)

    def _fold_tail(self, end: float) -> None:
        """A sliver after the last sample: add what it recorded to that sample."""
        totals, taken = self._metrics.take_interval()
        hist = _histogram(taken.values, taken.weights)
        with self._lock:
            depth, self._depth_max = self._depth_max, 0
            last = self._samples[-1]
            start, stop = self._last_t - self._t0, end - self._t0
            due = self._due_by(stop) - self._due_by(start) if self._due_by is not None else 0.0
            tail = Sample(
                t_s=end - self._t0,
                interval_s=end - self._last_t,
                ops=totals.completed - self._last_completed,
                committed=taken.committed,
                rejected=taken.rejected,
                completed=totals.completed,
                queue_depth=last.queue_depth,
                latency=hist,
                due=due,
                submitted=taken.submitted,
                late=taken.late,
                lag_ms=taken.lag_us / 1000.0,
            )
            self._samples[-1] = replace(last.merged(tail), queue_depth=max(last.queue_depth, depth))
            self._latency = self._latency.merge(hist)
            self._last_t = end
            self._last_completed = totals.completed

    def samples(self) -> list[Sample]:
        """The readings so far, oldest first."""
        with self._lock:
            return list(self._samples)

    def last_ops_s(self) -> float | None:
        """Throughput of the newest interval (None before the first)."""
        with self._lock:
            return self._samples[-1].ops_s if self._samples else None

    def latency(self) -> LatencySummary:
        """Latency percentiles over every interval so far."""
        with self._lock:
            return LatencySummary.of(self._latency)
