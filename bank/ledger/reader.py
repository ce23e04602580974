"""Read a ledger without opening a `Bank`: no owner lock, no migration, no writes.

For the CLI's `accounts` and `history` and for `check-history`, which must work
while a bank is running on the same ledger (they read one committed snapshot,
like the audit). The ledger is a path or URL, SQLite or PostgreSQL; how each is
read without being owned is its backend's (`bank.ledger.sqlite.readonly`: a
read-only, at rest `immutable` file; `bank.ledger.postgres.readonly`: one
REPEATABLE READ READ ONLY transaction).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Protocol, TypeVar

from sqlalchemy import Connection
from sqlalchemy.engine import URL
from sqlalchemy.exc import ArgumentError

from bank.errors import NotALedger, UnsupportedLedgerUrl
from bank.ledger import store
from bank.ledger.backends import PACKAGES, backend_module, ledger_url, unsupported
from bank.records import AccountInfo, Receipt

T = TypeVar("T")


class ReadOnlyLedger(Protocol):
    """One backend's read-only access to a ledger (never locks a writer out)."""

    #: How messages name the ledger (a path, or a URL without its password).
    where: str
    #: The file, for a file-backed ledger.
    path: Path | None

    def revision(self) -> str | None: ...
    def read(self, read: Callable[[Connection], T]) -> T: ...
    def close(self) -> None: ...


def open_read_only(db: str | os.PathLike[str] | URL) -> ReadOnlyLedger:
    """The read-only access for a path (an SQLite file) or a SQLAlchemy URL, from the
    backend's `readonly` module (`open_read_only(url)`)."""
    if isinstance(db, URL):
        url = db
    else:
        text = os.fspath(db)
        try:
            url = ledger_url(text)
        except ArgumentError as exc:
            raise UnsupportedLedgerUrl(f"{text}: not a database URL ({exc})") from None
    name = url.get_backend_name()
    if name not in PACKAGES:
        raise unsupported(url)
    opened: ReadOnlyLedger = backend_module(name, "readonly").open_read_only(url)
    return opened


class LedgerReader:
    """Read-only access to a ledger (a path or URL) at a revision this `bank` knows."""

    def __init__(self, db: str | os.PathLike[str] | URL) -> None:
        self._ledger = open_read_only(db)
        self.path = self._ledger.path
        self.where = self._ledger.where
        try:
            revision = self._ledger.revision()
        except BaseException:
            self.close()
            raise
        if revision is None:
            self.close()
            raise NotALedger(f"{self.where} is an empty database, not a ledger")
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
        self._ledger.close()

    def read(self, read: Callable[[Connection], T]) -> T:
        """`read` on one committed snapshot (one read-only transaction)."""
        return self._ledger.read(read)

    def accounts(self) -> list[AccountInfo]:
        """Every account, `@cash` first, from one committed snapshot."""
        return self.read(store.load_accounts)

    def history(self, account_id: int, *, limit: int | None = None) -> list[Receipt]:
        """One account's committed transfers, oldest first."""
        return self.read(lambda conn: list(store.history(conn, account_id, limit=limit)))
