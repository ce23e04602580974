"""SQLite's batch writer: one group commit as a few statements on the raw DB-API cursor.

The pipeline (`bank.ledger.pipeline`) calls `begin`, `write`, `commit` on the writer
thread. A batch is a handful of statements whose texts are derived once from the Core
tables: SQLAlchemy's per-statement work (about 7 us each) would be most of a small
commit's Python time. Transfers go in as multi-row INSERT pages and balances as
`UPDATE ... FROM (VALUES ...)` pages, both of power-of-two sizes so that every text
stays in sqlite3's statement cache. Every `POSTINGS_RUN_ROWS` rows, a batch also
writes the postings of the rows above the watermark, before its COMMIT
(`bank.ledger.postings`).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from dataclasses import fields
from itertools import chain
from operator import attrgetter
from typing import Any, Final

from sqlalchemy import Engine

from bank.errors import LedgerCorrupt
from bank.ledger import postings
from bank.ledger.backend import AccountEventRow, WriteBatch
from bank.ledger.models import account_events, accounts, transfers
from bank.limits import ROWS_PER_STATEMENT_MAX
from bank.records import Receipt

log = logging.getLogger(__name__)

#: The INSERT names its columns in `Receipt` field order, so a receipt is its own row.
_RECEIPT_COLUMNS = (
    "seq",
    "kind",
    "key",
    "amount",
    "debit_account_id",
    "credit_account_id",
    "ts_us",
    "hash",
)
#: A receipt's last fields (revision 0006): a batch without holds or groups
#: (`WriteBatch.extended` false) leaves them out (NULL), as it leaves keys out.
_EXTENDED_COLUMNS = ("hold_seq", "expires_us", "link_first", "link_count")
#: A row: its receipt, then its running balances (`WriteBatch.running`, revision 0005).
_ROW_COLUMNS = (*_RECEIPT_COLUMNS, *_EXTENDED_COLUMNS, "debit_balance", "credit_balance")
#: The row of a batch without holds or groups.
_PLAIN_COLUMNS = tuple(c for c in _ROW_COLUMNS if c not in _EXTENDED_COLUMNS)
#: Where the key sits in a row; a batch with no keys leaves the column out (NULL).
_KEY_INDEX = _ROW_COLUMNS.index("key")
#: The INSERT of a batch without keys. sqlite3 looks for an adapter for every None it
#: binds (measured: a quarter of a 512-row page's cost), so those rows bind no key.
_KEYLESS_COLUMNS = tuple(c for c in _ROW_COLUMNS if c != "key")
_KEYLESS_PLAIN_COLUMNS = tuple(c for c in _PLAIN_COLUMNS if c != "key")
#: `AccountEventRow` lists `account_events`' columns in order: a row is its fields.
_EVENT_COLUMNS = tuple(f.name for f in fields(AccountEventRow))
_event_values = attrgetter(*_EVENT_COLUMNS)

#: The writer connection's own settings: (1) a 16 MiB page cache (SQLite's default is
#: 2 MiB; the cache fills only as pages are used) for the pages commits keep touching
#: (accounts, the key index, the end of `transfers`, a postings run), and (2) checkpoints
#: every 10,000 WAL pages instead of 1,000, so that a hot page rewritten by many commits
#: is copied back once per checkpoint, not once per few commits (scripts/pipeline_cost.py,
#: 100 accounts: writer statements 30.6 -> 20.6 us and COMMIT 37.6 -> 13.2 us per
#: operation). Revision 0005's indexes needed 64 MiB; since 0007 dropped them, 16 MiB is
#: as fast (bench.py (s), 3 alternating pairs: 21.5 / 32.1 / 28.7k against 20.9 / 32.2 /
#: 27.6k transfers/s) and 1,000,000 operations grow the RSS by 2.8 MiB, not 56.
WRITER_PRAGMAS: Final = ("cache_size = -16384", "wal_autocheckpoint = 10000")

#: How a group commit starts: the write lock at once (this bank is the file's one
#: writer, so it only ever waits for a reader's checkpoint or a stranger's lock).
BEGIN_WRITE_SQL = "BEGIN IMMEDIATE"

_OPEN_ACCOUNT_SQL = (
    f"INSERT INTO {accounts.name} ({accounts.c.id.name}, {accounts.c.name.name}, "
    f"{accounts.c.overdraft_limit.name}, {accounts.c.balance.name}) VALUES (?, ?, ?, 0)"
)
_ADD_EVENT_SQL = (
    f"INSERT INTO {account_events.name} ({', '.join(_EVENT_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in _EVENT_COLUMNS)})"
)
#: The postings of the rows in (W, head] and W's move (`bank.ledger.postings`).
_FLUSH_SQL = postings.flush_sql("?1", "?2")
_ADVANCE_SQL = postings.advance_sql("?1", "?2")
_HAS_POSTINGS_SQL = (
    "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'postings_upto'"
)
_UPTO_SQL = "SELECT seq FROM postings_upto WHERE id = 1"

_SET_LIMIT_SQL = (
    f"UPDATE {accounts.name} SET {accounts.c.overdraft_limit.name} = ? "
    f"WHERE {accounts.c.id.name} = ?"
)


def bound_variables_max(dbapi_connection: Any) -> int:
    """How many `?` one statement may carry on this connection (999 before SQLite 3.32)."""
    limit: int = dbapi_connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    return limit


def page_sizes(rows: int, largest: int) -> Iterator[int]:
    """Split `rows` into pages whose sizes are powers of two no larger than `largest`.

    Every page size is one statement text; with powers of two there are at most
    log2(largest) + 1 of them per statement, so they all stay in sqlite3's
    statement cache. Sizing pages to fit each batch exactly gave hundreds of texts:
    each missed the cache and was parsed again (600 us for 400 rows).
    """
    while rows:
        size = min(largest, 1 << (rows.bit_length() - 1))
        yield size
        rows -= size


def read_upto(cursor: sqlite3.Cursor, where: str) -> int | None:
    """The watermark W of a ledger with postings (revision 0007), None without them (an
    older revision: its batches write no postings). Read once, when the writer opens: only
    the writer moves W. A `postings_upto` without exactly one row is a damaged ledger."""
    if not cursor.execute(_HAS_POSTINGS_SQL).fetchone()[0]:
        return None
    rows = cursor.execute(_UPTO_SQL).fetchall()
    if len(rows) != 1:
        raise LedgerCorrupt(
            f"{where}: postings_upto has {len(rows)} rows, not one (the watermark): the "
            "ledger was edited; run `bank audit`"
        )
    upto: int = rows[0][0]
    return upto


def largest_page(columns: int, variables_max: int) -> int:
    """The largest power-of-two page of `columns`-wide rows that fits in one statement."""
    fits = min(ROWS_PER_STATEMENT_MAX, variables_max // columns)
    return 1 << (fits.bit_length() - 1)


class SqliteBatchWriter:
    """The writer thread's own pooled connection, driven through its DB-API cursor."""

    def __init__(self, engine: Engine) -> None:
        assert sorted(_ROW_COLUMNS) == sorted(c.name for c in transfers.c), "layout drifted"
        assert tuple(c.name for c in account_events.c) == _EVENT_COLUMNS, "layout drifted"
        self._conn = engine.connect()
        try:
            driver = self._conn.connection.driver_connection
            assert driver is not None, "a live pooled connection has a driver connection"
            self._cursor = driver.cursor()
            variables_max = bound_variables_max(driver)
            for pragma in WRITER_PRAGMAS:
                self._cursor.execute(f"PRAGMA {pragma}")
            self._upto = read_upto(self._cursor, engine.url.database or "the ledger")
        except BaseException:
            self._conn.close()
            raise
        #: W once the open transaction commits (None: this batch writes no postings).
        self._next_upto: int | None = None
        self._insert_page = largest_page(len(_ROW_COLUMNS), variables_max)
        self._update_page = largest_page(2, variables_max)
        # Statement texts by page size, by (keyed, extended).
        self._insert_sql: dict[tuple[bool, bool], dict[int, str]] = {}
        self._update_sql: dict[int, str] = {}

    def begin(self) -> None:
        self._next_upto = None
        self._cursor.execute(BEGIN_WRITE_SQL)

    def write(self, batch: WriteBatch) -> None:
        """Accounts first (this batch's transfers may reference them), then events,
        limits, transfers and the final balances. Events are rare: executemany is fine."""
        cursor = self._cursor
        if batch.new_accounts:
            cursor.executemany(
                _OPEN_ACCOUNT_SQL,
                [(r.account_id, r.name, r.overdraft_limit) for r in batch.new_accounts],
            )
        if batch.events:
            cursor.executemany(_ADD_EVENT_SQL, [_event_values(r) for r in batch.events])
        if batch.limits:
            cursor.executemany(
                _SET_LIMIT_SQL, [(r.overdraft_limit, r.account_id) for r in batch.limits]
            )
        if batch.transfers:
            self._insert_transfers(
                batch.transfers, batch.running, keyed=batch.keyed, extended=batch.extended
            )
        if batch.balances:
            self._update_balances(batch.balances)
        upto = self._upto if self._next_upto is None else self._next_upto
        if batch.transfers and upto is not None:
            head = batch.transfers[-1].seq
            if postings.flush_due(upto, head):
                self._flush(upto, head)

    def _flush(self, upto: int, head: int) -> None:
        """The postings of the rows in (W, head], one sorted INSERT, and W = head: in the
        batch's transaction, so they commit (or not) with it."""
        cursor = self._cursor
        cursor.execute(_FLUSH_SQL, (upto, head))
        cursor.execute(_ADVANCE_SQL, (upto, head))
        if cursor.rowcount != 1:
            raise LedgerCorrupt(
                f"postings_upto is not the watermark {upto} this writer read: the table was "
                "edited under a running bank; nothing of this batch was committed "
                "(run `bank audit`)"
            )
        self._next_upto = head

    def commit(self) -> None:
        self._cursor.execute("COMMIT")
        if self._next_upto is not None:
            self._upto, self._next_upto = self._next_upto, None

    def rollback(self) -> None:
        self._next_upto = None
        try:
            if self._cursor.connection.in_transaction:
                self._cursor.execute("ROLLBACK")
        except Exception:  # the connection is already broken; the failure is reported anyway
            log.warning("rollback failed", exc_info=True)

    def close(self) -> None:
        try:
            self._cursor.close()
        finally:
            self._conn.close()

    def _insert_transfers(
        self,
        rows: list[Receipt],
        running: list[tuple[int, int]],
        *,
        keyed: bool,
        extended: bool,
    ) -> None:
        """Insert rows as multi-row INSERT pages (SQLAlchemy's "insertmanyvalues" technique).

        On SQLite this is about twice as fast as DB-API executemany, which binds,
        steps and releases the GIL once per row; a page does that once per up to
        `ROWS_PER_STATEMENT_MAX` rows. Rows are the receipts themselves, each followed
        by its running balances, flattened in C (no per-row tuples or dicts). Without
        keys in the batch (`keyed` false) the key column is left out, and without holds
        or groups (`extended` false) the four columns of revision 0006.
        """
        cursor = self._cursor
        if extended:
            columns = _ROW_COLUMNS if keyed else _KEYLESS_COLUMNS
        else:
            columns = _PLAIN_COLUMNS if keyed else _KEYLESS_PLAIN_COLUMNS
        texts = self._insert_sql.setdefault((keyed, extended), {})
        width = len(_ROW_COLUMNS) if extended else len(_PLAIN_COLUMNS)
        at = len(_RECEIPT_COLUMNS)
        start = 0
        for size in page_sizes(len(rows), self._insert_page):
            sql = texts.get(size)
            if sql is None:
                row = "(" + ", ".join("?" for _ in columns) + ")"
                sql = f"INSERT INTO {transfers.name} ({', '.join(columns)}) VALUES " + ", ".join(
                    [row] * size
                )
                texts[size] = sql
            stop = start + size
            pairs = zip(rows[start:stop], running[start:stop], strict=True)
            params = list(chain.from_iterable(chain.from_iterable(pairs)))
            if not extended:  # the four 0006 fields (all NULL), one column at a time
                del params[at :: len(_ROW_COLUMNS)]
                del params[at :: len(_ROW_COLUMNS) - 1]
                del params[at :: len(_ROW_COLUMNS) - 2]
                del params[at :: len(_ROW_COLUMNS) - 3]
            if not keyed:
                del params[_KEY_INDEX::width]
            cursor.execute(sql, params)
            start += size

    def _update_balances(self, balances: dict[int, int]) -> None:
        """Write the batch's final balances with one `UPDATE ... FROM (VALUES ...)` per page.

        DB-API executemany would step once per account, and each step releases and
        re-takes the GIL: under load every re-take waits behind other threads.
        """
        cursor = self._cursor
        items = list(balances.items())
        start = 0
        for size in page_sizes(len(items), self._update_page):
            sql = self._update_sql.get(size)
            if sql is None:
                values = ", ".join(["(?, ?)"] * size)
                sql = (
                    f"UPDATE {accounts.name} SET {accounts.c.balance.name} = v.column2 "
                    f"FROM (VALUES {values}) AS v "
                    f"WHERE {accounts.name}.{accounts.c.id.name} = v.column1"
                )
                self._update_sql[size] = sql
            cursor.execute(sql, tuple(chain.from_iterable(items[start : start + size])))
            start += size
