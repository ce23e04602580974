"""`PostgresBackend`: a ledger stored in one PostgreSQL database (the `Backend` protocol)."""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, cast

import psycopg
from sqlalchemy import Engine
from sqlalchemy.engine import URL

from bank.errors import BankError
from bank.ledger.backend import BatchWriter, Durability, LedgerSnapshot, OwnerLock
from bank.ledger.postgres import engine as pg_engine
from bank.ledger.postgres import lease as pg_lease
from bank.ledger.postgres.errors import open_error
from bank.ledger.postgres.preflight import drop_ledger_sql, ledger_revision
from bank.ledger.postgres.url import engine_url, shown
from bank.ledger.postgres.writer import PostgresBatchWriter

if TYPE_CHECKING:
    from bank.ledger.postgres.lease import Lease


class PostgresBackend:
    """A ledger in the database a `postgresql[+psycopg]://` URL names.

    The writer lease is a session advisory lock in that database (`lease.py`); the
    engine's connections carry the durability (`engine.py`); the writer thread sends
    one array-bound statement per batch (`writer.py`).
    """

    name = "postgresql"
    path: Path | None = None

    def __init__(self, url: URL) -> None:
        self.url = engine_url(url)
        self.where = shown(self.url)
        self._lease: Lease | None = None
        self._durability = Durability.FULL
        self._found_empty = False  # preflight saw an empty database: this open creates it

    def acquire(self, *, create: bool, wait_s: float) -> OwnerLock:
        """Take the writer lease (`LedgerBusy` at once, or after `wait_s`); `create` is moot:
        the database must exist, and an empty one becomes a ledger."""
        lease = pg_lease.acquire(self.url, self.where, wait_s=wait_s)
        self._lease = lease
        return lease

    def preflight(self, lock: OwnerLock) -> str | None:
        """The revision of the ledger (None for an empty database); writes nothing."""
        conn = pg_lease.connect(self.url, self.where, application="bank preflight")
        if self._lease is not None:
            self._lease.register(conn)
        try:
            revision = ledger_revision(conn, self.where)
        finally:
            conn.close()
        self._found_empty = revision is None
        return revision

    def create_engine(self, durability: Durability, lock: OwnerLock) -> Engine:
        """The bank's pool, every connection set for `durability` and registered with the
        lease (cut if the server stops answering its probe)."""
        self._durability = durability
        return pg_engine.create_ledger_engine(self.url, durability, self._lease)

    def check_writable(self, engine: Engine) -> None:
        """Refuse a hot standby, a read-only session, missing grants, or (FULL) fsync=off."""
        pg_engine.check_writable(engine, self.where, self._durability)

    def batch_writer(self, engine: Engine) -> BatchWriter:
        """The writer thread's connection; each batch checks the lease taken by `acquire`."""
        return PostgresBatchWriter(engine, self._lease, self.where)

    def snapshot(self, *, after_stale: bool = False) -> AbstractContextManager[LedgerSnapshot]:
        """One REPEATABLE READ READ ONLY snapshot (see `bank.ledger.postgres.snapshot`);
        it is never stale, so `after_stale` changes nothing."""
        from bank.ledger.postgres.snapshot import open_snapshot  # the audit's, when first used

        return cast(AbstractContextManager[LedgerSnapshot], open_snapshot(self))

    def open_error(self, exc: BaseException) -> BankError | None:
        """A specific error for a psycopg failure at open (None if `exc` is not psycopg's)."""
        if isinstance(exc, psycopg.Error) or getattr(exc, "orig", None) is not None:
            return open_error(exc, self.where)
        return None

    def check_still_held(self, lock: OwnerLock) -> None:
        """A server database cannot be renamed under the bank: nothing to check."""

    def discard_created(self, lock: OwnerLock) -> None:
        """Drop the ledger this open created in an empty database and could not finish
        (e.g. refused after the migrations ran), so the database is empty again.

        Only with the lease still held and only if `preflight` found the database empty;
        the migrations themselves run in one transaction (a failure there leaves nothing).
        """
        if not self._found_empty or lock.lost() is not None:
            return
        self._found_empty = False
        conn = pg_lease.connect(self.url, self.where, application="bank discard")
        if self._lease is not None:
            self._lease.register(conn)
        try:
            with conn.transaction():
                for statement in drop_ledger_sql():
                    conn.execute(statement)
        finally:
            conn.close()
