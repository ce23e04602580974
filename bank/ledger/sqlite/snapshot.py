"""The audit's read-only snapshot of an SQLite ledger file (to become
`bank/ledger/sqlite/snapshot.py` when `bank.ledger.sqlite` is a package).

One connection, `mode=ro` and `query_only`, one read transaction: every query sees
the same commit, even while an engine writes. A ledger at rest (no -wal or journal
content) that this process does not own is read as `immutable=1`, so not even the
-wal/-shm side files appear; `stale()` then says whether the file changed meanwhile
(the audit runs again through SQLite's locking). A ledger owned by a `Bank` of this
process is read through SQLite only: no Python file I/O, no immutable mode (both
close descriptors behind SQLite's back, and POSIX would drop the owner's locks).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, Protocol
from urllib.parse import quote

from sqlalchemy.engine import URL

from bank.errors import CannotAudit
from bank.ledger.audit_checks import COLUMN_TYPES, ROW_KEYS
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
    SchemaObject,
    compare_schema,
    matching_revisions,
    read_schema,
    reference_schemas,
)
from bank.ledger.sqlite import SQLITE_MAGIC, fingerprint, owned_here, side_file_size
from bank.limits import BUSY_TIMEOUT_MS

#: Findings of SQLite's integrity check kept (the audit reports one more as "more than").
INTEGRITY_FINDINGS_MAX: Final = 20
#: Rows fetched per step of a streaming cursor.
_ARRAYSIZE: Final = 1024
_LEDGER_TABLES: Final = frozenset({"accounts", "transfers", "account_events"})
_TRANSFER_COLUMNS: Final = (
    "seq, key, kind, debit_account_id, credit_account_id, amount, ts_us, hash"
)
#: The running balances (revision 0005), read as NULL from a ledger that lacks them.
RUNNING_COLUMNS: Final = ("debit_balance", "credit_balance")
#: Then the holds' and groups' columns (revision 0006), NULL from a ledger that lacks them.
HOLD_COLUMNS: Final = ("hold_seq", "expires_us", "link_first", "link_count")

#: SQLite runs a subquery with a LIMIT as a co-routine instead of
#: flattening it into the aggregate (which would compute each fingerprint line twice).
_POSTINGS_FENCE: Final = " LIMIT -1"


class _Located(Protocol):
    """What the snapshot needs of a backend: the SQLAlchemy URL of the ledger."""

    @property
    def url(self) -> URL: ...


def _path_of(backend: _Located) -> Path:
    database = backend.url.database or ""
    if database.startswith("file:") or database in ("", ":memory:"):
        raise CannotAudit(
            f"{backend.url.render_as_string()}: the audit reads a ledger file by its path "
            "(sqlite:///path), not an SQLite URI or an in-memory database"
        )
    return Path(database).expanduser().absolute()


def check_file(path: Path, *, owned: bool = False) -> None:
    """Refuse what cannot be a ledger before SQLite sees it (reads at most 16 bytes).

    `owned`: a `Bank` of this process holds the file, so it is a ledger and its header
    must not be read with Python I/O (closing that descriptor would drop SQLite's locks).
    """
    if not path.exists():
        raise CannotAudit(f"{path}: no such file")
    if not path.is_file():
        raise CannotAudit(f"{path}: not a regular file")
    if owned:
        return
    try:
        with path.open("rb") as fh:
            head = fh.read(len(SQLITE_MAGIC))
    except OSError as exc:
        raise CannotAudit(f"{path}: cannot be read ({exc.strerror})") from None
    wal = path.with_name(path.name + "-wal")
    if not head and not (wal.exists() and wal.stat().st_size > 0):
        raise CannotAudit(f"{path}: an empty file, not a ledger")
    if head != SQLITE_MAGIC and side_file_size(path, "-journal") > 0:
        raise CannotAudit(
            f"{path}: a write was interrupted (a hot -journal); `bank init` recovers it"
        )
    if head and head != SQLITE_MAGIC:
        raise CannotAudit(f"{path}: not an SQLite database, so not a ledger")


def _connect(path: Path, *, immutable: bool) -> sqlite3.Connection:
    """A read-only connection (`mode=ro`, `query_only`), autocommit so BEGIN is ours.

    `immutable=1` reads the main file alone, with no locks and no -wal/-shm files
    created; only sound when nothing is in a WAL or journal (the caller checks).
    """
    uri = f"file:{quote(str(path))}?mode=ro" + ("&immutable=1" if immutable else "")
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA query_only = ON")
    return conn


def _reason(exc: BaseException) -> str:
    lines = str(exc).splitlines()
    return lines[0] if lines else type(exc).__name__


def _stream(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...] = ()) -> Iterator[Any]:
    """Rows of `sql` one at a time (a cursor of its own, closed when done or dropped)."""
    cur = conn.cursor()
    cur.arraysize = _ARRAYSIZE
    try:
        cur.execute(sql, params)
        yield from cur
    finally:
        cur.close()


def _running_sql(conn: sqlite3.Connection) -> str:
    """`, debit_balance, credit_balance` as the table has them (NULL for a missing one)."""
    have = {str(r[0]) for r in conn.execute("SELECT name FROM pragma_table_info('transfers')")}
    return "".join(f", {c}" if c in have else ", NULL" for c in (*RUNNING_COLUMNS, *HOLD_COLUMNS))


def _transfer_sql(
    conn: sqlite3.Connection, first_seq: int | None, last_seq: int | None
) -> tuple[str, tuple[int, ...]]:
    """Rows in the model's column order: the chained columns, then the running balances."""
    where: list[str] = []
    params: list[int] = []
    if first_seq is not None:
        where.append("seq >= ?")
        params.append(first_seq)
    if last_seq is not None:
        where.append("seq <= ?")
        params.append(last_seq)
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    columns = _TRANSFER_COLUMNS + _running_sql(conn)
    return f"SELECT {columns} FROM transfers{clause} ORDER BY seq", tuple(params)


def _hash_before(conn: sqlite3.Connection, seq: int) -> object:
    row = conn.execute(
        "SELECT hash FROM transfers WHERE seq < ? ORDER BY seq DESC LIMIT 1", (seq,)
    ).fetchone()
    return None if row is None else row[0]


class SqliteSnapshot:
    """`bank.ledger.backend.LedgerSnapshot` over one read transaction of one connection."""

    def __init__(
        self, conn: sqlite3.Connection, path: Path, *, immutable: bool, before: tuple[int, ...]
    ) -> None:
        self._conn = conn
        self.path = path
        self.where = str(path)
        self.immutable = immutable
        self._before = before
        self._schema: dict[str, SchemaObject] | None = None
        row = (
            conn.execute("SELECT max(seq) FROM transfers").fetchone()
            if self._has("transfers")
            else None
        )
        self.pinned_max_seq = int(row[0]) if row is not None and type(row[0]) is int else 0

    # -- schema ---------------------------------------------------------------------------

    def _found(self) -> dict[str, SchemaObject]:
        if self._schema is None:
            cur = self._conn.cursor()
            try:
                self._schema = read_schema(cur)
            finally:
                cur.close()
        return self._schema

    def _has(self, table: str) -> bool:
        return (
            self._conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
            ).fetchone()
            is not None
        )

    def tables(self) -> set[str]:
        return {name for name, obj in self._found().items() if obj.type == "table"}

    def columns(self, table: str) -> set[str]:
        obj = self._found().get(table)
        return set() if obj is None else {str(column[1]) for column in obj.columns}

    def revision_rows(self) -> list[object]:
        tables = self.tables()
        if "alembic_version" not in tables:
            if not tables:
                raise CannotAudit(f"{self.where}: an empty SQLite database, not a ledger")
            if tables & _LEDGER_TABLES:
                raise CannotAudit(
                    f"{self.where}: has ledger tables but no schema revision (alembic_version)"
                )
            listed = ", ".join(sorted(tables)[:5])
            raise CannotAudit(
                f"{self.where}: an SQLite database of another program (tables: {listed})"
            )
        return [row[0] for row in self._conn.execute("SELECT version_num FROM alembic_version")]

    def revision(self) -> str | None:
        rows = self.revision_rows()
        return str(rows[0]) if len(rows) == 1 else None

    def _references(self) -> Any:
        try:
            return reference_schemas("sqlite")
        except Exception as exc:  # a broken installation, not a broken ledger
            raise CannotAudit(
                f"the shipped migrations could not build the reference schema ({_reason(exc)})"
            ) from None

    def schema_differences(self, revision: str) -> list[Difference]:
        return compare_schema(self._references()[revision], self._found(), revision)

    def matching_revisions(self) -> list[str]:
        return matching_revisions(self._found(), self._references())

    def integrity_problems(self) -> list[str]:
        """`PRAGMA integrity_check`: every index holds exactly its table's rows.

        An index's text can be made to say one thing while its b-tree holds another
        (`PRAGMA writable_schema`): only a comparison of each index with its table
        finds that (~0.25 s per 1,000,000 transfers here). CHECK constraints are left
        to the row checks, which name the row (`ignore_check_constraints` for this one
        statement; a setting of this connection only, nothing is written).
        """
        conn = self._conn
        conn.execute("PRAGMA ignore_check_constraints = ON")
        try:
            findings = [
                str(row[0])
                for row in conn.execute(f"PRAGMA integrity_check({INTEGRITY_FINDINGS_MAX + 1})")
            ]
        finally:
            conn.execute("PRAGMA ignore_check_constraints = OFF")
        return [] if findings == ["ok"] else findings

    def type_problems(
        self, skip: Collection[str] = ()
    ) -> Iterator[tuple[str, str, object, str, object]]:
        """One scan per table inside SQLite (`typeof`), whatever the revision: STRICT
        tables (0003) refuse such values, but a ledger at 0002, or one whose table was
        rebuilt by hand, may hold them."""
        tables = self.tables()
        for table, all_columns in COLUMN_TYPES.items():
            if table not in tables or table in skip:
                continue
            have = self.columns(table)  # a missing column is the schema check's
            columns = {c: t for c, t in all_columns.items() if c in have}
            key_column = ROW_KEYS[table][1]
            wrong = " OR ".join(
                f"typeof({c}) NOT IN ({', '.join(repr(t) for t in allowed)})"
                for c, allowed in columns.items()
            )
            sql = (
                f"SELECT {key_column}, {', '.join(f'typeof({c}), {c}' for c in columns)} "
                f"FROM {table} WHERE {wrong} ORDER BY {key_column}"
            )
            for row in _stream(self._conn, sql):
                for i, (column, allowed) in enumerate(columns.items()):
                    stored_type, value = row[1 + 2 * i], row[2 + 2 * i]
                    if stored_type not in allowed:
                        yield table, column, row[0], stored_type, value

    # -- rows -------------------------------------------------------------------------------

    def transfer_rows(
        self, first_seq: int | None = None, last_seq: int | None = None
    ) -> Iterator[tuple[Any, ...]]:
        sql, params = _transfer_sql(self._conn, first_seq, last_seq)
        return _stream(self._conn, sql, params)

    def account_event_rows(self) -> Iterator[tuple[Any, ...]]:
        return _stream(
            self._conn,
            "SELECT seq, account_id, kind, name, overdraft_limit, transfer_seq, ts_us, hash "
            "FROM account_events ORDER BY seq",
        )

    def limit_event_rows(self) -> Iterator[tuple[Any, ...]]:
        return _stream(
            self._conn,
            "SELECT transfer_seq, account_id, kind, overdraft_limit FROM account_events "
            "ORDER BY transfer_seq, seq",
        )

    def account_rows(self) -> Iterator[tuple[Any, ...]]:
        return _stream(
            self._conn, "SELECT id, name, overdraft_limit, balance FROM accounts ORDER BY id"
        )

    def chain_format_rows(self) -> Iterator[tuple[Any, ...]]:
        return _stream(
            self._conn,
            "SELECT chain, first_seq, version FROM chain_formats ORDER BY chain, first_seq",
        )

    def key_rows(self) -> Iterator[tuple[Any, ...]]:
        return _stream(
            self._conn, "SELECT key, seq FROM transfers WHERE key IS NOT NULL ORDER BY key, seq"
        )

    def hash_at(self, table: str, seq: int) -> object:
        assert table in ("transfers", "account_events"), table
        row = self._conn.execute(f"SELECT hash FROM {table} WHERE seq = ?", (seq,)).fetchone()
        return None if row is None else row[0]

    def hash_before(self, seq: int) -> object:
        return _hash_before(self._conn, seq)

    def transfer_count(self) -> int:
        return int(self._conn.execute("SELECT count(*) FROM transfers").fetchone()[0])

    # -- postings (revision 0007) ---------------------------------------------------------

    def postings_watermark_rows(self) -> list[tuple[object, object]]:
        return [(r[0], r[1]) for r in self._conn.execute("SELECT id, seq FROM postings_upto")]

    def postings_sums(self, watermark: int, keys: FingerprintKeys) -> PostingsSums:
        """Two aggregate scans inside SQLite, on this read transaction."""
        return postings_sums(
            lambda sql: self._conn.execute(sql).fetchone(), watermark, keys, _POSTINGS_FENCE
        )

    def postings_differences(self, watermark: int, limit: int) -> PostingsDifferences:
        def pairs(sql: str) -> list[tuple[object, object]]:
            return [(r[0], r[1]) for r in self._conn.execute(sql)]

        return PostingsDifferences(
            pairs(lost_sql(watermark, limit)), pairs(extra_sql(watermark, limit))
        )

    def export_token(self) -> SnapshotToken | None:
        # Another connection sees the same rows up to `pinned_max_seq`: immutable, the
        # unchanged file (`stale` checks); else a later commit of an append-only ledger,
        # and the audit checks that the workers' chain ends at this snapshot's head.
        return SnapshotToken(__name__, (str(self.path), self.immutable))

    def stale(self) -> bool:
        return self.immutable and fingerprint(self.path) != self._before


