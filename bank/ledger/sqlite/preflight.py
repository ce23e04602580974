"""What a SQLite ledger file must pass before a bank writes it: a writable place, no
interrupted write left, SQLite's header (or an empty file)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from bank.errors import CannotOpenLedger, NotALedger
from bank.ledger.sqlite.engine import open_error
from bank.ledger.sqlite.lock import side_file_size
from bank.limits import BUSY_TIMEOUT_MS

SQLITE_MAGIC = b"SQLite format 3\x00"


def sniff_sqlite_file(path: Path) -> None:
    """Raise `NotALedger` if `path` exists, is not empty and is not an SQLite database.

    Reads 16 bytes; never writes. It opens and closes the file, so never call it on a
    file this process owns (POSIX would drop SQLite's locks): `Bank.open` reads the
    header on its lock's descriptor instead (`check_sqlite_header`).
    """
    if not path.exists():
        return
    if not path.is_file():
        raise NotALedger(f"{path} is not a regular file")
    with path.open("rb") as fh:
        head = fh.read(len(SQLITE_MAGIC))
    check_sqlite_header(head, path)


def check_sqlite_header(head: bytes, path: Path) -> None:
    """Raise `NotALedger` unless `head` (a file's first bytes) is empty or SQLite's magic."""
    if head and head[: len(SQLITE_MAGIC)] != SQLITE_MAGIC:
        raise NotALedger(
            f"{path} is not an SQLite database (it does not start with the SQLite header)"
        )


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
