"""Fresh, already-migrated ledgers, cheaply: a copy of one migrated empty ledger.

Opening a new ledger runs every migration (about a second here); a property test that
needs a new ledger per example copies a template instead: the file (SQLite) or
`CREATE DATABASE ... TEMPLATE` (PostgreSQL). The copy is the very ledger a first
`Bank.open` leaves behind, so the engine and the audit see a fresh ledger.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from pathlib import Path

from sqlalchemy.engine import make_url

import bank
from tests import postgres
from tests.conftest import LedgerDb

_copies = itertools.count(1)


class LedgerTemplate:
    """Migrated empty ledgers on `ledger`'s backend; `new()` makes one, `drop()` the template."""

    def __init__(self, ledger: LedgerDb) -> None:
        self.template = ledger.fresh()
        bank.Bank.open(self.template.db).close()  # migrated, `@cash` opened, released

    def new(self) -> LedgerDb:
        """A copy of the template (drop it with its `drop()`)."""
        if self.template.server is None:
            directory = Path(tempfile.mkdtemp(prefix="ledger-", dir=self.template.path.parent))
            shutil.copyfile(self.template.path, directory / "ledger.db")
            return LedgerDb.sqlite(directory / "ledger.db")
        import psycopg

        server = self.template.server
        source = make_url(self.template.url).database
        name = f"{source}_c{os.getpid()}_{next(_copies)}"
        with psycopg.connect(postgres.libpq_conninfo(server.url), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{source}"')
        url = make_url(self.template.url).set(database=name).render_as_string(hide_password=False)
        return LedgerDb("postgres", url, url, server)

    def drop(self) -> None:
        self.template.drop()
