"""The open model keeps a schedule it can keep, and shows it falling behind when it cannot.

Issue 13, item 2, at small scale. The machine is shared and noisy, so the two
open runs are compared with each other and with the closed-loop maximum measured
just before, never with absolute figures.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest

from bank.simulate.runner import SimulationConfig, SimulationResult, run_simulation
from bank.simulate.schedule import Rate

#: The open runs' scheduled length in seconds (their --ops is rate x this).
SCHEDULE_S = 1.0
ATTEMPTS = 3


def _config(db: Path, **options: object) -> SimulationConfig:
    base: dict[str, object] = {
        "db": str(db),
        "tellers": 4,
        "window": 16,
        "workers": 1,
        "accounts": 100,
        "seed": 3,
    }
    base.update(options)
    return SimulationConfig(**base)  # type: ignore[arg-type]


def _open(db: Path, rate: float) -> SimulationResult:
    ops = max(50, int(rate * SCHEDULE_S))
    return run_simulation(_config(db, ops=ops, rate=Rate(rate, rate)))


def _third_lags(result: SimulationResult) -> tuple[float, float]:
    samples = result.samples
    third = max(1, len(samples) // 3)
    first = statistics.mean(s.lag_ms for s in samples[:third])
    last = statistics.mean(s.lag_ms for s in samples[-third:])
    return first, last


@pytest.mark.timeout(180)
def test_half_the_maximum_is_met_and_one_and_a_half_falls_behind(tmp_path: Path) -> None:
    for attempt in range(ATTEMPTS):
        closed = run_simulation(_config(tmp_path / f"closed-{attempt}.db", ops=3000))
        assert closed.ok and closed.schedule is None
        maximum = closed.throughput_ops_s
        half = _open(tmp_path / f"half-{attempt}.db", 0.5 * maximum)
        # Half the maximum: the schedule is met (the run lasts about as long as its
        # schedule). A slow spell of the shared machine right after the closed run can
        # make it miss: measure both again.
        assert half.schedule is not None
        if half.throughput_ops_s >= 0.75 * 0.5 * maximum and half.schedule.late_pct < 50:
            break
    else:
        pytest.fail(f"{ATTEMPTS} runs at half the measured maximum all fell behind")
    for attempt in range(ATTEMPTS):
        over = _open(tmp_path / f"over-{attempt}.db", 1.5 * maximum)
        # A noisy closed run can understate the maximum: then 150% of it is not over.
        if over.throughput_ops_s < 0.9 * 1.5 * maximum:
            break
        maximum = max(maximum, over.throughput_ops_s)
    else:
        pytest.fail(f"{ATTEMPTS} runs at 150% of the measured maximum all kept up")
    assert half.ok and over.ok
    h, o = half.schedule, over.schedule
    assert h is not None and o is not None
    # Every operation of a --ops run is sent, however late: nothing is dropped.
    assert (h.dropped, o.dropped) == (0, 0)
    assert h.submitted == half.ops == h.due and o.submitted == over.ops == o.due
    assert half.duration_s < 1.5 * SCHEDULE_S + 0.5
    # 150%: the engine falls behind; most operations go out late, the lag grows
    # through the run, and latency (from the intended start) grows with it.
    assert over.duration_s > half.duration_s
    assert o.late_pct > 50 and o.late_pct > h.late_pct + 20
    first, last = _third_lags(over)
    assert last > 2 * first + 5
    assert o.lag_max_ms > 2 * h.lag_max_ms
    assert over.latency.p50 > 3 * half.latency.p50
    assert over.latency.p99 > half.latency.p99
    # Coordinated omission: measured from the submit, the 150% run would look fine.
    assert over.latency.p50 > 2 * o.service.p50
    assert over.samples[-1].p50_ms > over.samples[0].p50_ms
