"""Reading a PostgreSQL ledger without owning it: one REPEATABLE READ READ ONLY transaction.

For `bank.ledger.reader`: no writer lease, no migration, no writes (the server
refuses any in a READ ONLY transaction), and every query of one read sees the
same commit, while a bank goes on writing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError

from bank.errors import BankError, CannotOpenLedger, NotALedger
from bank.ledger import migrate

T = TypeVar("T")


class PostgresReadOnly:
    """Read-only snapshots of one ledger database on a PostgreSQL server."""

    def __init__(self, url: URL) -> None:
        self.path: Path | None = None
        self.where = url.render_as_string(hide_password=True)
        try:
            engine = create_engine(url, pool_size=1, max_overflow=0, pool_pre_ping=True)
        except Exception as exc:  # a driver that is not installed, a malformed URL
            raise CannotOpenLedger(f"{self.where}: cannot connect ({exc})") from None
        self._base = engine
        self._engine: Engine | None = engine.execution_options(
            isolation_level="REPEATABLE READ", postgresql_readonly=True
        )

    def revision(self) -> str | None:
        """The ledger's schema revision (None: an empty database)."""
        engine = self._engine
        assert engine is not None, "closed"
        try:
            return migrate.ledger_revision(engine, self.where)
        except DBAPIError as exc:
            raise self._error(exc) from None

    def read(self, read: Callable[[Connection], T]) -> T:
        """`read` in one REPEATABLE READ READ ONLY transaction: one committed snapshot."""
        engine = self._engine
        assert engine is not None, "closed"
        try:
            with engine.begin() as conn:
                return read(conn)
        except DBAPIError as exc:
            raise self._error(exc) from None

    def close(self) -> None:
        """Release the connection."""
        if self._engine is not None:
            self._base.dispose()
            self._engine = None

    def _error(self, exc: DBAPIError) -> BankError:
        lines = str(exc.orig).splitlines()
        reason = lines[0] if lines else type(exc.orig).__name__
        if "does not exist" in reason and ("relation" in reason or "column" in reason):
            return NotALedger(f"{self.where}: part of the ledger's schema is missing ({reason})")
        return CannotOpenLedger(f"{self.where}: PostgreSQL could not be read ({reason})")


def open_read_only(url: URL) -> PostgresReadOnly:
    """The read-only access to a PostgreSQL ledger (`bank.ledger.reader`'s entry)."""
    return PostgresReadOnly(url)
