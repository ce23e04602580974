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
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Protocol, TypeVar

from sqlalchemy import Connection
from sqlalchemy.engine import URL
from sqlalchemy.exc import ArgumentError

from bank.errors import LedgerVersionError, NotALedger, UnsupportedLedgerUrl
from bank.ledger import migrate, store
from bank.ledger.backends import PACKAGES, backend_module, ledger_url, unsupported
from bank.ledger.postings import POSTINGS_REVISION
from bank.limits import HISTORY_LIMIT_DEFAULT
from bank.records import AccountInfo, AccountSummary, Receipt

#: The first revision whose rows carry their running balances (balances as of a seq).
RUNNING_BALANCES_REVISION = "0005"
#: The first revision with holds (the `open_holds` view).
HOLDS_REVISION = "0006"

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
        #: What the ledger's revision has: running balances and 'close' events (0005),
        #: holds (0006), `postings` (0007; else it is read with revision 0005's queries,
        #: `store.history_page(..., postings=False)`).
        self._running = self._reaches(RUNNING_BALANCES_REVISION)
        self._holds = self._reaches(HOLDS_REVISION)
        self.postings = self._reaches(POSTINGS_REVISION)

    def _reaches(self, revision: str) -> bool:
        """Whether the ledger's revision is `revision` or newer."""
        revisions = migrate.revisions_oldest_first()
        return self.revision in revisions and revisions.index(self.revision) >= revisions.index(
            revision
        )

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

    def account_summaries(self) -> list[AccountSummary]:
        """Every account, `@cash` first, with what its pending holds reserve, what it may
        still spend and whether it is closed, from one committed snapshot (a ledger at an
        older revision has no holds or closes: none are shown)."""
        holds, closes = self._holds, self._running
        return self.read(
            lambda conn: store.load_account_summaries(conn, holds=holds, closes=closes)
        )

    def history(
        self, account: int, *, after_seq: int = 0, limit: int = HISTORY_LIMIT_DEFAULT
    ) -> list[Receipt]:
        """One page of the account's committed transfers, as `Bank.history`: up to `limit`
        receipts with seq greater than `after_seq`, ascending, from one snapshot.

        Raises `AccountNotFound` (no such account in the ledger), `InvalidCommand` (an
        `after_seq` or `limit` out of range).
        """
        account_id = store.check_account(account, "history.account")
        after = store.check_seq(after_seq, "history.after_seq")
        size = store.check_limit(limit, "history.limit")
        return self.read(lambda conn: self._page(conn, account_id, after, size))

    def iter_history(
        self, account: int, *, after_seq: int = 0, page: int = HISTORY_LIMIT_DEFAULT
    ) -> Iterator[Receipt]:
        """Stream the account's whole committed history after `after_seq`, ascending,
        `page` receipts per read (as `Bank.iter_history`: memory of one page; the ledger
        is append-only, so pages read from successive snapshots never skip or repeat a
        row). Arguments are checked at once; `AccountNotFound` if the account is not in
        the ledger."""
        account_id = store.check_account(account, "iter_history.account")
        after = store.check_seq(after_seq, "iter_history.after_seq")
        size = store.check_limit(page, "iter_history.page")
        self.read(lambda conn: store.account_balance(conn, account_id))  # exists, or raise

        def read_page(after: int, limit: int) -> list[Receipt]:
            return self.read(
                lambda conn: store.history_page(
                    conn, account_id, after, limit, postings=self.postings
                )
            )

        return store.iter_history(read_page, after, size)

    def balance(self, account: int, *, at_seq: int | None = None) -> int:
        """The account's committed balance, or with `at_seq` its balance right after
        transfer `at_seq` (as `Bank.balance`: key look-ups, 0 before its first row).

        Raises `AccountNotFound`, `InvalidCommand` (an `at_seq` out of range),
        `SeqBeyondHead` (past the snapshot's last transfer), `LedgerVersionError` (a
        ledger before revision 0005 has no running balances: `bank init` upgrades it).
        """
        account_id = store.check_account(account, "balance.account")
        if at_seq is None:
            return self.read(lambda conn: store.account_balance(conn, account_id))
        seq = store.check_seq(at_seq, "balance.at_seq")
        self._need_running_balances()

        def read(conn: Connection) -> int:
            store.account_balance(conn, account_id)  # exists, or AccountNotFound
            return store.committed_balance_at(
                conn, account_id, seq, self.where, postings=self.postings
            )

        return self.read(read)

    def balances_at(self, seq: int) -> dict[int, int]:
        """Every account open at `seq` -> its balance right after that transfer, from one
        snapshot (`store.BALANCES_AT_SQL`, the query the README documents for auditors).
        Raises as `balance` does for `seq`."""
        at = store.check_seq(seq, "balances_at.seq")
        self._need_running_balances()

        def read(conn: Connection) -> dict[int, int]:
            store.committed_balance_at(conn, 0, at, self.where, postings=self.postings)
            return store.balances_at(conn, at, postings=self.postings)

        return self.read(read)

    def _page(self, conn: Connection, account_id: int, after: int, size: int) -> list[Receipt]:
        store.account_balance(conn, account_id)  # exists, or AccountNotFound
        return store.history_page(conn, account_id, after, size, postings=self.postings)

    def _need_running_balances(self) -> None:
        if not self._running:
            raise LedgerVersionError(
                f"{self.where} is at schema revision {self.revision}, whose rows carry no "
                f"running balances (revision {RUNNING_BALANCES_REVISION}): balances as of a "
                f"seq need an upgrade (`bank init --db {self.where}`)"
            )
