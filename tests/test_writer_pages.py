"""How the ledger writer splits a batch into statements: few distinct texts, all within limits."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from bank.ledger.writer import _largest_page, page_sizes
from bank.limits import ROWS_PER_STATEMENT_MAX

LARGEST = st.sampled_from([1 << k for k in range(10)])


@given(rows=st.integers(min_value=0, max_value=20_000), largest=LARGEST)
def test_pages_cover_the_rows_with_powers_of_two(rows: int, largest: int) -> None:
    pages = list(page_sizes(rows, largest))
    assert sum(pages) == rows
    assert all(0 < p <= largest and p & (p - 1) == 0 for p in pages)
    assert pages == sorted(pages, reverse=True)
    # Full pages first, then at most one page of each smaller power of two.
    rest = [p for p in pages if p < largest]
    assert len(rest) == len(set(rest))


@given(batches=st.lists(st.integers(min_value=1, max_value=5_000), min_size=1, max_size=200))
def test_any_mix_of_batch_sizes_needs_few_statement_texts(batches: list[int]) -> None:
    largest = ROWS_PER_STATEMENT_MAX
    texts = {size for n in batches for size in page_sizes(n, largest)}
    # log2(512) + 1 = 10 texts per statement: both statements fit sqlite3's cache of 128.
    assert len(texts) <= largest.bit_length()


def test_pages_fit_the_connections_limit_of_bound_variables() -> None:
    # SQLite before 3.32 allows 999 variables; an 8-column row then pages at 64 rows.
    assert _largest_page(8, 999) == 64
    assert _largest_page(2, 999) == 256
    # Newer SQLite allows 32,766: the engine's own cap applies.
    assert _largest_page(8, 32_766) == ROWS_PER_STATEMENT_MAX
    assert _largest_page(8, 8) == 1
