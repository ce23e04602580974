"""`SqliteBackend`: a ledger in one SQLite file, locked by an flock (`bank.ledger.backend`)."""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.engine import URL

from bank.errors import BankError, CannotAudit, NotALedger, UnsupportedLedgerUrl
from bank.ledger import migrate
from bank.ledger.backend import BatchWriter, Durability, LedgerSnapshot, OwnerLock
from bank.ledger.sqlite import engine as sqlite_engine
from bank.ledger.sqlite.lock import FileLock, side_file_size
from bank.ledger.sqlite.preflight import (
    SQLITE_MAGIC,
    check_not_read_only,
    check_sqlite_header,
    roll_back_hot_journal,
)
from bank.ledger.sqlite.url import resolve_sqlite_target
from bank.ledger.sqlite.writer import SqliteBatchWriter


class SqliteBackend:
    """One ledger file. Once it is locked, nothing here opens or closes the file outside
    SQLite (the header is read on the lock's descriptor), so an owner elsewhere in this
    process keeps its locks."""

    name = "sqlite"

    def __init__(self, url: URL) -> None:
        target = resolve_sqlite_target(url)
        if target is None:
            raise UnsupportedLedgerUrl(
                f"{url.render_as_string(hide_password=True)}: not a SQLite URL"
            )
        self._create = target.create
        self.url: URL = target.engine_url
        self.path: Path | None = target.path
        self.file: Path = target.path
        self.where = str(target.path)
        self._lock: FileLock | None = None

    def _held(self, lock: OwnerLock) -> FileLock:
        assert self._lock is not None and lock is self._lock, "not this backend's lock"
        return self._lock

    def acquire(self, *, create: bool, wait_s: float) -> FileLock:
        """The flock on the file (`LedgerBusy` if another bank holds it past `wait_s`)."""
        path = self.file
        if path.is_dir():
            raise NotALedger(f"{path} is a directory, not a ledger file")
        if not path.parent.is_dir():
            raise NotALedger(f"{path.parent} does not exist: cannot create a ledger there")
        self._lock = FileLock(path, create=create and self._create, wait_s=wait_s)
        return self._lock

    def preflight(self, lock: OwnerLock) -> str | None:
        """Writable place, no interrupted write, SQLite's header, then the revision read
        through a read-only connection: even the WAL pragma of a normal connection would
        rewrite the header of a file that is not a ledger."""
        held = self._held(lock)
        check_not_read_only(held.path)
        # First undo an interrupted write (e.g. a kill while the file was being
        # created): until then page 1 may still be zeros.
        roll_back_hot_journal(held.path)
        check_sqlite_header(held.read_header(len(SQLITE_MAGIC)), held.path)
        if held.size <= 0 and side_file_size(held.path, "-wal") <= 0:
            return None
        probe = sqlite_engine.create_readonly_engine(held.path)
        try:
            return migrate.ledger_revision(probe, self.where)
        finally:
            probe.dispose()

    def create_engine(self, durability: Durability, lock: OwnerLock) -> Engine:
        return sqlite_engine.create_ledger_engine(self.url, durability, lock=self._held(lock))

    def check_writable(self, engine: Engine) -> None:
        sqlite_engine.check_writable(engine)

    def batch_writer(self, engine: Engine) -> BatchWriter:
        return SqliteBatchWriter(engine)

    def snapshot(self, *, after_stale: bool = False) -> AbstractContextManager[LedgerSnapshot]:
        """The audit's read-only snapshot: `immutable` for a file at rest that no bank of
        this process owns, unless an immutable read already found it changing."""
        from bank.ledger.sqlite.snapshot import open_snapshot  # the audit's, not the bank's

        return open_snapshot(self, immutable_ok=not after_stale)

    def open_error(self, exc: BaseException) -> BankError | None:
        if not sqlite_engine.is_driver_error(exc):
            return None
        return sqlite_engine.open_error(exc, self.where)

    def check_still_held(self, lock: OwnerLock) -> None:
        held = self._held(lock)
        try:
            st = os.stat(held.path)
            moved = (st.st_dev, st.st_ino) != held.identity
        except OSError:
            moved = True
        if moved:
            raise CannotAudit(
                f"{held.path} is no longer the file this bank holds (renamed, replaced "
                "or re-linked while it runs): audit the ledger at rest instead"
            )

    def discard_created(self, lock: OwnerLock) -> None:
        """Remove the file (and side files) if this open created it; the lock stays held."""
        self._held(lock).remove_created()
