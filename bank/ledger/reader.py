"""Read a ledger without opening a `Bank`: no file lock, no migration, no writes.

For the CLI's `accounts` and `history`, which must work while a bank is running
on the same file (they read one committed snapshot, like the audit). A ledger at
rest is read `immutable`, so not even SQLite's -wal/-shm side files appear beside it.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from bank.errors import CannotOpenLedger, NotALedger
from bank.ledger import migrate, store
from bank.ledger.sqlite import (
    at_rest,
    create_readonly_engine,
    fingerprint,
    open_error,
    owned_here,
    side_file_size,
    sniff_sqlite_file,
)
from bank.records import AccountInfo, Receipt

T = TypeVar("T")


class LedgerReader:
    """Read-only access to a ledger file at a revision this `bank` knows."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._engine: Engine | None = None
        try:
            found = self.path.exists()
            regular = self.path.is_file()
        except OSError as exc:  # a name too long, a loop of symlinks, ...
            raise CannotOpenLedger(f"{self.path}: cannot be examined ({exc.strerror})") from None
        if not found:
            raise NotALedger(f"no ledger at {self.path}")
        if not regular:
            raise NotALedger(f"{self.path} is not a regular file")
        # A file a `Bank` of this process owns is read through SQLite only: opening and
        # closing it here, or an immutable connection, would drop the owner's locks.
        self._owned = owned_here(self.path)
        if side_file_size(self.path, "-journal") > 0:
            raise self._hot_journal()
        if not self._owned:
            sniff_sqlite_file(self.path)
        revision = self._read(lambda engine: migrate.ledger_revision(engine, str(self.path)))
        if revision is None:
            self.close()
            raise NotALedger(f"{self.path} is an empty database, not a ledger")
        self.revision = revision

    def __enter__(self) -> LedgerReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Release the connections."""
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def _hot_journal(self) -> CannotOpenLedger:
        return CannotOpenLedger(
            f"{self.path}: a -journal beside it (a write interrupted or under way, a hot "
            "-journal) that a reader may not roll back; `bank init` recovers an interrupted one"
        )

    def _read(self, read: Callable[[Engine], T]) -> T:
        """`read` on one snapshot: immutable when the ledger is at rest and unchanged
        meanwhile (no side file is created), else through SQLite's locking."""
        try:
            if not self._owned and at_rest(self.path):
                before = fingerprint(self.path)
                engine = create_readonly_engine(self.path, immutable=True)
                try:
                    result = read(engine)
                finally:
                    engine.dispose()
                if fingerprint(self.path) == before:
                    return result
            if self._engine is None:
                self._engine = create_readonly_engine(self.path)
            return read(self._engine)
        except (DBAPIError, sqlite3.Error) as exc:
            self.close()
            if side_file_size(self.path, "-journal") > 0:
                raise self._hot_journal() from None
            raise open_error(exc, str(self.path)) from None
        except OSError as exc:
            self.close()
            raise CannotOpenLedger(f"{self.path}: cannot be read ({exc.strerror})") from None

    def accounts(self) -> list[AccountInfo]:
        """Every account, `@cash` first, from one committed snapshot."""

        def read(engine: Engine) -> list[AccountInfo]:
            with engine.begin() as conn:
                return store.load_accounts(conn)

        return self._read(read)

    def history(self, account_id: int, *, limit: int | None = None) -> list[Receipt]:
        """One account's committed transfers, oldest first."""

        def read(engine: Engine) -> list[Receipt]:
            with engine.begin() as conn:
                return list(store.history(conn, account_id, limit=limit))

        return self._read(read)
