"""The PostgreSQL batch writer: one statement per batch of transfers, one array per column.

Measured (scripts/pg_writer_cost.py, scripts/bench.py (h)): `WITH ins AS (INSERT INTO
transfers ... SELECT * FROM unnest(...)) UPDATE accounts ... FROM unnest(...)`,
prepared once, writes a batch in one round trip and one plan, far ahead of
executemany or multi-row VALUES pages (planned per page size). The arrays of the
hot statement travel as text literals built by `str.join` in C (1.8 us of client
CPU per row), not as psycopg's binary lists, which dump element by element in
Python (7.1 us per row): the writer thread is the bank's one serial stage. BEGIN,
the lease check and the statements of a batch travel in one pipeline (one round
trip), COMMIT in another. Account events are rare and bind binary arrays. Every
`POSTINGS_RUN_ROWS` rows, the batch's pipeline also carries the statement that writes
the postings of the rows above the watermark and moves it (`bank.ledger.postings`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from itertools import islice
from typing import Any

import psycopg
from psycopg.types.numeric import Int8BinaryDumper
from sqlalchemy import Column, Engine, Table
from sqlalchemy.dialects import postgresql

from bank.errors import LedgerCorrupt, LedgerUnavailable
from bank.ledger import postings
from bank.ledger.backend import AccountEventRow, WriteBatch
from bank.ledger.models import account_events, accounts, transfers
from bank.ledger.postgres.lease import FENCE_KEY, LEASE_KEY, Lease, key_match_sql
from bank.records import Receipt

log = logging.getLogger(__name__)

_DIALECT = postgresql.dialect()  # type: ignore[no-untyped-call]

#: `Receipt` fields in order, as `transfers` columns: a receipt is its own row...
RECEIPT_COLUMNS = tuple(
    {"debit_account": "debit_account_id", "credit_account": "credit_account_id"}.get(f, f)
    for f in Receipt._fields
)
#: ... followed by its running balances (`WriteBatch.running`, revision 0005).
RUNNING_COLUMNS = ("debit_balance", "credit_balance")
ROW_COLUMNS = (*RECEIPT_COLUMNS, *RUNNING_COLUMNS)
#: The columns of revision 0006, last in a receipt: left out (NULL) of a batch without
#: holds or groups (`WriteBatch.extended` false).
EXTENDED_COLUMNS = ("hold_seq", "expires_us", "link_first", "link_count")
assert RECEIPT_COLUMNS[-len(EXTENDED_COLUMNS) :] == EXTENDED_COLUMNS, "Receipt drifted"
_PLAIN = len(RECEIPT_COLUMNS) - len(EXTENDED_COLUMNS)
assert sorted(ROW_COLUMNS) == sorted(c.name for c in transfers.c), "Receipt and model drifted"
_KEY_INDEX = ROW_COLUMNS.index("key")
#: `AccountEventRow` fields are `account_events` columns, in order.
EVENT_COLUMNS = tuple(AccountEventRow.__dataclass_fields__)
assert sorted(EVENT_COLUMNS) == sorted(c.name for c in account_events.c), "events drifted"
#: A new account's row, from its 'open' event.
ACCOUNT_COLUMNS = ("id", "name", "overdraft_limit", "balance")
assert sorted(ACCOUNT_COLUMNS) == sorted(c.name for c in accounts.c), "accounts drifted"


def _array(column: Column[Any], placeholder: str = "%b") -> str:
    """An array parameter cast to the column's own type (from the model)."""
    return f"{placeholder}::{column.type.compile(dialect=_DIALECT)}[]"


def unnest_insert(table: Table, columns: tuple[str, ...], placeholder: str = "%b") -> str:
    """`INSERT INTO table (columns) SELECT * FROM unnest(one array per column)`."""
    arrays = ", ".join(_array(table.c[name], placeholder) for name in columns)
    return f"INSERT INTO {table.name} ({', '.join(columns)}) SELECT * FROM unnest({arrays})"


def unnest_update(table: Table, key: str, column: str, placeholder: str = "%b") -> str:
    """`UPDATE table SET column = u.column FROM unnest(keys, values) WHERE key = u.key`."""
    keys, values = _array(table.c[key], placeholder), _array(table.c[column], placeholder)
    return (
        f"UPDATE {table.name} SET {column} = u.{column} "
        f"FROM unnest({keys}, {values}) AS u({key}, {column}) "
        f"WHERE {table.name}.{key} = u.{key}"
    )


def batch_sql(columns: tuple[str, ...]) -> str:
    """The one statement of a batch: insert its transfers, write its final balances
    (every array a text literal, see `_literal`)."""
    return (
        f"WITH ins AS ({unnest_insert(transfers, columns, '%s')}) "
        f"{unnest_update(accounts, accounts.c.id.name, accounts.c.balance.name, '%s')}"
    )


def _ints(values: Any) -> str:
    """An array literal of ints: `{1,2,3}` (`str` of an int is its exact decimal)."""
    return "{" + ",".join(map(str, values)) + "}"


