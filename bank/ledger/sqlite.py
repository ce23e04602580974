"""Everything SQLite-specific lives here: the connection pragmas, read-only URLs and the
file lock, so that another SQLAlchemy backend can be added in one place."""

from __future__ import annotations

import fcntl
import os
import sqlite3
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url

from bank.errors import LedgerBusy
from bank.limits import BUSY_TIMEOUT_MS


class Durability(StrEnum):
    """How an acknowledged operation survives trouble.

    FULL: WAL + `synchronous=FULL`: every group commit is fsync'ed before anyone is
    answered, so an acknowledged operation survives a power loss.
    NORMAL: WAL + `synchronous=NORMAL`: the WAL is fsync'ed only at checkpoints; an
    acknowledged operation survives a crash of the process, but a power loss may
    take the last commits back (the ledger stays consistent: a prefix survives).
    """

    FULL = "full"
    NORMAL = "normal"


def ledger_url(db: str | os.PathLike[str] | URL) -> URL:
    """A path or URL as an SQLAlchemy URL (`sqlite:///path` for a bare path)."""
    if isinstance(db, URL):
        return db
    text = os.fspath(db)
    if "://" in text:
        return make_url(text)
    return URL.create("sqlite", database=str(Path(text).expanduser().absolute()))


def sqlite_path(url: URL) -> Path | None:
    """The file behind a SQLite URL, or None for another backend or `:memory:`."""
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database)


#: How a transaction on a ledger connection starts: SQLAlchemy's "begin" event and
#: the ledger writer's own DB-API cursor both use it, so they cannot drift apart.
BEGIN_SQL = "BEGIN"


def _set_pragmas(dbapi_connection: Any, durability: Durability) -> None:
    # Autocommit at the driver level: SQLAlchemy's "begin" event below issues BEGIN
    # itself, so each transaction is one SQLite transaction and reads are snapshots.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute(f"PRAGMA synchronous = {durability.name}")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def bound_variables_max(dbapi_connection: Any) -> int:
    """How many `?` one statement may carry on this connection (999 before SQLite 3.32)."""
    limit: int = dbapi_connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    return limit


def create_ledger_engine(url: URL, durability: Durability = Durability.FULL) -> Engine:
    """An Engine whose every connection carries the ledger's pragmas."""
    if url.get_backend_name() != "sqlite":
        return create_engine(url)
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False},
        pool_size=8,
        max_overflow=32,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        _set_pragmas(dbapi_connection, durability)

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql(BEGIN_SQL)

    return engine


def create_readonly_engine(path: Path) -> Engine:
    """An Engine that can only read `path` (`mode=ro`): it never creates, migrates,
    checkpoints or otherwise writes the file."""
    uri = f"file:{quote(str(path.absolute()))}?mode=ro"
    engine = create_engine(
        "sqlite://",
        creator=lambda: sqlite3.connect(uri, uri=True, check_same_thread=False),
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        dbapi_connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        dbapi_connection.execute("PRAGMA query_only = ON")

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN")

    return engine


class FileLock:
    """An exclusive `flock` on the ledger file: one open `Bank` per ledger, across processes.

    Two banks on one file would each trust their own in-memory balances and
    corrupt the ledger; readers (the audit, plain `sqlite3`) never take this lock.
    `flock` locks are independent of SQLite's own `fcntl` byte-range locks.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            raise LedgerBusy(
                f"{path} is already open in another Bank (this or another process)"
            ) from None

    def release(self) -> None:
        """Drop the lock (idempotent)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
