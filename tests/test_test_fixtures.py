"""The test fixtures themselves: a real server with fsync on, empty databases per test, and
`LedgerDb`'s reads and edits beside the engine on both backends."""

from __future__ import annotations

import psycopg
import pytest
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from bank.ledger.migrate import upgrade_to_head
from tests import postgres
from tests.conftest import LedgerDb


def test_the_server_syncs_and_each_test_gets_an_empty_database(pg_url: str) -> None:
    with psycopg.connect(postgres.libpq_conninfo(pg_url)) as conn:
        assert conn.execute("SHOW fsync").fetchone() == ("on",)
        tables = conn.execute(
            "SELECT COUNT(*) FROM pg_tables WHERE schemaname = 'public'"
        ).fetchone()
        assert tables == (0,)


def _migrated(ledger: LedgerDb) -> None:
    engine = create_engine(ledger.url, poolclass=NullPool)
    try:
        upgrade_to_head(engine)
    finally:
        engine.dispose()


def test_ledger_db_reads_edits_and_sabotages_on_both(ledger_db: LedgerDb) -> None:
    _migrated(ledger_db)
    ledger_db.execute("INSERT INTO accounts VALUES (1, 'a', 0, 5)")
    assert ledger_db.query("SELECT id, balance FROM accounts ORDER BY id") == [(0, 0), (1, 5)]
    sums = ledger_db.query("SELECT SUM(balance) FROM accounts")
    assert sums == [(5,)] and type(sums[0][0]) is int  # PostgreSQL's numeric, as an int
    ledger_db.sabotage("no entry")
    insert = (
        "INSERT INTO transfers VALUES "
        "(1, NULL, 'deposit', 0, 1, 5, 0, 'h', -5, 5, NULL, NULL, NULL, NULL)"
    )
    with pytest.raises(Exception, match="no entry"):
        ledger_db.execute(insert)
    ledger_db.repair()
    ledger_db.execute(insert)
    assert ledger_db.query("SELECT seq FROM transfers") == [(1,)]


def test_fresh_ledgers_are_empty_and_dropped(ledger_db: LedgerDb) -> None:
    _migrated(ledger_db)
    other = ledger_db.fresh()
    assert (other.backend, other.server) == (ledger_db.backend, ledger_db.server)
    assert other.url != ledger_db.url
    _migrated(other)
    assert other.query("SELECT COUNT(*) FROM accounts") == [(1,)]
    other.drop()
    if other.backend == "sqlite":
        assert not other.path.exists()
    else:
        assert other.server is not None
        with psycopg.connect(postgres.libpq_conninfo(other.server.url)) as conn:
            name = other.url.rsplit("/", 1)[1]
            found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            assert found.fetchall() == []
