"""Process-wide settings that a load run (an application, not the library) may choose.

CPython's cyclic garbage collector is the largest hidden cost of a busy engine:
every operation allocates a Future, a receipt and a few tuples, and objects that
live a few milliseconds (in flight) survive into the oldest generation, whose
collections walk every object in the process (SQLAlchemy, pydantic, alembic:
hundreds of thousands). Measured on `submit_many` with 16 threads: 25% of the
run went to full collections. Freezing the start-up objects and collecting the
young generation less often removes almost all of it. The engine itself never
touches the collector; applications opt in (`bank simulate --gc throughput`,
`scripts/bench.py --gc throughput`); by default both run with CPython's collector
as an application has it.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

#: Allocations between young-generation collections during a run (CPython's default is 700).
YOUNG_THRESHOLD = 20_000


@contextmanager
def throughput_gc(*, young_threshold: int = YOUNG_THRESHOLD) -> Iterator[None]:
    """Freeze what exists now out of the collector's way and collect less often; restore after."""
    old = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(young_threshold, old[1], old[2])
    try:
        yield
    finally:
        gc.set_threshold(*old)
        gc.unfreeze()
