"""Shared fixtures: real ledgers on both backends, and a watchdog for threaded tests.

Ledgers on both backends: a test that takes `ledger_db` runs twice, ids `[sqlite]` and
`[postgres]`; `ledger_db` is a `LedgerDb`:

    def test_x(ledger_db: LedgerDb) -> None:
        with bank.Bank.open(ledger_db.db) as b: ...     # a file path, or a URL string
        if ledger_db.backend == "sqlite": ...           # "sqlite" or "postgres"
        ledger_db.url                                   # an SQLAlchemy URL on both
        ledger_db.query("SELECT COUNT(*) FROM transfers")   # rows, read beside the engine
        ledger_db.execute("UPDATE accounts SET ...")        # an edit behind its back

`make_ledger_bank` opens banks on `ledger_db` (like `make_bank` on `ledger_path`).
A fixture of a wider scope takes `params=LEDGER_PARAMS` and calls `new_ledger(request, dir)`.
A PostgreSQL-only test takes `pg_url` (the URL of a fresh empty database on the
session's server, dropped afterwards) or `postgres_server` (a `tests.postgres.Server`).
The server is `BANK_TEST_POSTGRES_URL` or a throwaway cluster (see `tests/postgres.py`);
without one the PostgreSQL variants skip with the reason, or fail under
`BANK_REQUIRE_POSTGRES=1`. `-m "not postgres"` deselects them.
"""

from __future__ import annotations

import os
import sqlite3
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import pytest

import bank
from bank import lockcheck
from tests import postgres

# -- the suite's scratch files live in RAM -------------------------------------------------
# tmp_path, tempfile's directories and the children the tests start (TMPDIR is inherited)
# go to a tmpfs when the machine has one and TMPDIR does not name another place: a ledger
# test then waits on no disk's fsync. No test can tell: every crash test kills processes,
# never the machine, so the page cache holds what a disk would; failing fsync and write
# come from the LD_PRELOAD shim (tests/faults.py), full and read-only disks from tmpfs
# mounts of their own.
if "TMPDIR" not in os.environ and postgres.ram_dir_usable():
    os.environ["TMPDIR"] = str(postgres.RAM_DIR)
    tempfile.tempdir = None  # forget a directory chosen before: the next use reads TMPDIR

Backend = Literal["sqlite", "postgres"]
BACKENDS: tuple[Backend, ...] = ("sqlite", "postgres")

#: Test modules that run with the lock-order checker on (and fast thread switching).
_LOCK_CHECKED = frozenset(
    {
        "tests.test_contention",
        "tests.test_stateful",
        "tests.test_hangs",
        "tests.test_outcomes",
        "tests.test_batch",
        "tests.test_holds_contention",
        "tests.test_blocking_calls",
    }
)
#: The switch interval of a lock-checked module, unless it sets `SWITCH_INTERVAL_S`.
SWITCH_INTERVAL_S = 1e-5


@pytest.fixture(autouse=True)
def _lock_order_checked(request: pytest.FixtureRequest) -> Iterator[None]:
    """In `_LOCK_CHECKED` modules, check every lock's order; any violation fails the test.

    Violations are recorded even when the `LockOrderViolation` was swallowed (a
    worker turns exceptions into answers), so the test fails at teardown.
    """
    if request.module.__name__ not in _LOCK_CHECKED and not lockcheck.is_enabled():
        yield  # with BANK_LOCK_CHECK=1 in the environment, every module is checked
        return
    lockcheck.reset()
    old = sys.getswitchinterval()
    sys.setswitchinterval(getattr(request.module, "SWITCH_INTERVAL_S", SWITCH_INTERVAL_S))
    try:
        with lockcheck.enabled(True):
            yield
    finally:
        sys.setswitchinterval(old)
    found = lockcheck.violations()
    lockcheck.reset()
    assert not found, f"lock-order violations: {found}"


