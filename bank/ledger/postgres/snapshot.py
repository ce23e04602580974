"""The audit's read-only snapshot of a PostgreSQL ledger.

One `REPEATABLE READ READ ONLY` transaction: every query sees the same snapshot, the
server refuses any write in it, and nothing locks the bank's writer out. Rows stream
through server-side (named) cursors, a batch of `ITERSIZE` rows at a time, so the
audit's memory stays flat however long the ledger. Worker processes of the audit's
fast path read the very same snapshot: `pg_export_snapshot()` here, `SET TRANSACTION
SNAPSHOT` in each worker.

Columns are typed, so no value can have another type than its column's; what can
differ is the catalog's column type itself (`type_problems` compares it with what
the audit expects). The full catalog comparison (indexes, views, triggers) is
`bank.ledger.postgres.schema`'s, through `bank.ledger.schema_ref`.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager, suppress
from itertools import chain
from typing import Any, Final, Protocol

import psycopg
from psycopg import sql
from sqlalchemy.engine import URL

from bank.errors import CannotAudit, CannotOpenLedger
from bank.ledger.audit_checks import COLUMN_TYPES
from bank.ledger.audit_postings import (
    FingerprintKeys,
    PostingsDifferences,
    PostingsSums,
    extra_sql,
    lost_sql,
    postings_sums,
)
from bank.ledger.backend import SnapshotToken
from bank.ledger.schema_ref import (
    Difference,
    Schema,
    compare_schema,
    matching_revisions,
    read_schema,
    reference_schemas,
)

#: Rows per round trip of a server-side cursor.
ITERSIZE: Final = 20_000
_LEDGER_TABLES: Final = frozenset({"accounts", "transfers", "account_events"})
_TRANSFER_COLUMNS: Final = (
    "seq, key, kind, debit_account_id, credit_account_id, amount, ts_us, hash"
)
#: The running balances (revision 0005), read as NULL from a ledger that lacks them.
RUNNING_COLUMNS: Final = ("debit_balance", "credit_balance")
#: Then the holds' and groups' columns (revision 0006), NULL from a ledger that lacks them.
HOLD_COLUMNS: Final = ("hold_seq", "expires_us", "link_first", "link_count")
#: Catalog types (`information_schema.columns.data_type`) that hold what the audit's
#: column types (`COLUMN_TYPES`) name.
_CATALOG_TYPES: Final = {
    "integer": frozenset({"bigint", "integer", "smallint"}),
    "text": frozenset({"text", "character varying"}),
}
_log = logging.getLogger(__name__)

#: PostgreSQL does not pull up a subquery with an OFFSET into the aggregate
#: (which would compute each fingerprint line twice); nor does it run it with parallel
#: workers, which would compete with the audit's own.
_POSTINGS_FENCE: Final = " OFFSET 0"


class _Located(Protocol):
    """What the snapshot needs of a backend: the SQLAlchemy URL of the ledger."""

    @property
    def url(self) -> URL: ...


def conninfo(url: URL) -> str:
    """The libpq connection string of an SQLAlchemy `postgresql+psycopg://` URL."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def _reason(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _connect(info: str) -> psycopg.Connection[Any]:
    """A connection whose first statement starts a REPEATABLE READ READ ONLY transaction."""
    conn = psycopg.connect(info, autocommit=False, application_name="bank audit")
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    conn.read_only = True
    return conn