def _words(values: Any) -> str:
    """An array literal of texts that need no quoting (kinds, hex hashes: [a-z0-9])."""
    return "{" + ",".join(values) + "}"


def _quoted(value: str | None) -> str:
    if value is None:
        return "NULL"
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _nullable_ints(values: Any) -> str:
    """An array literal of ints and NULLs (the 0006 columns)."""
    return "{" + ",".join("NULL" if v is None else str(v) for v in values) + "}"


def _texts(values: Any) -> str:
    """An array literal of any texts (keys): each quoted, backslash and quote escaped;
    None is NULL."""
    return "{" + ",".join(map(_quoted, values)) + "}"


#: How each transfers column becomes an array literal.
_LITERAL = {"kind": _words, "hash": _words, "key": _texts} | dict.fromkeys(
    EXTENDED_COLUMNS, _nullable_ints
)


def _transfers_sql(keyed: bool, extended: bool) -> str:
    columns = ROW_COLUMNS if extended else (*RECEIPT_COLUMNS[:_PLAIN], *RUNNING_COLUMNS)
    return batch_sql(columns if keyed else tuple(c for c in columns if c != "key"))


#: By (keyed, extended): batches without keys leave the key column out (NULL), no text[]
#: of NULLs to bind; batches without holds or groups leave the 0006 columns out.
TRANSFERS_SQLS = {(k, e): _transfers_sql(k, e) for k in (False, True) for e in (False, True)}
TRANSFERS_SQL = TRANSFERS_SQLS[True, False]
KEYLESS_TRANSFERS_SQL = TRANSFERS_SQLS[False, False]
BALANCES_SQL = unnest_update(accounts, accounts.c.id.name, accounts.c.balance.name)
ACCOUNTS_SQL = unnest_insert(accounts, ACCOUNT_COLUMNS)
EVENTS_SQL = unnest_insert(account_events, EVENT_COLUMNS)
LIMITS_SQL = unnest_update(accounts, accounts.c.id.name, accounts.c.overdraft_limit.name)
#: The postings of the rows in (W, head] and W's move, one statement (the INSERT as a
#: data-modifying CTE: it runs whether or not the UPDATE reads it). The UPDATE changes
#: one row only if W is what the writer read (`bank.ledger.postings`).
FLUSH_SQL = (
    f"WITH flushed AS ({postings.flush_sql('%(upto)b', '%(head)b')}) "
    f"{postings.advance_sql('%(upto)b', '%(head)b')}"
)
#: Whether the ledger has postings (revision 0007; on the session's search path), and W.
HAS_POSTINGS_SQL = "SELECT to_regclass('postings_upto') IS NOT NULL"
UPTO_SQL = "SELECT seq FROM postings_upto WHERE id = 1"

#: The lease check: keeps a new holder's fence waiting until this transaction ends,
#: and is false unless the lease session (its pid bound) still holds the lease.
FENCE_SQL = (
    "SELECT pg_advisory_xact_lock_shared(%b), EXISTS (SELECT 1 FROM pg_locks l "
    f"WHERE {key_match_sql(LEASE_KEY)} AND l.pid = %b)"
)


