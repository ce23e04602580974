"""The simulator's parts on their own: schedules, histograms, thresholds, the observer."""

from __future__ import annotations

import math
import random
import threading
import time

import numpy as np
import pytest

from bank.simulate.histogram import Histogram, bucket_high, bucket_of
from bank.simulate.metrics import SAMPLES_MIN, Metrics, Observer
from bank.simulate.schedule import RATE_MAX, Arrival, Arrivals, Rate, Schedule, parse_rate
from bank.simulate.thresholds import (
    FIGURES,
    InvalidThreshold,
    parse_threshold,
)
from bank.simulate.workload import InvalidWorkload

# -- schedules -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("20000", Rate(20000.0, 20000.0)),
        ("2.5e4", Rate(25000.0, 25000.0)),
        ("20_000", Rate(20000.0, 20000.0)),
        ("5000:50000", Rate(5000.0, 50000.0)),
        (" 100 : 10 ", Rate(100.0, 10.0)),
    ],
)
def test_parse_rate(text: str, expected: Rate) -> None:
    assert parse_rate(text) == expected
    assert parse_rate(expected.spec()) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("fast", "not a number"),
        ("0", "more than 0"),
        ("-5", "more than 0"),
        ("inf", "more than 0"),
        ("nan", "more than 0"),
        ("1e9", "at most"),
        ("1:2:3", "more than one ':'"),
        ("100:", "not a number"),
    ],
)
def test_bad_rates_are_refused_clearly(text: str, message: str) -> None:
    with pytest.raises(InvalidWorkload, match=message):
        parse_rate(text)


@pytest.mark.parametrize("rate", [Rate(1000.0, 1000.0), Rate(500.0, 5000.0), Rate(4000.0, 100.0)])
def test_time_of_inverts_due_by_and_the_ramp_ends_at_its_rate(rate: Rate) -> None:
    schedule = Schedule(rate, 2.0)
    for t in (0.0, 0.001, 0.5, 1.0, 1.999, 2.0, 2.5, 10.0):
        assert schedule.time_of(schedule.due_by(t)) == pytest.approx(t, abs=1e-9)
    assert schedule.rate_at(0.0) == rate.start
    assert schedule.rate_at(2.0) == schedule.rate_at(5.0) == rate.end
    assert schedule.due_by(2.0) == pytest.approx(rate.mean() * 2.0)
    assert Schedule.for_ops(rate, 3000).due_by(Schedule.for_ops(rate, 3000).duration_s) == (
        pytest.approx(3000)
    )


def test_fixed_arrivals_interleave_the_tellers_evenly() -> None:
    schedule = Schedule(Rate(1000.0, 1000.0), 1.0)
    per_teller = [schedule.teller_times(i, 4, "fixed", 0) for i in range(4)]
    times = sorted(next(it) for it in per_teller for _ in range(25))
    gaps = np.diff(times)
    assert len(times) == 100
    assert np.allclose(gaps, 0.001)


def test_poisson_arrivals_are_seeded_and_keep_the_rate() -> None:
    schedule = Schedule(Rate(2000.0, 2000.0), 10.0)
    first = schedule.teller_times(1, 4, "poisson", 7)
    again = schedule.teller_times(1, 4, "poisson", 7)
    other = schedule.teller_times(1, 4, "poisson", 8)
    a = [next(first) for _ in range(5000)]
    assert a == [next(again) for _ in range(5000)]
    assert a != [next(other) for _ in range(5000)]
    # One teller of four: 500 ops/s; 5,000 arrivals take about 10 s (sd ~ 1.4%).
    assert a[-1] == pytest.approx(10.0, rel=0.06)
    gaps = np.diff(a)
    assert gaps.std() == pytest.approx(gaps.mean(), rel=0.1)  # exponential: sd == mean
    with pytest.raises(InvalidWorkload):
        next(schedule.teller_times(4, 4, "fixed", 0))


def _count_by_drawing(arrivals: Arrivals, cut_s: float) -> int:
    count = 0
    while next(arrivals) < cut_s:
        count += 1
    return count


@pytest.mark.parametrize("arrival", ["fixed", "poisson"])
@pytest.mark.parametrize("rate", [Rate(3000.0, 3000.0), Rate(500.0, 8000.0)])
def test_what_is_due_before_a_cut_is_counted_as_drawing_it_would(
    arrival: Arrival, rate: Rate
) -> None:
    # A stopped run counts its dropped operations with due_before instead of drawing them.
    schedule = Schedule(rate, 2.0)
    for teller in range(3):
        for cut_s in (0.0, 0.01, 1.3, 2.0, 3.5):
            counted, drawn = (schedule.teller_times(teller, 3, arrival, 11) for _ in range(2))
            for _ in range(137):  # part-way through, as a run that stopped would be
                assert next(counted) == next(drawn)
            assert counted.due_before(cut_s) == _count_by_drawing(drawn, cut_s)


def test_ten_million_a_second_for_a_minute_is_counted_without_drawing_it() -> None:
    # 600 million arrivals: drawing them took minutes after the run had ended.
    schedule = Schedule(Rate(RATE_MAX, RATE_MAX), 60.0)
    for arrival in ("fixed", "poisson"):
        arrivals = schedule.teller_times(0, 4, arrival, 0)
        next(arrivals)
        due = arrivals.due_before(60.0)
        assert due == pytest.approx(RATE_MAX * 60 / 4, rel=1e-3)


# -- histograms ----------------------------------------------------------------------------