class _Rows:
    """Streaming reads on one connection (each query a server-side cursor of its own)."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn
        self._cursors = 0

    def stream(self, query: str, params: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
        """Rows of `query`, fetched `ITERSIZE` at a time and handed on by C-level
        iterators: iterating the cursor itself costs a Python call per row (~170 ns, a
        sixth of the audit's per-row time on this backend)."""
        return chain.from_iterable(self._batches(query, params))

    def _batches(self, query: str, params: tuple[Any, ...]) -> Iterator[list[tuple[Any, ...]]]:
        self._cursors += 1
        cur = self._conn.cursor(name=f"bank_audit_{self._cursors}", binary=True)
        try:
            cur.execute(query, params)
            while batch := cur.fetchmany(ITERSIZE):
                yield batch
        finally:
            cur.close()

    def one(self, query: str, params: tuple[Any, ...] = ()) -> tuple[Any, ...] | None:
        return self._conn.execute(query, params).fetchone()

    def hash_before(self, seq: int) -> object:
        row = self.one(
            "SELECT hash FROM transfers WHERE seq < %s ORDER BY seq DESC LIMIT 1", (seq,)
        )
        return None if row is None else row[0]

    def transfer_rows(
        self, first_seq: int | None = None, last_seq: int | None = None
    ) -> Iterator[tuple[Any, ...]]:
        where: list[str] = []
        params: list[int] = []
        if first_seq is not None:
            where.append("seq >= %s")
            params.append(first_seq)
        if last_seq is not None:
            where.append("seq <= %s")
            params.append(last_seq)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        columns = _TRANSFER_COLUMNS + self._running_sql()
        return self.stream(f"SELECT {columns} FROM transfers{clause} ORDER BY seq", tuple(params))

    def _running_sql(self) -> str:
        """`, debit_balance, credit_balance` as the table has them (NULL for a missing one)."""
        have = {
            str(r[0])
            for r in self._conn.execute(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND table_name = 'transfers'"
            )
        }
        return "".join(
            f", {c}" if c in have else ", NULL" for c in (*RUNNING_COLUMNS, *HOLD_COLUMNS)
        )


class PostgresSnapshot(_Rows):
    """`bank.ledger.backend.LedgerSnapshot` over one REPEATABLE READ READ ONLY transaction."""

    def __init__(self, conn: psycopg.Connection[Any], where: str, info: str, url: URL) -> None:
        super().__init__(conn)
        self.where = where
        self._info = info
        self._url = url
        # The first query takes the snapshot; export it for the workers.
        row = self.one("SELECT pg_export_snapshot()")
        assert row is not None
        self._snapshot_id = str(row[0])
        self._tables = {
            str(r[0])
            for r in conn.execute(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'"
            )
        }
        self.pinned_max_seq = 0
        if "transfers" in self._tables:
            top = self.one("SELECT max(seq) FROM transfers")
            self.pinned_max_seq = int(top[0]) if top is not None and top[0] is not None else 0

    def tables(self) -> set[str]:
        return set(self._tables)

    def _catalog_columns(self, table: str) -> dict[str, tuple[str, bool]]:
        rows = self._conn.execute(
            "SELECT column_name, data_type, is_nullable = 'YES' FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = %s ORDER BY ordinal_position",
            (table,),
        )
        return {str(name): (str(kind), bool(nullable)) for name, kind, nullable in rows}

    def columns(self, table: str) -> set[str]:
        return set(self._catalog_columns(table))

    def revision_rows(self) -> list[object]:
        tables = self._tables
        if "alembic_version" not in tables:
            if not tables:
                raise CannotAudit(f"{self.where}: an empty PostgreSQL database, not a ledger")
            if tables & _LEDGER_TABLES:
                raise CannotAudit(
                    f"{self.where}: has ledger tables but no schema revision (alembic_version)"
                )
            listed = ", ".join(sorted(tables)[:5])
            raise CannotAudit(
                f"{self.where}: a PostgreSQL database of another program (tables: {listed})"
            )
        return [r[0] for r in self._conn.execute("SELECT version_num FROM alembic_version")]

    def revision(self) -> str | None:
        rows = self.revision_rows()
        return str(rows[0]) if len(rows) == 1 else None

    def schema_differences(self, revision: str) -> list[Any]:
        return _catalog_differences(self._conn, self._url, revision)

    def matching_revisions(self) -> list[str]:
        return _catalog_matching_revisions(self._conn, self._url)

    def integrity_problems(self) -> list[str]:
        # No index text can disagree with its contents here (PostgreSQL has no
        # writable_schema); a damaged relation fails the reads themselves.
        return []

    def type_problems(
        self, skip: Collection[str] = ()
    ) -> Iterator[tuple[str, str, object, str, object]]:
        """Each audited column whose catalog type cannot hold only what the audit expects
        (a NUMERIC amount, a nullable seq, ...), as one `bad_type` without a row."""
        for table, columns in COLUMN_TYPES.items():
            if table not in self._tables or table in skip:
                continue
            catalog = self._catalog_columns(table)
            for column, allowed in columns.items():
                if column not in catalog:
                    continue  # a missing column is the schema check's
                data_type, nullable = catalog[column]
                ok_types = frozenset().union(*(_CATALOG_TYPES.get(a, ()) for a in allowed))
                if data_type not in ok_types or (nullable and "null" not in allowed):
                    shown = f"a {'nullable ' if nullable else ''}{data_type} column"
                    yield table, column, None, shown, None

    def account_event_rows(self) -> Iterator[tuple[Any, ...]]:
        return self.stream(
            "SELECT seq, account_id, kind, name, overdraft_limit, transfer_seq, ts_us, hash "
            "FROM account_events ORDER BY seq"
        )

    def limit_event_rows(self) -> Iterator[tuple[Any, ...]]:
        return self.stream(
            "SELECT transfer_seq, account_id, kind, overdraft_limit FROM account_events "
            "ORDER BY transfer_seq, seq"
        )

    def account_rows(self) -> Iterator[tuple[Any, ...]]:
        return self.stream("SELECT id, name, overdraft_limit, balance FROM accounts ORDER BY id")

    def chain_format_rows(self) -> Iterator[tuple[Any, ...]]:
        return self.stream(
            "SELECT chain, first_seq, version FROM chain_formats ORDER BY chain, first_seq"
        )

    def key_rows(self) -> Iterator[tuple[Any, ...]]:
        # COLLATE "C": the order the audit compares neighbours in must put equal keys
        # next to each other byte for byte, whatever the database's collation.
        return self.stream(
            'SELECT key, seq FROM transfers WHERE key IS NOT NULL ORDER BY key COLLATE "C", seq'
        )

    def hash_at(self, table: str, seq: int) -> object:
        assert table in ("transfers", "account_events"), table
        row = self.one(
            sql.SQL("SELECT hash FROM {} WHERE seq = %s")
            .format(sql.Identifier(table))
            .as_string(self._conn),
            (seq,),
        )
        return None if row is None else row[0]

    def transfer_count(self) -> int:
        row = self.one("SELECT count(*) FROM transfers")
        return 0 if row is None else int(row[0])

    # -- postings (revision 0007) ---------------------------------------------------------

    def postings_watermark_rows(self) -> list[tuple[object, object]]:
        return [(r[0], r[1]) for r in self._conn.execute("SELECT id, seq FROM postings_upto")]

    def postings_sums(self, watermark: int, keys: FingerprintKeys) -> PostingsSums:
        """Two aggregate scans on the server, in this REPEATABLE READ transaction (no
        parameters: psycopg would read the SQL's `%` operators as placeholders)."""
        return postings_sums(
            lambda query: self._conn.execute(query).fetchone(),
            watermark,
            keys,
            _POSTINGS_FENCE,
        )

    def postings_differences(self, watermark: int, limit: int) -> PostingsDifferences:
        def pairs(query: str) -> list[tuple[object, object]]:
            return [(r[0], r[1]) for r in self._conn.execute(query)]

        return PostingsDifferences(
            pairs(lost_sql(watermark, limit)), pairs(extra_sql(watermark, limit))
        )

    def export_token(self) -> SnapshotToken | None:
        return SnapshotToken(__name__, (self._info, self._snapshot_id))

    def stale(self) -> bool:
        return False


def _references(url: URL) -> Mapping[str, Schema]:
    try:
        return reference_schemas("postgresql", url)
    except CannotOpenLedger as exc:  # e.g. a role without CREATE: say what the check needs
        raise CannotAudit(str(exc)) from None
    except Exception as exc:  # a broken installation or server, not a broken ledger
        raise CannotAudit(
            f"the shipped migrations could not build the reference schema ({_reason(exc)})"
        ) from None


def _catalog_differences(
    conn: psycopg.Connection[Any], url: URL, revision: str
) -> list[Difference]:
    """How the catalog differs from what the migrations create up to `revision` on this
    same server (`bank.ledger.postgres.schema`: canonical texts of this server version)."""
    with conn.cursor() as cur:
        found = read_schema(cur, "postgresql")
    return compare_schema(_references(url)[revision], found, revision)


def _catalog_matching_revisions(conn: psycopg.Connection[Any], url: URL) -> list[str]:
    with conn.cursor() as cur:
        found = read_schema(cur, "postgresql")
    return matching_revisions(found, _references(url))


@contextmanager
def open_snapshot(backend: _Located) -> Iterator[PostgresSnapshot]:
    """The snapshot of the PostgreSQL ledger at `backend.url`; `CannotAudit` (one line)
    when the server cannot be reached or the database cannot be read."""
    where = backend.url.render_as_string(hide_password=True)
    info = conninfo(backend.url)
    try:
        conn = _connect(info)
    except psycopg.Error as exc:
        raise CannotAudit(f"{where}: PostgreSQL could not be reached ({_reason(exc)})") from None
    try:
        try:
            yield PostgresSnapshot(conn, where, info, backend.url)
        except psycopg.Error as exc:
            raise CannotAudit(f"{where}: PostgreSQL could not read it ({_reason(exc)})") from None
    finally:
        with suppress(psycopg.Error):
            conn.rollback()
        conn.close()


@contextmanager
def open_range_reader(token: SnapshotToken) -> Iterator[_Rows]:
    """In a worker process: a transaction on the exported snapshot of `token`."""
    info, snapshot_id = token.args
    conn = _connect(str(info))
    try:
        conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(str(snapshot_id))))
        yield _Rows(conn)
        conn.rollback()
    finally:
        conn.close()