def wait_until(
    predicate: Callable[[], bool], what: str = "the condition", timeout_s: float = 10.0
) -> None:
    """Poll `predicate` until it holds; a watchdog failure naming `what` instead of a hang."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"watchdog: {what} within {timeout_s} s"
        time.sleep(0.002)


@pytest.fixture
def ledger_path(tmp_path: Path) -> Path:
    """A ledger file path that does not exist yet."""
    return tmp_path / "ledger.db"


@pytest.fixture
def make_bank(ledger_path: Path) -> Iterator[Callable[..., bank.Bank]]:
    """Open banks on `ledger_path` (options passed through); all are closed at teardown."""
    opened: list[bank.Bank] = []

    def _make(**options: object) -> bank.Bank:
        b = bank.Bank.open(ledger_path, **options)  # type: ignore[arg-type]
        opened.append(b)
        return b

    yield _make
    for b in opened:
        b.close()


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """Switch threads as often as CPython allows, to shake out races."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def run_threads(targets: list[Callable[[], None]], *, timeout_s: float) -> None:
    """Start all targets together, join them, and fail (not hang) past `timeout_s`.

    Exceptions raised in a thread fail the test.
    """
    errors: list[BaseException] = []
    start = threading.Event()

    def wrap(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            start.wait()
            try:
                fn()
            except BaseException as exc:
                errors.append(exc)

        return run

    threads = [
        threading.Thread(target=wrap(t), name=f"test-{i}", daemon=True)
        for i, t in enumerate(targets)
    ]
    for t in threads:
        t.start()
    start.set()
    for t in threads:
        t.join(timeout_s)
    alive = [t.name for t in threads if t.is_alive()]
    assert not alive, f"watchdog: threads still running after {timeout_s} s (deadlock?): {alive}"
    if errors:
        raise errors[0]


def bank_threads() -> list[str]:
    """Names of the engine's threads still alive in this process."""
    return [
        t.name for t in threading.enumerate() if t.name.startswith(("bank-worker", "bank-ledger"))
    ]


def working_threads() -> list[str]:
    """The bank threads that do its work: workers and the writer (not the PostgreSQL
    lease's monitor, which only watches the writer lease)."""
    return [name for name in bank_threads() if name != "bank-ledger-lease"]


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[postgres.Server]:
    """The session's PostgreSQL server (skip, or fail under BANK_REQUIRE_POSTGRES=1, without one)."""
    try:
        server = postgres.start_server()
    except postgres.NoPostgres as exc:
        reason = f"no PostgreSQL server: {exc}"
        if postgres.required():
            pytest.fail(f"{reason} ({postgres.ENV_REQUIRE}=1 requires one)", pytrace=False)
        pytest.skip(reason)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(postgres_server: postgres.Server) -> Iterator[str]:
    """The SQLAlchemy URL of a new empty database, dropped (sessions forced off) afterwards."""
    with postgres_server.database() as url:
        yield url


@dataclass(frozen=True)
class LedgerDb:
    """Where a test's ledger lives: `db` is what `Bank.open` takes, `url` its SQLAlchemy URL."""

    backend: Backend
    db: Path | str
    url: str
    #: The PostgreSQL server the database is on (None for SQLite).
    server: postgres.Server | None = None

    @classmethod
    def sqlite(cls, path: Path) -> LedgerDb:
        return cls("sqlite", path, f"sqlite:///{path}")

    def fresh(self) -> LedgerDb:
        """Another empty ledger on the same backend (a new file beside this one, or a new
        database on the same server); `drop()` it when done (a property test makes many)."""
        if self.server is None:
            directory = Path(tempfile.mkdtemp(prefix="ledger-", dir=self.path.parent))
            return LedgerDb.sqlite(directory / "ledger.db")
        url = self.server.create_database()
        return LedgerDb("postgres", url, url, self.server)

    def drop(self) -> None:
        """Delete the ledger: its file and side files, or its database."""
        if self.server is None:
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
        else:
            self.server.drop_database(self.url)

    @property
    def path(self) -> Path:
        """The ledger file (SQLite only)."""
        assert isinstance(self.db, Path), f"a {self.backend} ledger has no file"
        return self.db

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        """Rows of `sql` (no parameters; portable SQL), read beside the engine, not through it.

        SQLite: plain `sqlite3`, read-only; PostgreSQL: plain psycopg. A `numeric` with no
        fraction (PostgreSQL's SUM of bigints) comes back as an int, as on SQLite.
        """
        if self.backend == "sqlite":
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
            try:
                return conn.execute(sql).fetchall()
            finally:
                conn.close()
        import psycopg

        with psycopg.connect(postgres.libpq_conninfo(self.url), autocommit=True) as pg:
            return [tuple(_plain(v) for v in row) for row in pg.execute(sql).fetchall()]

    def settle(self, timeout_s: float = 10.0) -> None:
        """Wait until no other session is on this ledger (PostgreSQL; SQLite: nothing to do).

        A SIGKILLed client's backend goes on with what the client had already sent, a
        COMMIT included, until it reads the closed socket: a check that reads the ledger
        before then can see it change between two of its queries.
        """
        if self.server is None:
            return
        import psycopg

        deadline = time.monotonic() + timeout_s
        with psycopg.connect(postgres.libpq_conninfo(self.url), autocommit=True) as pg:
            while True:
                others = pg.execute(
                    "SELECT pid, state, query FROM pg_stat_activity WHERE datname = "
                    "current_database() AND pid <> pg_backend_pid() "
                    "AND backend_type = 'client backend'"
                ).fetchall()
                if not others:
                    return
                assert time.monotonic() < deadline, f"sessions still on the ledger: {others}"
                time.sleep(0.01)

    def execute(self, *statements: str) -> None:
        """Run `statements` in one transaction on the ledger, behind the engine's back."""
        if self.backend == "sqlite":
            conn = sqlite3.connect(self.path, isolation_level=None)
            try:
                conn.execute("BEGIN IMMEDIATE")
                for sql in statements:
                    conn.execute(sql)
                conn.execute("COMMIT")
            finally:
                conn.close()
            return
        import psycopg

        with psycopg.connect(postgres.libpq_conninfo(self.url)) as pg:
            for sql in statements:
                pg.execute(sql)

    def sabotage(self, message: str) -> None:
        """From now on every insert into `transfers` fails with `message` (a trigger)."""
        if self.backend == "sqlite":
            self.execute(
                "CREATE TRIGGER sabotage BEFORE INSERT ON transfers "
                f"BEGIN SELECT RAISE(ABORT, '{message}'); END"
            )
        else:
            self.execute(
                "CREATE FUNCTION sabotage() RETURNS trigger LANGUAGE plpgsql "
                f"AS $$ BEGIN RAISE EXCEPTION '{message}'; END $$",
                "CREATE TRIGGER sabotage BEFORE INSERT ON transfers "
                "FOR EACH ROW EXECUTE FUNCTION sabotage()",
            )

    def repair(self) -> None:
        """Undo `sabotage`."""
        if self.backend == "sqlite":
            self.execute("DROP TRIGGER sabotage")
        else:
            self.execute("DROP TRIGGER sabotage ON transfers", "DROP FUNCTION sabotage()")


def _plain(value: object) -> object:
    if isinstance(value, Decimal) and value == value.to_integral_value():
        return int(value)
    return value


#: The params of every fixture over both backends (ids `sqlite`, `postgres`).
LEDGER_PARAMS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
]