def test_buckets_are_exact_below_2048_and_within_a_tenth_of_a_percent_above() -> None:
    values = np.array([1, 2, 2047, 2048, 2049, 4095, 4096, 10**6, 3_600_000_000], dtype=np.int64)
    buckets = bucket_of(values)
    assert list(buckets[:3]) == [1, 2, 2047]
    assert all(np.diff(bucket_of(np.arange(1, 100_000, dtype=np.int64))) >= 0)
    for value, bucket in zip(values, buckets, strict=True):
        high = bucket_high(int(bucket))
        assert value <= high <= value * 1.001 + 1


def test_percentiles_match_the_exact_ones_and_merging_is_exact() -> None:
    rng = np.random.default_rng(3)
    values = rng.lognormal(mean=7, sigma=1.2, size=20_000).astype(np.int64) + 1
    hist = Histogram.of(values)
    for p in (50.0, 90.0, 99.0, 99.9):
        exact = float(np.percentile(values, p, method="inverted_cdf"))
        assert hist.percentile_us(p) == pytest.approx(exact, rel=0.0011)
    assert hist.max_us == values.max() and hist.count == values.size
    assert hist.mean_us() == pytest.approx(values.mean())
    half = values.size // 2
    merged = Histogram.of(values[:half]).merge(Histogram.of(values[half:]))
    assert merged.count == hist.count and merged.total_us == hist.total_us
    assert np.array_equal(merged.buckets, hist.buckets)
    assert np.array_equal(merged.counts, hist.counts)
    weighted = Histogram.of(np.array([5, 9], dtype=np.int64), np.array([3, 1], dtype=np.int64))
    assert (weighted.count, weighted.percentile_us(75), weighted.percentile_us(76)) == (4, 5, 9)
    assert Histogram.empty().percentile_us(99) == 0


# -- thresholds ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "figure", "op", "limit"),
    [
        ("p99_ms<10", "p99_ms", "<", 10.0),
        (" throughput_ops_s >= 20_000 ", "throughput_ops_s", ">=", 20000.0),
        ("rejected_pct<25", "rejected_pct", "<", 25.0),
        ("errors==0", "errors", "==", 0.0),
        ("late_pct!=1.5e1", "late_pct", "!=", 15.0),
    ],
)
def test_thresholds_parse(text: str, figure: str, op: str, limit: float) -> None:
    threshold = parse_threshold(text)
    assert (threshold.figure, threshold.op, threshold.limit) == (figure, op, limit)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("p99_ms", "does not parse"),
        ("p99_ms<<10", "is not a number"),
        ("p99_ms=10", "does not parse"),
        ("<10", "does not parse"),
        ("p99_ms<ten", "is not a number"),
        ("p99_ms<inf", "finite"),
        ("p95_ms<10", "unknown figure 'p95_ms'"),
        ("latency<10", "known: ops, committed"),
        ("p99<10", "did you mean p99_ms"),
    ],
)
def test_bad_thresholds_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(InvalidThreshold, match=message):
        parse_threshold(text)


def test_open_model_figures_need_a_rate() -> None:
    with pytest.raises(InvalidThreshold, match="only with --rate"):
        parse_threshold("late_pct<1", open_model=False)
    parse_threshold("p99_ms<1", open_model=False)
    assert "p99_ms" in FIGURES


# -- the observer --------------------------------------------------------------------------


def test_the_observer_adapts_its_interval_and_keeps_every_count() -> None:
    """A run of unknown length: fine intervals first, merged pairwise as they pile up."""
    metrics = Metrics()
    observer = Observer(metrics, lambda: 3)
    t0 = time.monotonic()
    observer.begin(t0)
    observer.start()
    recorded = 0
    rng = random.Random(1)
    stop_at = t0 + 1.6
    while time.monotonic() < stop_at:
        n = rng.randint(1, 20)
        metrics.record(rng.randint(100, 5000), n, n - 1, {"InsufficientFunds": 1})
        recorded += n
        time.sleep(0.001)
    observer.stop()
    samples = observer.samples()
    assert SAMPLES_MIN <= len(samples) < 2 * SAMPLES_MIN
    assert observer.interval_s > observer_first_interval()
    assert sum(s.ops for s in samples) == recorded == samples[-1].completed
    assert sum(s.latency.count for s in samples) == recorded
    assert sum(s.rejected_total for s in samples) == metrics.totals().rejected_total
    assert observer.latency().count == recorded
    assert all(s.queue_depth == 3 for s in samples)
    assert math.isclose(sum(s.interval_s for s in samples), samples[-1].t_s, rel_tol=1e-6)


def observer_first_interval() -> float:
    from bank.simulate.metrics import ADAPTIVE_START_S

    return ADAPTIVE_START_S


def test_a_known_length_gives_at_least_twenty_intervals_and_a_fixed_one_is_kept() -> None:
    metrics = Metrics()
    observer = Observer(metrics, lambda: 0, expected_s=0.5)
    observer.begin(time.monotonic())
    observer.start()
    time.sleep(0.6)  # a run ends a little after its schedule (its tail)
    observer.stop()
    assert len(observer.samples()) >= SAMPLES_MIN
    fixed = Observer(Metrics(), lambda: 0, interval_s=0.1)
    fixed.begin(time.monotonic())
    fixed.start()
    time.sleep(0.45)
    fixed.stop()
    assert fixed.interval_s == 0.1 and 3 <= len(fixed.samples()) <= 6


def test_metrics_are_safe_from_many_threads() -> None:
    metrics = Metrics()

    def work() -> None:
        for i in range(2000):
            metrics.record([i % 900 + 1, 5], 2, 1, {"X": 1}, errors=1 if i % 2 else 0)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    totals = metrics.totals()
    assert (totals.committed, totals.rejected, totals.errors) == (16000, {"X": 16000}, 8000)
    _, interval = metrics.take_interval()
    assert len(interval.values) == 32000