class PostgresBatchWriter:
    """The writer thread's connection (a `BatchWriter`), borrowed from the engine's pool.

    `lease`: when given, every batch checks (same round trip) that it still holds
    the writer lease, so a writer that lost it cannot commit after a new one reads.
    """

    def __init__(self, engine: Engine, lease: Lease | None, where: str) -> None:
        self._where = where
        self._lease = lease
        self._raw = engine.raw_connection()
        conn: psycopg.Connection[Any] = self._raw.driver_connection  # type: ignore[assignment]
        conn.autocommit = True  # BEGIN and COMMIT are sent explicitly, pipelined
        self._conn = conn
        self._cur = conn.cursor()
        self._fence = conn.cursor()
        self._flush = conn.cursor()
        for cursor in (self._cur, self._fence, self._flush):
            # Every int as int8 (binary): one statement type per text, no int2/int4 guesses.
            cursor.adapters.register_dumper(int, Int8BinaryDumper)
        self._begun = False
        self._pid = os.getpid()  # a forked child must not speak on the parent's session
        try:
            self._upto = self._read_upto()
        except BaseException:
            self.close()
            raise
        #: W once the open transaction commits (None: this batch writes no postings).
        self._next_upto: int | None = None

    def _read_upto(self) -> int | None:
        """The watermark W (None: no postings, an older revision), read once at open: only
        the writer moves it. A `postings_upto` without exactly one row is damage."""
        row = self._cur.execute(HAS_POSTINGS_SQL).fetchone()
        if row is None or not row[0]:
            return None
        rows = self._cur.execute(UPTO_SQL).fetchall()
        if len(rows) != 1:
            raise LedgerCorrupt(
                f"{self._where}: postings_upto has {len(rows)} rows, not one (the watermark): "
                "the ledger was edited; run `bank audit`"
            )
        upto: int = rows[0][0]
        return upto

    def begin(self) -> None:
        """Start a transaction (sent with the batch's first statements, in one round trip)."""
        assert not self._begun, "begin twice"
        self._begun = True
        self._next_upto = None

    def write(self, batch: WriteBatch) -> None:
        """Send the batch's statements (and BEGIN, and the lease check) in one pipeline."""
        assert self._begun, "write outside a transaction"
        upto = self._upto if self._next_upto is None else self._next_upto
        head = batch.transfers[-1].seq if batch.transfers else None
        flush = upto is not None and head is not None and postings.flush_due(upto, head)
        try:
            self._send(batch, (upto, head) if flush else None)
        except psycopg.Error:
            self._check_lease()  # a writer without the lease: that is the news, not the rows
            raise
        self._check_lease()
        if flush:
            if self._flush.rowcount != 1:
                raise LedgerCorrupt(
                    f"{self._where}: postings_upto is not the watermark {upto} this writer "
                    "read: the table was edited under a running bank; nothing of this batch "
                    "was committed (run `bank audit`)"
                )
            self._next_upto = head

    def _send(self, batch: WriteBatch, flush: tuple[int | None, int | None] | None) -> None:
        cur = self._cur
        with self._conn.pipeline():
            if self._conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
                cur.execute("BEGIN")
            if self._lease is not None:
                self._fence.execute(FENCE_SQL, (FENCE_KEY, self._lease.backend_pid), prepare=True)
            if batch.new_accounts:
                rows = batch.new_accounts
                cur.execute(
                    ACCOUNTS_SQL,
                    (
                        [r.account_id for r in rows],
                        [r.name for r in rows],
                        [r.overdraft_limit for r in rows],
                        [0] * len(rows),
                    ),
                    prepare=True,
                )
            if batch.events:
                events = batch.events
                cur.execute(
                    EVENTS_SQL,
                    [[getattr(r, c) for r in events] for c in EVENT_COLUMNS],
                    prepare=True,
                )
            if batch.limits:
                cur.execute(
                    LIMITS_SQL,
                    (
                        [r.account_id for r in batch.limits],
                        [r.overdraft_limit for r in batch.limits],
                    ),
                    prepare=True,
                )
            if batch.transfers:
                columns: Iterator[tuple[Any, ...]] = zip(*batch.transfers, strict=True)
                if not batch.extended:
                    columns = islice(columns, _PLAIN)
                literals = [
                    _LITERAL.get(name, _ints)(values)
                    for name, values in zip(RECEIPT_COLUMNS, columns, strict=False)
                ]
                literals += map(_ints, zip(*batch.running, strict=True))
                if not batch.keyed:
                    del literals[_KEY_INDEX]
                literals += (_ints(batch.balances.keys()), _ints(batch.balances.values()))
                sql = TRANSFERS_SQLS[batch.keyed, batch.extended]
                cur.execute(sql, literals, prepare=True)
            elif batch.balances:
                balances = ([*batch.balances.keys()], [*batch.balances.values()])
                cur.execute(BALANCES_SQL, balances, prepare=True)
            if flush is not None:
                upto, head = flush
                self._flush.execute(FLUSH_SQL, {"upto": upto, "head": head}, prepare=True)

    def _check_lease(self) -> None:
        if self._lease is not None:
            try:
                row = self._fence.fetchone()
            except psycopg.Error:
                return  # the check itself did not run: the statement's error stands
            if row is None or not row[1]:
                lost = self._lease.lost() or "its session no longer holds the lock"
                raise LedgerUnavailable(
                    f"{self._where}: this bank no longer holds the writer lease ({lost}); "
                    "nothing of this batch was committed"
                )

    def commit(self) -> None:
        """Commit the batch (durable per the engine's `synchronous_commit`)."""
        self._begun = False
        if self._conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            self._cur.execute("COMMIT")
        if self._next_upto is not None:
            self._upto, self._next_upto = self._next_upto, None

    def rollback(self) -> None:
        """Roll back whatever is open; never raises."""
        self._begun = False
        self._next_upto = None
        if self._pid != os.getpid():
            return
        try:
            if self._conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                self._cur.execute("ROLLBACK")
        except Exception:  # the connection is already broken; the failure is reported anyway
            log.warning("rollback failed", exc_info=True)

    def close(self) -> None:
        """Give the connection back to the pool (or drop it if it broke); never raises.
        In a forked child it does nothing: the session is the parent's."""
        if self._pid != os.getpid():
            return
        try:
            if self._conn.closed or self._conn.broken:
                self._raw.invalidate()
            else:
                self.rollback()
                self._conn.autocommit = False
            with contextlib.suppress(psycopg.Error):
                self._cur.close()
                self._fence.close()
                self._flush.close()
            self._raw.close()
        except Exception:
            log.warning("closing the writer's connection failed", exc_info=True)
