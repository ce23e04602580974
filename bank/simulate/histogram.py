"""Latency histograms that cost a list append per batch while the run goes, numpy when shown.

Latencies are whole microseconds. While a run goes they are only appended to
flat arrays; the observer folds each interval's arrays into a sparse
log-linear histogram once per interval (vectorised), and percentiles are read
from those histograms only when something is shown. Buckets follow
HdrHistogram's layout with 3 significant digits: exact below 2,048 us, then
1,024 buckets per power of two, so a percentile is within 0.1% of the true
value (it is reported as the bucket's highest value, never above the exact
maximum). numpy is imported when the first histogram is built, so importing the
runner does not need it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy.typing as npt

    Ints = npt.NDArray[Any]
else:
    Ints = Any

#: Latencies above an hour are clamped to it.
LATENCY_US_MAX = 3_600_000_000
_EXACT = 2048
_HALF = 1024
_EXACT_BITS = 11


def bucket_of(values: Ints) -> Ints:
    """The bucket index of each latency (microseconds, clamped to 1 .. LATENCY_US_MAX)."""
    import numpy as np

    v = np.clip(values, 1, LATENCY_US_MAX).astype(np.int64)
    _, bits = np.frexp(v.astype(np.float64))  # bits == v.bit_length() (exact below 2**53)
    shift = np.maximum(bits.astype(np.int64) - _EXACT_BITS, 0)
    high = _EXACT + (shift - 1) * _HALF + ((v >> shift) - _HALF)
    return np.where(shift == 0, v, high).astype(np.int64)


def bucket_high(index: int) -> int:
    """The highest latency (us) that falls in bucket `index`."""
    if index < _EXACT:
        return index
    shift, offset = divmod(index - _EXACT, _HALF)
    shift += 1
    return ((offset + _HALF + 1) << shift) - 1


@dataclass(frozen=True, slots=True)
class Histogram:
    """A sparse histogram: sorted bucket indexes with their counts, plus exact count/sum/max."""

    buckets: Ints
    counts: Ints
    count: int
    total_us: int
    max_us: int

    @classmethod
    def empty(cls) -> Histogram:
        """A histogram of nothing."""
        import numpy as np

        nothing = np.zeros(0, dtype=np.int64)
        return cls(nothing, nothing, 0, 0, 0)

    @classmethod
    def of(cls, values: Ints, weights: Ints | None = None) -> Histogram:
        """The histogram of `values` (us), each counted `weights[i]` times (default once)."""
        import numpy as np

        if values.size == 0:
            return cls.empty()
        clamped = np.clip(values, 1, LATENCY_US_MAX).astype(np.int64)
        w = np.ones_like(clamped) if weights is None else weights.astype(np.int64)
        buckets, inverse = np.unique(bucket_of(clamped), return_inverse=True)
        counts = np.bincount(inverse.ravel(), weights=w, minlength=buckets.size)
        return cls(
            buckets,
            counts.astype(np.int64),
            int(w.sum()),
            int((clamped * w).sum()),
            int(clamped.max()),
        )

    def merge(self, other: Histogram) -> Histogram:
        """Both histograms in one."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        import numpy as np

        buckets, inverse = np.unique(
            np.concatenate([self.buckets, other.buckets]), return_inverse=True
        )
        counts = np.bincount(
            inverse.ravel(),
            weights=np.concatenate([self.counts, other.counts]),
            minlength=buckets.size,
        )
        return Histogram(
            buckets,
            counts.astype(np.int64),
            self.count + other.count,
            self.total_us + other.total_us,
            max(self.max_us, other.max_us),
        )

    def percentile_us(self, percent: float) -> int:
        """The latency (us) that `percent` % of the recorded ones are at or below (0 if empty)."""
        if self.count == 0:
            return 0
        import numpy as np

        rank = max(1, int(np.ceil(percent / 100.0 * self.count)))
        position = int(np.searchsorted(np.cumsum(self.counts), rank))
        position = min(position, self.buckets.size - 1)
        return min(bucket_high(int(self.buckets[position])), self.max_us)

    def mean_us(self) -> float:
        """The exact mean latency (us), 0.0 if empty."""
        return self.total_us / self.count if self.count else 0.0
