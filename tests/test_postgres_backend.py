"""The PostgreSQL backend on a real server: URLs, preflight, durability settings, the
refusal of servers that cannot keep the promise, and the batch writer's rows."""

# ruff: noqa: E402  (the importorskip below must run before the backend is imported)
from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

# Skip (not fail) without the driver, before bank.ledger.postgres is imported.
psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (the postgres extra)")

from sqlalchemy import Engine, text
from sqlalchemy.engine import URL, make_url

from bank.errors import (
    CannotOpenLedger,
    LedgerCorrupt,
    LedgerUnavailable,
    LedgerVersionError,
    NotALedger,
    ServerNotDurable,
    UnsupportedLedgerUrl,
)
from bank.ledger.backend import (
    AccountEventRow,
    Backend,
    BatchWriter,
    Durability,
    OwnerLock,
    WriteBatch,
)
from bank.ledger.backends import backend_for
from bank.ledger.migrate import head_revision, upgrade_to_head
from bank.ledger.postgres import PostgresBackend
from bank.ledger.postgres.lease import Lease
from bank.ledger.postgres.url import engine_url
from bank.ledger.postgres.writer import PostgresBatchWriter
from bank.records import Receipt
from tests import postgres
from tests.pg_helpers import make_ledger_tables, throwaway_cluster


@pytest.fixture
def pg_url(postgres_server: postgres.Server) -> Iterator[URL]:
    """A fresh empty database on the shared test server (as a psycopg URL)."""
    with postgres_server.database("pg") as url:
        yield engine_url(make_url(url))


@pytest.fixture
def backend(pg_url: URL) -> Iterator[PostgresBackend]:
    b = PostgresBackend(pg_url)
    yield b
    if b._lease is not None:
        b._lease.release()


