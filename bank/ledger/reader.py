"""Read a ledger without opening a `Bank`: no file lock, no migration, no writes.

For the CLI's `accounts` and `history`, which must work while a bank is running
on the same file (they read one committed snapshot, like the audit).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType

from bank.errors import NotALedger
from bank.ledger import migrate, store
from bank.ledger.sqlite import create_readonly_engine
from bank.records import AccountInfo, Receipt


class LedgerReader:
    """Read-only access to a ledger file at a revision this `bank` knows."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise NotALedger(f"no ledger at {self.path}")
        if not self.path.is_file():
            raise NotALedger(f"{self.path} is not a regular file")
        migrate.sniff_sqlite_file(self.path)
        self._engine = create_readonly_engine(self.path)
        try:
            revision = migrate.ledger_revision(self._engine)
        except BaseException:
            self._engine.dispose()
            raise
        if revision is None:
            self._engine.dispose()
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
        self._engine.dispose()

    def accounts(self) -> list[AccountInfo]:
        """Every account, `@cash` first, from one committed snapshot."""
        with self._engine.begin() as conn:
            return store.load_accounts(conn)

    def history(self, account_id: int, *, limit: int | None = None) -> list[Receipt]:
        """One account's committed transfers, oldest first."""
        with self._engine.begin() as conn:
            return list(store.history(conn, account_id, limit=limit))
