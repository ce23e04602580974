"""Create or upgrade a ledger to the newest schema, refusing databases that are not ledgers.

Backend-independent (SQLAlchemy and Alembic only): whether a file is a database at
all is the backend's preflight (`bank.ledger.sqlite.preflight`), not this module's.
Alembic is imported by the functions that use it, so `import bank` does not load it
(about a quarter of the import time); the first `Bank.open` does."""

from __future__ import annotations

import itertools
import threading
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine, inspect

from bank.errors import LedgerCorrupt, LedgerVersionError, NotALedger
from bank.ledger.models import Base

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

#: Tables a ledger at any revision has; their presence without `alembic_version` is damage.
LEDGER_TABLES = frozenset({"accounts", "transfers", "account_events"})
#: Alembic keeps the running migration's context in module globals, so two migrations
#: at once in one process (a `Bank.open` and the audit's reference build) would mix up
#: their connections: every run of the migrations in this package holds this lock.
ALEMBIC_LOCK = threading.Lock()


def migrations_dir() -> Path:
    """Where the Alembic environment is: installed as `bank._migrations` (a wheel, or the
    default editable install's import hook), else the checkout's top-level `migrations/`
    (the checkout itself on `sys.path`: `make`'s compat editable install, or PYTHONPATH)."""
    try:
        return Path(str(files("bank._migrations")))
    except ModuleNotFoundError:
        checkout = Path(__file__).resolve().parent.parent.parent / "migrations"
        if not (checkout / "env.py").is_file():
            raise
        return checkout


@cache
def _script() -> ScriptDirectory:
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(migrations_dir()))


def known_revisions() -> frozenset[str]:
    """Every schema revision this version of `bank` can read."""
    return frozenset(rev.revision for rev in _script().walk_revisions())


def revisions_oldest_first() -> list[str]:
    """Every revision from the first to the head (the history is one straight line)."""
    revisions = list(reversed(list(_script().walk_revisions())))
    for older, newer in itertools.pairwise(revisions):
        assert newer.down_revision == older.revision, "the migrations must form one line"
    return [rev.revision for rev in revisions]


def head_revision() -> str:
    """The newest schema revision."""
    head = _script().get_current_head()
    assert head is not None, "the migrations directory has no revisions"
    return head


def alembic_config() -> Config:
    """An Alembic configuration for the shipped migrations (pass a connection in `attributes`)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    return cfg


def missing_tables(engine: Engine) -> list[str]:
    """The tables of the newest schema that the ledger behind `engine` lacks (dropped by hand)."""
    with engine.connect() as conn:
        tables = set(inspect(conn).get_table_names())
    return sorted(set(Base.metadata.tables) - tables)


def ledger_revision(engine: Engine, where: str | None = None) -> str | None:
    """The schema revision of the ledger behind `engine`; None for an empty database.

    Raises `NotALedger` for a database with other tables, `LedgerVersionError`
    for one written by a newer `bank`, `LedgerCorrupt` for several revisions; a driver's
    error (e.g. not a database at all) propagates for the backend to name (`open_error`). Messages name `where` (default: the URL's
    database, which is None for an engine built with a `creator`).
    """
    from alembic.runtime.migration import MigrationContext
    from alembic.util import CommandError

    # Never "None: ...": an engine built with a `creator` has no database in its URL.
    name = where or engine.url.database or engine.url.render_as_string(hide_password=True)
    try:
        with engine.connect() as conn:
            tables = set(inspect(conn).get_table_names())
            current = MigrationContext.configure(conn).get_current_revision()
    except CommandError as exc:  # several rows in alembic_version: not one revision
        raise LedgerCorrupt(
            f"{name}: alembic_version holds more than one schema revision (edited?): "
            "refusing to touch it; run `bank audit`"
        ) from exc
    # A driver error (not a database, unreadable) propagates: the backend names it.
    if current is None:
        if not tables:
            return None
        if tables & LEDGER_TABLES:
            raise NotALedger(
                f"{name}: has ledger tables but no schema revision "
                "(alembic_version is missing): refusing to touch it"
            )
        listed = ", ".join(sorted(tables)[:5])
        raise NotALedger(f"{name}: a database of another program (tables: {listed})")
    if current not in known_revisions():
        raise LedgerVersionError(
            f"{name}: schema revision {current!r} is newer than this bank "
            f"knows (newest known: {head_revision()!r}); upgrade bank to open it"
        )
    return current


def upgrade_to_head(engine: Engine, where: str | None = None) -> str:
    """Bring the ledger to the newest schema (creating it when empty); returns the revision.
    Messages name `where` (as `ledger_revision`)."""
    current = ledger_revision(engine, where)
    head = head_revision()
    if current == head:
        return head
    from alembic import command

    with ALEMBIC_LOCK, engine.begin() as conn:
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    return head


def upgrade_in_transaction(conn: Connection) -> str:
    """Create the newest schema in an empty database inside `conn`'s open transaction (which
    the caller commits or rolls back: `copy_ledger` fills the tables in that same
    transaction, so a failed copy leaves not even the tables). Returns the revision."""
    assert conn.get_transaction() is not None, "the caller's transaction holds the migrations"
    from alembic import command

    with ALEMBIC_LOCK:
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    return head_revision()
