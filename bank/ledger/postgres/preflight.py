"""Is this database a ledger, and at which revision? Read through the catalog; writes nothing."""

from __future__ import annotations

from typing import Any

import psycopg

from bank.errors import LedgerCorrupt, LedgerVersionError, NotALedger
from bank.ledger.migrate import LEDGER_TABLES, head_revision, known_revisions
from bank.ledger.models import Base

#: Relations of the ledger's schema (`current_schema()`, normally `public`) that count
#: as "a database of another program": tables, views, foreign and partitioned tables.
_RELATIONS_SQL = (
    "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p', 'v', 'm', 'f')"
)


def ledger_revision(conn: psycopg.Connection[Any], where: str) -> str | None:
    """The revision of the ledger in `conn`'s database (None: empty, a new ledger).

    Raises `NotALedger` for a database holding another program's tables (or ledger
    tables without `alembic_version`), `LedgerCorrupt` for several revisions, and
    `LedgerVersionError` for a revision this bank does not know.
    """
    conn.execute("SET default_transaction_read_only = on")  # a preflight writes nothing
    schema_row = conn.execute("SELECT current_schema()").fetchone()
    schema = schema_row[0] if schema_row else None
    if schema is None:
        raise NotALedger(f"{where}: no schema on the search_path to hold a ledger")
    tables = {row[0] for row in conn.execute(_RELATIONS_SQL)}
    if "alembic_version" not in tables:
        if not tables:
            return None
        if tables & LEDGER_TABLES:
            raise NotALedger(
                f"{where}: has ledger tables but no schema revision "
                "(alembic_version is missing): refusing to touch it"
            )
        listed = ", ".join(sorted(tables)[:5])
        more = f" and {len(tables) - 5} more" if len(tables) > 5 else ""
        raise NotALedger(
            f"{where}: schema {schema!r} holds another program's tables ({listed}{more}); "
            "a ledger needs an empty database (or schema) of its own"
        )
    versions = [row[0] for row in conn.execute("SELECT version_num FROM alembic_version")]
    if len(versions) > 1:
        raise LedgerCorrupt(
            f"{where}: alembic_version holds more than one schema revision (edited?): "
            "refusing to touch it; run `bank audit`"
        )
    if not versions:
        if tables - {"alembic_version"}:
            raise NotALedger(
                f"{where}: alembic_version is empty but tables exist: refusing to touch it"
            )
        return None
    current = str(versions[0])
    if current not in known_revisions():
        raise LedgerVersionError(
            f"{where}: schema revision {current!r} is newer than this bank "
            f"knows (newest known: {head_revision()!r}); upgrade bank to open it"
        )
    return current


def drop_ledger_sql() -> list[str]:
    """Statements that remove a ledger's tables (and, by CASCADE, its views) and revision."""
    tables = [t.name for t in reversed(Base.metadata.sorted_tables)]
    return [f"DROP TABLE IF EXISTS {name} CASCADE" for name in [*tables, "alembic_version"]]
