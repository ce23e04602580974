"""How the ledger writer splits a batch into statements (few texts, within limits), and what it writes."""

from __future__ import annotations

import sqlite3
from concurrent.futures import Future
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bank import Bank
from bank.idempotency import KeyClaims
from bank.ledger import store
from bank.ledger.audit import audit_ledger
from bank.ledger.sqlite import create_ledger_engine, ledger_url
from bank.ledger.sqlite.writer import SqliteBatchWriter, page_sizes
from bank.ledger.sqlite.writer import largest_page as _largest_page
from bank.ledger.writer import LedgerWriter
from bank.limits import CASH_ACCOUNT_ID, ROWS_PER_STATEMENT_MAX
from bank.records import Receipt

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
    # log2(512) + 1 = 10 texts per statement: the INSERT with and without the key
    # column and the UPDATE, 30 texts in all, fit sqlite3's cache of 128.
    assert len(texts) <= largest.bit_length()


def test_pages_fit_the_connections_limit_of_bound_variables() -> None:
    # SQLite before 3.32 allows 999 variables; an 8-column row then pages at 64 rows.
    assert _largest_page(8, 999) == 64
    assert _largest_page(2, 999) == 256
    # Newer SQLite allows 32,766: the engine's own cap applies.
    assert _largest_page(8, 32_766) == ROWS_PER_STATEMENT_MAX
    assert _largest_page(8, 8) == 1


# -- one batch, written for real ----------------------------------------------------

#: Key patterns of one batch: none keyed (the key column is left out), all keyed,
#: and mixes, at sizes that cross the 512-row page.
KEY_PATTERNS: dict[str, list[str | None]] = {
    "none-1": [None],
    "none-600": [None] * 600,
    "all-600": [f"k{i}" for i in range(600)],
    "alternate-600": [f"k{i}" if i % 2 else None for i in range(600)],
    "only-last-of-513": [None] * 512 + ["last"],
}


def write_one_batch(path: Path, keys: list[str | None]) -> list[Receipt]:
    """Stage deposits into a new account before the writer starts, so they commit as one batch."""
    with Bank.open(path) as b:
        account = b.open_account("batch").id
    engine = create_ledger_engine(ledger_url(path))
    try:
        with engine.connect() as conn:
            seq, head, event_seq, event_head = store.chain_heads(conn)
        writer = LedgerWriter(
            lambda: SqliteBatchWriter(engine),
            KeyClaims(),
            seq=seq,
            head_hash=head,
            event_seq=event_seq,
            event_head_hash=event_head,
        )
        futures: list[Future[Receipt]] = []
        for i, key in enumerate(keys, start=1):
            future: Future[Receipt] = Future()
            future.set_running_or_notify_cancel()
            writer.stage_transfer("deposit", CASH_ACCOUNT_ID, account, 1, key, future, -i, i)
            futures.append(future)
        writer.start()
        try:
            receipts = [f.result(timeout=30) for f in futures]
        finally:
            writer.stop()
            writer.join(30)
        assert not writer.is_alive(), "watchdog: the writer did not stop"
        assert writer.stats().commits == 1, "the test meant to write a single batch"
    finally:
        engine.dispose()
    return receipts


@pytest.mark.parametrize("pattern", sorted(KEY_PATTERNS))
def test_a_batch_writes_every_row_as_its_receipt_says(ledger_path: Path, pattern: str) -> None:
    keys = KEY_PATTERNS[pattern]
    receipts = write_one_batch(ledger_path, keys)
    assert [r.key for r in receipts] == keys
    with sqlite3.connect(ledger_path) as db:
        rows = db.execute(
            "SELECT seq, kind, key, amount, debit_account_id, credit_account_id, ts_us, hash "
            "FROM transfers WHERE seq >= ? ORDER BY seq",
            (receipts[0].seq,),
        ).fetchall()
    assert rows == [tuple(r[:8]) for r in receipts]  # (the 0006 fields: None, NULL)
    assert audit_ledger(ledger_path).ok
    with Bank.open(ledger_path) as b:
        assert b.balance(receipts[0].credit_account) == len(keys)
        for receipt in receipts:
            if receipt.key is not None:
                assert b.find(receipt.key) == receipt
