"""Load simulation on the embedded API: workloads, teller threads, metrics and reports."""

from bank.simulate.workload import (
    InvalidWorkload,
    Mix,
    Skew,
    TellerStream,
    WorkloadSpec,
    parse_mix,
    parse_skew,
)

__all__ = [
    "InvalidWorkload",
    "Mix",
    "Skew",
    "TellerStream",
    "WorkloadSpec",
    "parse_mix",
    "parse_skew",
]
