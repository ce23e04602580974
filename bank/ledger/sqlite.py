"""Everything SQLite-specific lives here: the connection pragmas, read-only URLs and the
file lock, so that another SQLAlchemy backend can be added in one place."""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import stat
import threading
from enum import StrEnum
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError

from bank.errors import (
    BankError,
    CannotOpenLedger,
    LedgerBusy,
    LedgerCorrupt,
    NotALedger,
    UnsupportedLedgerUrl,
)
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
    """The file behind a SQLite URL, or None for another backend or `:memory:` (no URI
    resolution: `resolve_sqlite_target` says which file SQLite really opens)."""
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database)


#: Query parameters SQLAlchemy hands to the `sqlite3` driver itself, not to SQLite.
_DRIVER_OPTIONS = frozenset(
    {"timeout", "isolation_level", "detect_types", "check_same_thread", "cached_statements"}
)
#: SQLite URI parameters that still give a durable, locked, single-writer file; any other
#: (`mode=ro|memory`, `immutable`, `nolock`, `vfs`, `cache=shared`, ...) is refused.
_URI_PARAMETERS_OK: dict[str, frozenset[str] | None] = {
    "mode": frozenset({"rw", "rwc"}),
    "cache": frozenset({"private"}),
    "psow": None,
}


class SqliteTarget:
    """The file SQLite will open for a ledger URL, resolved the way SQLite resolves it.

    `engine_url` names that file by its absolute path (no URI), so the engine opens
    exactly the file the owner lock is taken on; `create` is False for `mode=rw`.
    """

    def __init__(self, path: Path, engine_url: URL, *, create: bool) -> None:
        self.path = path
        self.engine_url = engine_url
        self.create = create


def _refuse(shown: str, why: str) -> UnsupportedLedgerUrl:
    return UnsupportedLedgerUrl(f"{shown}: {why}; a ledger needs a durable file with locking")


def _uri_path(uri: str, shown: str) -> tuple[str, bool]:
    """(file name, may create) of an SQLite `file:` URI, as sqlite3_open_v2 parses it."""
    rest = uri[len("file:") :].partition("#")[0]
    name, _, query = rest.partition("?")
    if name.startswith("//"):
        authority, slash, tail = name[2:].partition("/")
        if authority not in ("", "localhost"):
            raise _refuse(shown, f"the URI names a remote host {authority!r}")
        name = slash + tail
    create = True
    for item in query.split("&"):
        if not item:
            continue
        key, _, value = (unquote(part) for part in item.partition("="))
        if key not in _URI_PARAMETERS_OK:
            raise _refuse(shown, f"the SQLite URI parameter {key}={value} is not allowed")
        allowed = _URI_PARAMETERS_OK[key]
        if allowed is not None and value not in allowed:
            raise _refuse(shown, f"the SQLite URI parameter {key}={value} is not allowed")
        if key == "mode":
            create = value == "rwc"
    return unquote(name), create


def resolve_sqlite_target(url: URL) -> SqliteTarget | None:
    """Where a SQLite ledger URL really points; None for another backend.

    Resolves `file:` URIs (percent-decoding, `//localhost`, relative to the current
    directory) as SQLite does, with or without `?uri=true` (this SQLite is built with
    `SQLITE_USE_URI`). Raises `UnsupportedLedgerUrl` for an in-memory or temporary
    database, a URI parameter that weakens durability or locking, or another driver.
    """
    if url.get_backend_name() != "sqlite":
        return None
    shown = unquote(url.render_as_string(hide_password=True))
    if url.get_driver_name() != "pysqlite":
        raise _refuse(shown, f"the driver {url.get_driver_name()!r} is not supported")
    database = url.database or ""
    driver_query = {k: v for k, v in url.query.items() if k in _DRIVER_OPTIONS}
    extra = {k: v for k, v in url.query.items() if k not in _DRIVER_OPTIONS and k != "uri"}
    uri_flag = str(url.query.get("uri", "false")).lower() in ("true", "1", "yes", "on")
    if extra and not uri_flag:
        raise _refuse(shown, f"query parameters {sorted(extra)} need ?uri=true and are not allowed")
    create = True
    if database.startswith("file:"):
        if extra:
            database += ("&" if "?" in database else "?") + "&".join(
                f"{k}={v}" for k, v in sorted(extra.items()) if isinstance(v, str)
            )
        database, create = _uri_path(database, shown)
    elif extra:
        raise _refuse(shown, f"query parameters {sorted(extra)} are not allowed")
    if database in ("", ":memory:"):
        raise _refuse(shown, "an in-memory or temporary database is not durable")
    path = Path(os.path.abspath(Path(database).expanduser()))
    engine_url = URL.create(url.drivername, database=str(path), query=driver_query)
    return SqliteTarget(path, engine_url, create=create)


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