def new_ledger(request: pytest.FixtureRequest, directory: Path) -> LedgerDb:
    """An empty ledger on `request.param`'s backend: a file in `directory`, or a new
    database on the session's server (the caller drops it), for fixtures of any scope."""
    if request.param == "sqlite":
        return LedgerDb.sqlite(directory / "ledger.db")
    server: postgres.Server = request.getfixturevalue("postgres_server")
    url = server.create_database()
    return LedgerDb("postgres", url, url, server)


@pytest.fixture(params=LEDGER_PARAMS)
def ledger_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LedgerDb]:
    """A ledger that does not exist yet (an empty database), on each backend in turn."""
    ledger = new_ledger(request, tmp_path)
    yield ledger
    if ledger.server is not None:
        ledger.drop()


@pytest.fixture
def make_ledger_bank(ledger_db: LedgerDb) -> Iterator[Callable[..., bank.Bank]]:
    """Open banks on `ledger_db` (options passed through); all are closed at teardown."""
    opened: list[bank.Bank] = []

    def _make(**options: object) -> bank.Bank:
        b = bank.Bank.open(ledger_db.db, **options)  # type: ignore[arg-type]
        opened.append(b)
        return b

    yield _make
    for b in opened:
        b.close()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test on the PostgreSQL server carries the `postgres` mark (`-m "not postgres"`)."""
    for item in items:
        if "postgres_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.postgres)