@contextmanager
def open_snapshot(backend: _Located, *, immutable_ok: bool = True) -> Iterator[SqliteSnapshot]:
    """The snapshot of the ledger file of `backend.url` (see the module docstring).

    Raises `CannotAudit` (a one-line reason) for a missing file, a file that is not an
    SQLite database, or one SQLite cannot open or read (also while the caller streams).
    """
    path = _path_of(backend)
    try:
        owned = owned_here(path)
        check_file(path, owned=owned)
        before = fingerprint(path)
    except OSError as exc:  # a name too long, a loop of symlinks, ...
        raise CannotAudit(f"{path}: cannot be examined ({exc.strerror or exc})") from None
    except ValueError as exc:  # a NUL in the path (a BankError is not a ValueError)
        raise CannotAudit(f"{str(path)!r}: not a usable path ({exc})") from None
    immutable = immutable_ok and not owned and before[3] <= 0 and before[4] <= 0
    try:
        conn = _connect(path, immutable=immutable)
    except sqlite3.Error as exc:
        raise CannotAudit(f"{path}: SQLite could not open it ({_reason(exc)})") from None
    try:
        try:
            conn.execute("BEGIN")
            # The first read pins the snapshot: every query after it sees the same commit.
            snapshot = SqliteSnapshot(conn, path, immutable=immutable, before=before)
            yield snapshot
            conn.execute("ROLLBACK")
        except sqlite3.Error as exc:
            raise CannotAudit(f"{path}: SQLite could not read it ({_reason(exc)})") from None
        except OSError as exc:
            raise CannotAudit(f"{path}: {exc.strerror or exc}") from None
    finally:
        conn.close()


class _RangeReader:
    """A worker's own read-only connection to the file, for transfers by seq range."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def hash_before(self, seq: int) -> object:
        return _hash_before(self._conn, seq)

    def transfer_rows(
        self, first_seq: int | None = None, last_seq: int | None = None
    ) -> Iterator[tuple[Any, ...]]:
        sql, params = _transfer_sql(self._conn, first_seq, last_seq)
        return _stream(self._conn, sql, params)


@contextmanager
def open_range_reader(token: SnapshotToken) -> Iterator[_RangeReader]:
    """In a worker process: the file of `token` again, read-only (immutable if it was)."""
    path_text, immutable = token.args
    conn = _connect(Path(path_text), immutable=bool(immutable))
    try:
        conn.execute("BEGIN")
        yield _RangeReader(conn)
        conn.execute("ROLLBACK")
    finally:
        conn.close()
