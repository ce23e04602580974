"""SQLite connections for a ledger: pragmas and durability, read-only engines, and what
SQLite's errors mean at open."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError

from bank.errors import BankError, CannotOpenLedger, LedgerBusy, LedgerCorrupt, NotALedger
from bank.ledger.backend import Durability
from bank.ledger.sqlite.lock import FileLock
from bank.limits import BUSY_TIMEOUT_MS

#: How a transaction on a ledger's pooled connections starts (SQLAlchemy's "begin" event).
BEGIN_SQL = "BEGIN"


def _set_pragmas(dbapi_connection: Any, durability: Durability) -> None:
    # Autocommit at the driver level: SQLAlchemy's "begin" event below issues BEGIN
    # itself, so each transaction is one SQLite transaction and reads are snapshots.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        # FULL: WAL + synchronous=FULL, every commit fsync'ed; NORMAL: the WAL is
        # fsync'ed only at checkpoints (a power loss may take the last commits back).
        cursor.execute(f"PRAGMA synchronous = {durability.name}")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def _check_identity(dbapi_connection: Any, identity: tuple[int, int], locked: Path) -> None:
    """Refuse a connection whose main database is not the file the owner lock is on."""
    rows = dbapi_connection.execute("PRAGMA database_list").fetchall()
    opened = next((row[2] for row in rows if row[1] == "main"), "")
    try:
        st = os.stat(opened) if opened else None
    except OSError:
        st = None
    if st is None or (st.st_dev, st.st_ino) != identity:
        raise LedgerBusy(
            f"{locked}: SQLite opened {opened or 'no file'}, not the file this bank locked"
        )


def create_ledger_engine(
    url: URL,
    durability: Durability = Durability.FULL,
    *,
    lock: FileLock | None = None,
) -> Engine:
    """An Engine whose every connection carries the ledger's pragmas.

    With `lock`, each new connection first proves (`PRAGMA database_list` + stat) that
    SQLite opened the very file the lock is on, before any pragma can write to it.
    """
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False},
        pool_size=8,
        max_overflow=32,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        if lock is not None:
            _check_identity(dbapi_connection, lock.identity, lock.path)
        _set_pragmas(dbapi_connection, durability)

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql(BEGIN_SQL)

    return engine


def create_readonly_engine(path: Path, *, immutable: bool = False) -> Engine:
    """An Engine that can only read `path` (`mode=ro`): it never creates, migrates,
    checkpoints or otherwise writes the file.

    `immutable` reads the main file alone (no -wal/-shm side files appear); only for a
    ledger at rest that this process does not own: SQLite closes an immutable
    connection's descriptor at once, which would drop an owner's POSIX locks.
    """
    uri = f"file:{quote(str(path.absolute()))}?mode=ro" + ("&immutable=1" if immutable else "")
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


def check_writable(engine: Engine) -> None:
    """Take and drop SQLite's write lock once (bounded by the busy timeout): a ledger that
    another process keeps locked is refused at open, not at the first operation."""
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        try:
            cursor.execute("BEGIN IMMEDIATE")
            cursor.execute("ROLLBACK")
        finally:
            cursor.close()
    finally:
        raw.close()


def is_driver_error(exc: BaseException) -> bool:
    """True for a failure of SQLite itself (raw, or wrapped by SQLAlchemy): `open_error`'s domain."""
    return isinstance(exc, DBAPIError | sqlite3.Error)


def open_error(exc: BaseException, where: str) -> BankError:
    """A specific, one-line `BankError` for an SQLite failure while opening `where`."""
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    lines = str(orig).splitlines()
    reason = lines[0] if lines else type(orig).__name__
    low = reason.lower()
    if "locked" in low or "busy" in low:
        return LedgerBusy(
            f"{where}: another process holds a lock on it (waited {BUSY_TIMEOUT_MS} ms): {reason}"
        )
    if "full" in low:
        return CannotOpenLedger(f"{where}: the disk is full ({reason}); nothing was written")
    if "no such table" in low or "no such column" in low:
        return LedgerCorrupt(
            f"{where}: part of the ledger's schema is missing ({reason}); run `bank audit`"
        )
    if "not a database" in low or "malformed" in low:
        return NotALedger(f"{where}: not a readable SQLite database ({reason})")
    if "readonly" in low or "read-only" in low:
        return CannotOpenLedger(f"{where}: cannot be written ({reason})")
    return CannotOpenLedger(f"{where}: SQLite could not open it ({reason})")