# -- ownership ---------------------------------------------------------------------------
#
# POSIX drops every fcntl lock a process holds on a file as soon as the process closes ANY
# descriptor of that file, and SQLite's locks are fcntl locks. So once this process owns
# a ledger, nothing here may open and close that file outside SQLite: a second opener
# learns that the file is taken from this registry (keyed by device and inode, reached
# with stat(), which opens nothing), whatever path, symlink or hard link it came by.

_owned_lock = threading.Lock()
#: (st_dev, st_ino) -> the lock that owns that file in this process.
_owned: dict[tuple[int, int], FileLock] = {}


def owned_here(path: Path) -> bool:
    """True if a `Bank` of this process owns the file at `path` (stat only, no open)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    with _owned_lock:
        return (st.st_dev, st.st_ino) in _owned


def side_file_size(path: Path, suffix: str) -> int:
    """Size of `path` + suffix (-wal, -journal), -1 when absent (stat only)."""
    try:
        return os.stat(path.with_name(path.name + suffix)).st_size
    except FileNotFoundError:
        return -1


def at_rest(path: Path) -> bool:
    """No -wal or -journal content beside `path`: the main file alone is the database."""
    return side_file_size(path, "-wal") <= 0 and side_file_size(path, "-journal") <= 0


def fingerprint(path: Path) -> tuple[int, int, int, int, int]:
    """What changes when anyone writes the ledger: identity, size, mtime, side-file sizes."""
    st = os.stat(path)
    return (
        st.st_ino,
        st.st_size,
        st.st_mtime_ns,
        side_file_size(path, "-wal"),
        side_file_size(path, "-journal"),
    )


SIDE_FILES = ("-wal", "-shm", "-journal")


class FileLock:
    """An exclusive `flock` on the ledger file: one open `Bank` per ledger, across processes.

    Two banks on one file would each trust their own in-memory balances and
    corrupt the ledger; readers (the audit, plain `sqlite3`) never take this lock.
    `flock` locks are independent of SQLite's own `fcntl` byte-range locks, and the
    descriptor stays open until `release()` (after SQLite's connections are closed).
    A file this process already owns is refused from the registry without opening it.
    """

    def __init__(self, path: Path, *, create: bool = True) -> None:
        self.path = path
        #: True when this lock created the file (so a failed creation may remove it).
        self.created = False
        self._fd: int | None = None
        with _owned_lock:
            try:
                st: os.stat_result | None = os.stat(path)
            except FileNotFoundError:
                st = None
            except OSError as exc:
                raise CannotOpenLedger(f"{path}: cannot be examined ({exc.strerror})") from None
            if st is not None:
                owner = _owned.get((st.st_dev, st.st_ino))
                if owner is not None:
                    raise LedgerBusy(
                        f"{path} is already open in another Bank of this process (as {owner.path})"
                    )
                if not stat.S_ISREG(st.st_mode):
                    raise NotALedger(f"{path} is not a regular file")
            elif not create:
                raise NotALedger(f"no ledger at {path} (mode=rw does not create one)")
            else:
                self._refuse_orphan_side_files()
            fd = self._open(path, create=st is None)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                # Not owned here (checked above under this lock), so closing drops no lock of ours.
                os.close(fd)
                raise LedgerBusy(
                    f"{path} is already open in another Bank (another process)"
                ) from None
            st = os.fstat(fd)
            self.identity = (st.st_dev, st.st_ino)
            self.size = st.st_size
            self._fd = fd
            _owned[self.identity] = self

    def _refuse_orphan_side_files(self) -> None:
        # A -wal or -journal without its database belongs to a deleted one: SQLite would
        # replay its pages into the new ledger.
        for suffix in ("-wal", "-journal"):
            if side_file_size(self.path, suffix) > 0:
                raise CannotOpenLedger(
                    f"{self.path} does not exist but {self.path.name}{suffix} does (a leftover "
                    "of a deleted database): move it away before creating a ledger here"
                )

    def _open(self, path: Path, *, create: bool) -> int:
        flags = os.O_RDONLY | os.O_CLOEXEC
        try:
            if create:
                try:
                    fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644)
                    self.created = True
                    return fd
                except FileExistsError:
                    # Raced by another creator, or a dangling symlink (O_EXCL refuses
                    # those): create through it, not knowing for sure who made the file.
                    return os.open(path, flags | os.O_CREAT, 0o644)
            return os.open(path, flags)
        except OSError as exc:
            raise CannotOpenLedger(f"{path}: cannot be opened ({exc.strerror})") from None

    def read_header(self, size: int) -> bytes:
        """The first `size` bytes of the locked file, read on the lock's own descriptor
        (pread: no descriptor opened or closed)."""
        assert self._fd is not None, "the lock was released"
        return os.pread(self._fd, size, 0)

    def remove_created(self) -> None:
        """Unlink a file this lock created, and its side files (a failed creation leaves
        nothing a later open could misread). Call with the lock held, SQLite closed."""
        if not self.created or self._fd is None:
            return
        for suffix in ("", *SIDE_FILES):
            # Absent, or best effort: an empty or uncommitted file reads as new anyway.
            with contextlib.suppress(OSError):
                os.unlink(self.path.with_name(self.path.name + suffix))

    def release(self) -> None:
        """Drop the lock (idempotent)."""
        with _owned_lock:
            if self._fd is not None:
                _owned.pop(self.identity, None)
                # Unlock before closing: a forked child shares this open file description,
                # and closing our descriptor alone would leave the lock held by its copy.
                with contextlib.suppress(OSError):
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
                self._fd = None


def roll_back_hot_journal(path: Path) -> None:
    """Let SQLite roll back a hot -journal (an interrupted write, e.g. a kill during the
    creation of the file) through a read-write connection. Call with the owner lock held
    and no other SQLite connection to `path` in this process; the read-only preflight
    could not do it."""
    if side_file_size(path, "-journal") <= 0:
        return
    try:
        conn = sqlite3.connect(str(path), isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise open_error(exc, str(path)) from None


def check_not_read_only(path: Path) -> None:
    """Refuse a ledger that cannot be written before SQLite sees it: on a read-only file
    system SQLite quietly opens the file read-only (and may not even see a hot -wal's
    frames), so the bank would start and fail at its first commit."""
    where = path if path.exists() else path.parent
    try:
        read_only = bool(os.statvfs(where).f_flag & os.ST_RDONLY)
    except OSError as exc:
        raise CannotOpenLedger(f"{path}: cannot inspect its file system ({exc.strerror})") from None
    if read_only:
        raise CannotOpenLedger(
            f"{path}: the file system is mounted read-only; a ledger must be writable "
            "(read it with `bank audit`); nothing was written"
        )
    if path.exists() and not os.access(path, os.W_OK):
        raise CannotOpenLedger(
            f"{path}: the file is not writable by this user; nothing was written"
        )
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise CannotOpenLedger(
            f"{path.parent}: the directory is not writable by this user (SQLite needs its "
            "-wal and -shm beside the ledger); nothing was written"
        )


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
