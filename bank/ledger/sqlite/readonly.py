"""Reading an SQLite ledger file without owning it: read-only URIs, `immutable` at rest.

For `bank.ledger.reader` (the CLI's `accounts` and `history`, `check-history`):
no file lock, no migration, no writes, and it works while a bank runs on the
file. A ledger at rest (no -wal or -journal content) is read `immutable`, so not
even SQLite's -wal/-shm side files appear beside it; if the file changed while it
was read so, the read is repeated through SQLite's locking. A hot -journal (a
write interrupted) is refused: a reader may not roll it back.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Connection, Engine
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError

from bank.errors import CannotOpenLedger, NotALedger, UnsupportedLedgerUrl
from bank.ledger import migrate
from bank.ledger.sqlite import (
    at_rest,
    create_readonly_engine,
    fingerprint,
    open_error,
    owned_here,
    side_file_size,
    sniff_sqlite_file,
)

T = TypeVar("T")


class SqliteReadOnly:
    """Read-only snapshots of one ledger file (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = Path(path)
        self.path: Path | None = self._path
        self.where = str(self._path)
        self._engine: Engine | None = None
        #: The immutable engine of the last read at rest, and the fingerprint it is valid
        #: for: reads in a row (history pages, point balances) reuse its connection and
        #: page cache while the file stays unchanged (one connection set-up, not one a read).
        self._immutable: tuple[Engine, tuple[int, ...]] | None = None
        try:
            found = self._path.exists()
            regular = self._path.is_file()
        except OSError as exc:  # a name too long, a loop of symlinks, ...
            raise CannotOpenLedger(f"{self._path}: cannot be examined ({exc.strerror})") from None
        if not found:
            raise NotALedger(f"no ledger at {self._path}")
        if not regular:
            raise NotALedger(f"{self._path} is not a regular file")
        # A file a `Bank` of this process owns is read through SQLite only: opening and
        # closing it here, or an immutable connection, would drop the owner's locks.
        self._owned = owned_here(self._path)
        if side_file_size(self._path, "-journal") > 0:
            raise self._hot_journal()
        if not self._owned:
            sniff_sqlite_file(self._path)

    def revision(self) -> str | None:
        """The ledger's schema revision (None: an empty database)."""
        return self._with_engine(lambda engine: migrate.ledger_revision(engine, self.where))

    def close(self) -> None:
        """Release the connections."""
        self._drop_immutable()
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def _drop_immutable(self) -> None:
        if self._immutable is not None:
            self._immutable[0].dispose()
            self._immutable = None

    def _immutable_engine(self, before: tuple[int, ...]) -> Engine:
        """The immutable engine for the file as `before` fingerprints it (a new one if the
        file changed since the last: its cached pages would be stale)."""
        if self._immutable is not None and self._immutable[1] != before:
            self._drop_immutable()
        if self._immutable is None:
            self._immutable = (create_readonly_engine(self._path, immutable=True), before)
        return self._immutable[0]

    def _hot_journal(self) -> CannotOpenLedger:
        return CannotOpenLedger(
            f"{self._path}: a -journal beside it (a write interrupted or under way, a hot "
            "-journal) that a reader may not roll back; `bank init` recovers an interrupted one"
        )

    def read(self, read: Callable[[Connection], T]) -> T:
        """`read` in one read transaction: one committed snapshot."""

        def run(engine: Engine) -> T:
            with engine.begin() as conn:
                return read(conn)

        return self._with_engine(run)

    def _with_engine(self, read: Callable[[Engine], T]) -> T:
        """`read` on one snapshot: immutable when the ledger is at rest and unchanged
        meanwhile (no side file is created), else through SQLite's locking."""
        try:
            if not self._owned and at_rest(self._path):
                before = fingerprint(self._path)
                result = read(self._immutable_engine(before))
                if fingerprint(self._path) == before:
                    return result
                self._drop_immutable()
            if self._engine is None:
                self._engine = create_readonly_engine(self._path)
            return read(self._engine)
        except (DBAPIError, sqlite3.Error) as exc:
            self.close()
            if side_file_size(self._path, "-journal") > 0:
                raise self._hot_journal() from None
            raise open_error(exc, str(self._path)) from None
        except OSError as exc:
            self.close()
            raise CannotOpenLedger(f"{self._path}: cannot be read ({exc.strerror})") from None


def open_read_only(url: URL) -> SqliteReadOnly:
    """The read-only access to the file of a SQLite URL (`bank.ledger.reader`'s entry)."""
    if url.database in (None, "", ":memory:"):
        raise UnsupportedLedgerUrl(f"{url}: an in-memory database holds no ledger to read")
    return SqliteReadOnly(Path(url.database).expanduser())