def _ledger(backend: PostgresBackend, durability: Durability = Durability.FULL) -> Engine:
    """The bank's engine on a database migrated to head: `@cash`, no account events (the
    tests write their own, from seq 1)."""
    lock = backend.acquire(create=True, wait_s=0)
    engine = backend.create_engine(durability, lock)
    upgrade_to_head(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM account_events")
    return engine


# -- URLs (no server needed) ---------------------------------------------------------------


def test_postgresql_urls_mean_psycopg_and_the_password_stays_hidden() -> None:
    b = backend_for(make_url("postgresql://alice:s3cret@db.example:5433/ledger"))
    assert isinstance(b, PostgresBackend)
    assert b.url.drivername == "postgresql+psycopg"
    assert b.url.password == "s3cret"  # the engine still connects with it
    assert "s3cret" not in b.where and "db.example:5433/ledger" in b.where
    assert b.path is None and b.name == "postgresql"
    assert PostgresBackend(make_url("postgresql+psycopg://h/l")).url.drivername == (
        "postgresql+psycopg"
    )


@pytest.mark.parametrize("driver", ["psycopg2", "asyncpg", "pg8000", "psycopg_async"])
def test_other_postgresql_drivers_are_refused_saying_what_to_write(driver: str) -> None:
    with pytest.raises(UnsupportedLedgerUrl, match=r"postgresql\+psycopg://") as info:
        backend_for(make_url(f"postgresql+{driver}://u:pw@h/ledger"))
    assert driver in str(info.value) and "pw" not in str(info.value)


def test_a_url_without_a_database_is_refused() -> None:
    with pytest.raises(UnsupportedLedgerUrl, match="name the ledger's database"):
        PostgresBackend(make_url("postgresql://h"))


def test_a_missing_driver_names_the_extra_to_install() -> None:
    code = (
        "import sys; sys.modules['psycopg'] = None\n"
        "from sqlalchemy import make_url\n"
        "from bank.errors import UnsupportedLedgerUrl\n"
        "from bank.ledger.backends import backend_for\n"
        "try:\n"
        "    backend_for(make_url('postgresql://h/ledger'))\n"
        "except UnsupportedLedgerUrl as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert "pip install 'bank[postgres]'" in out


# -- opening: errors and preflight ---------------------------------------------------------


def test_no_server_missing_database_and_unknown_user_are_said_apart(pg_url: URL) -> None:
    with pytest.raises(CannotOpenLedger, match="no PostgreSQL server answers"):
        PostgresBackend(pg_url.set(host="127.0.0.1", port=1)).acquire(create=True, wait_s=0)
    with pytest.raises(CannotOpenLedger, match="does not exist on the server"):
        PostgresBackend(pg_url.set(database="pg_no_such_db")).acquire(create=True, wait_s=0)
    with pytest.raises(CannotOpenLedger, match="refused these credentials"):
        PostgresBackend(pg_url.set(username="pg_no_such_user")).acquire(create=True, wait_s=0)


def test_preflight_of_an_empty_database_is_a_new_ledger(backend: PostgresBackend) -> None:
    lock = backend.acquire(create=True, wait_s=0)
    try:
        assert backend.preflight(lock) is None
    finally:
        lock.release()


def _sql(url: URL, *statements: str) -> None:
    from bank.ledger.postgres.url import connect_kwargs

    with psycopg.connect(**connect_kwargs(url), autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


@pytest.mark.parametrize(
    ("statements", "error", "match"),
    [
        (["CREATE TABLE customers (id int)"], NotALedger, "another program's tables"),
        (["CREATE TABLE transfers (seq int)"], NotALedger, "no schema revision"),
        (
            [
                "CREATE TABLE alembic_version (version_num varchar(32))",
                "INSERT INTO alembic_version VALUES ('9999')",
            ],
            LedgerVersionError,
            "'9999' is newer",
        ),
        (
            [
                "CREATE TABLE alembic_version (version_num varchar(32))",
                "INSERT INTO alembic_version VALUES ('0001'), ('0002')",
            ],
            LedgerCorrupt,
            "more than one",
        ),
    ],
)
def test_preflight_refuses_what_is_not_a_ledger_of_this_version(
    pg_url: URL, statements: list[str], error: type[Exception], match: str
) -> None:
    _sql(pg_url, *statements)
    backend = PostgresBackend(pg_url)
    lock = backend.acquire(create=True, wait_s=0)
    try:
        with pytest.raises(error, match=match):
            backend.preflight(lock)
    finally:
        lock.release()


def test_preflight_reads_the_revision_and_writes_nothing(pg_url: URL) -> None:
    _sql(
        pg_url,
        "CREATE TABLE alembic_version (version_num varchar(32))",
        f"INSERT INTO alembic_version VALUES ('{head_revision()}')",
    )
    backend = PostgresBackend(pg_url)
    lock = backend.acquire(create=True, wait_s=0)
    try:
        assert backend.preflight(lock) == head_revision()
    finally:
        lock.release()


def test_a_ledger_this_open_created_and_could_not_finish_is_discarded(pg_url: URL) -> None:
    backend = PostgresBackend(pg_url)
    lock = backend.acquire(create=True, wait_s=0)
    try:
        assert backend.preflight(lock) is None
        make_ledger_tables(pg_url)  # the migrations ran, then the open failed
        backend.discard_created(lock)
        assert backend.preflight(lock) is None  # empty again
        make_ledger_tables(pg_url)
        assert backend.preflight(lock) == head_revision()
        backend.discard_created(lock)  # an existing ledger is never dropped
        assert backend.preflight(lock) == head_revision()
    finally:
        lock.release()


# -- durability and writability ------------------------------------------------------------


@pytest.mark.parametrize(("durability", "setting"), [("full", "on"), ("normal", "off")])
def test_durability_is_set_on_every_connection_of_the_engine(
    backend: PostgresBackend, durability: str, setting: str
) -> None:
    engine = _ledger(backend, Durability(durability))
    try:
        held = [engine.connect() for _ in range(3)]  # three distinct pooled sessions
        try:
            seen = {c.exec_driver_sql("SHOW synchronous_commit").scalar_one() for c in held}
        finally:
            for c in held:
                c.close()
        assert seen == {setting}
        backend.check_writable(engine)
    finally:
        engine.dispose()


def test_a_read_only_database_is_refused_at_open(pg_url: URL) -> None:
    _sql(pg_url, f"ALTER DATABASE {pg_url.database} SET default_transaction_read_only = on")
    backend = PostgresBackend(pg_url)
    lock = backend.acquire(create=True, wait_s=0)
    engine = backend.create_engine(Durability.FULL, lock)
    try:
        with pytest.raises(CannotOpenLedger, match="read-only"):
            backend.check_writable(engine)
    finally:
        engine.dispose()
        lock.release()


def test_a_server_without_fsync_is_refused_for_full_durability() -> None:
    with throwaway_cluster("fsync=off") as url:
        backend = PostgresBackend(url)
        lock = backend.acquire(create=True, wait_s=0)
        try:
            engine = backend.create_engine(Durability.FULL, lock)
            with pytest.raises(ServerNotDurable, match="fsync=off"):
                backend.check_writable(engine)
            engine.dispose()
            engine = backend.create_engine(Durability.NORMAL, lock)
            backend.check_writable(engine)  # 'normal' never promised more
            engine.dispose()
        finally:
            lock.release()


def test_synchronous_replication_without_a_standby_is_refused_not_hung() -> None:
    with throwaway_cluster("synchronous_standby_names=nosuch") as url:
        backend = PostgresBackend(url)
        lock = backend.acquire(create=True, wait_s=0)
        try:
            engine = backend.create_engine(Durability.FULL, lock)
            with pytest.raises(CannotOpenLedger, match="no synchronous standby is connected"):
                backend.check_writable(engine)
            engine.dispose()
            engine = backend.create_engine(Durability.NORMAL, lock)
            backend.check_writable(engine)  # synchronous_commit=off waits for no standby
            engine.dispose()
        finally:
            lock.release()


# -- the batch writer ----------------------------------------------------------------------


def _event(seq: int, account: int, kind: str, limit: int, transfer_seq: int) -> AccountEventRow:
    return AccountEventRow(
        seq, account, kind, f"acct{account}", limit, transfer_seq, 10 + seq, "e" * 64
    )


def _receipt(seq: int, kind: str, key: str | None, amount: int, debit: int, credit: int) -> Receipt:
    return Receipt(seq, kind, key, amount, debit, credit, 1_000 + seq, f"{seq:064x}")


def _rows(engine: Engine, sql: str) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(sql))]


def test_the_batch_writer_writes_exactly_a_batch(backend: PostgresBackend) -> None:
    engine = _ledger(backend)
    big = 2**62
    first = WriteBatch(
        new_accounts=[_event(1, 1, "open", 0, 0), _event(2, 2, "open", 50, 0)],
        events=[_event(1, 1, "open", 0, 0), _event(2, 2, "open", 50, 0)],
        transfers=[
            _receipt(1, "deposit", None, big, 0, 1),
            _receipt(2, "transfer", None, 30, 1, 2),
        ],
        running=[(-big, big), (big - 30, 30)],
        balances={0: -big, 1: big - 30, 2: 30},
    )
    second = WriteBatch(
        events=[_event(3, 2, "limit", 70, 2)],
        limits=[_event(3, 2, "limit", 70, 2)],
        transfers=[_receipt(3, "withdrawal", "k-3", 100, 2, 0)],
        running=[(-70, -big + 100)],
        balances={2: -70, 0: -big + 100},
        keyed=True,
    )
    writer = backend.batch_writer(engine)
    try:
        for batch in (first, second):
            writer.begin()
            writer.write(batch)
            writer.commit()
    finally:
        writer.close()
    assert _rows(engine, "SELECT * FROM accounts ORDER BY id") == [
        (0, "@cash", 2**63 - 1, -big + 100),
        (1, "acct1", 0, big - 30),
        (2, "acct2", 70, -70),
    ]
    assert _rows(
        engine,
        "SELECT seq, kind, key, amount, debit_account_id, credit_account_id, ts_us, hash, "
        "debit_balance, credit_balance FROM transfers ORDER BY seq",
    ) == [
        (*r[:8], *after)  # (the 0006 fields are None: NULL)
        for r, after in zip(
            (*first.transfers, *second.transfers), (*first.running, *second.running), strict=True
        )
    ]
    assert _rows(
        engine,
        "SELECT seq, account_id, kind, name, overdraft_limit, transfer_seq, ts_us, hash "
        "FROM account_events ORDER BY seq",
    ) == [
        (e.seq, e.account_id, e.kind, e.name, e.overdraft_limit, e.transfer_seq, e.ts_us, e.hash)
        for e in (*first.events, *second.events)
    ]
    engine.dispose()


def test_a_rolled_back_batch_leaves_nothing(backend: PostgresBackend) -> None:
    engine = _ledger(backend)
    writer = backend.batch_writer(engine)
    try:
        writer.begin()
        writer.write(
            WriteBatch(
                new_accounts=[_event(1, 1, "open", 0, 0)],
                events=[_event(1, 1, "open", 0, 0)],
                transfers=[_receipt(1, "deposit", "k", 5, 0, 1)],
                running=[(-5, 5)],
                balances={0: -5, 1: 5},
                keyed=True,
            )
        )
        writer.rollback()
        # A batch that fails on the server (seq 1 twice) also leaves nothing.
        writer.begin()
        with pytest.raises(psycopg.Error):
            writer.write(
                WriteBatch(
                    new_accounts=[_event(1, 1, "open", 0, 0)],
                    events=[_event(1, 1, "open", 0, 0)],
                    transfers=[_receipt(1, "deposit", None, 5, 0, 1)] * 2,
                    running=[(-5, 5), (-10, 10)],
                    balances={0: -10, 1: 10},
                )
            )
        writer.rollback()
    finally:
        writer.close()
    assert _rows(engine, "SELECT id, balance FROM accounts") == [(0, 0)]
    assert _rows(engine, "SELECT count(*) FROM transfers") == [(0,)]
    assert _rows(engine, "SELECT count(*) FROM account_events") == [(0,)]
    engine.dispose()


def test_a_writer_whose_lease_is_gone_cannot_write(backend: PostgresBackend) -> None:
    engine = _ledger(backend)
    writer = backend.batch_writer(engine)
    assert backend._lease is not None
    backend._lease.release()  # the lease session ends: the check in each batch fails
    try:
        writer.begin()
        with pytest.raises(LedgerUnavailable, match="no longer holds the writer lease"):
            writer.write(
                WriteBatch(transfers=[_receipt(1, "deposit", None, 5, 0, 0)], running=[(-5, 5)])
            )
        writer.rollback()
    finally:
        writer.close()
    assert _rows(engine, "SELECT count(*) FROM transfers") == [(0,)]
    engine.dispose()


def _conforms(
    url: URL, lease: Lease, writer: PostgresBatchWriter
) -> tuple[Backend, OwnerLock, BatchWriter]:
    """Never called: mypy checks here that the classes satisfy the seam's protocols."""
    return PostgresBackend(url), lease, writer


def test_a_forked_child_closing_everything_leaves_the_parents_sessions_alone(
    backend: PostgresBackend,
) -> None:
    import os

    engine = _ledger(backend)
    writer = backend.batch_writer(engine)
    with engine.connect() as conn:  # a pooled session the child inherits
        conn.exec_driver_sql("SELECT 1")
    assert backend._lease is not None
    event = _event(1, 1, "open", 0, 0)
    try:
        writer.begin()
        writer.write(WriteBatch(new_accounts=[event], events=[event]))
        pid = os.fork()  # mid-transaction, as a fork from any thread of a busy bank may be
        if pid == 0:  # the child closes what it inherited, as a forked Bank would
            writer.rollback()
            writer.close()
            engine.dispose()
            backend._lease.release()
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        writer.commit()
    finally:
        writer.close()
    assert _rows(engine, "SELECT id FROM accounts ORDER BY id") == [(0,), (1,)]
    assert backend._lease.lost() is None
    engine.dispose()
