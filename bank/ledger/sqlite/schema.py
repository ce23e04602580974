"""SQLite's side of the schema check: read `sqlite_master`, build the reference in memory.

The backend-independent comparison is `bank.ledger.schema_ref`; this module only
knows where SQLite keeps its schema (the SQL text of every table, index, view and
trigger in `sqlite_master`, the columns in `PRAGMA table_xinfo`) and how to make
the reference: run every migration on a scratch in-memory database, one revision
at a time, reading `sqlite_master` after each.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Hashable
from typing import Any, Final

from bank.ledger.schema_ref import Column, SchemaObject, quiet_alembic, sql_tokens

#: SQLite's planner statistics (written by ANALYZE and `PRAGMA optimize`): they change
#: query plans, never results, so a ledger may have them without being tampered with.
IGNORED_OBJECTS: Final = frozenset({"sqlite_stat1", "sqlite_stat2", "sqlite_stat3", "sqlite_stat4"})


def read_schema(cur: Any) -> dict[str, SchemaObject]:
    """Every object in the database of `cur` (an sqlite3 cursor; planner statistics excepted).

    Tables come with their `PRAGMA table_xinfo` columns, used to say which column
    differs.
    """
    rows = cur.execute("SELECT type, name, tbl_name, sql FROM sqlite_master").fetchall()
    schema: dict[str, SchemaObject] = {}
    for kind, name, table, sql in rows:
        # Only the statistics *tables* ANALYZE makes: with writable_schema a trigger can
        # be named sqlite_stat1 too, and that one must not go unseen.
        if name in IGNORED_OBJECTS and kind == "table" and table == name:
            continue
        columns: tuple[Column, ...] = ()
        if kind == "table":
            quoted = '"' + str(name).replace('"', '""') + '"'
            columns = tuple(tuple(c) for c in cur.execute(f"PRAGMA table_xinfo({quoted})"))
        text = sql if isinstance(sql, str) else None
        # No SQL text: an index SQLite made itself for a UNIQUE or PRIMARY KEY constraint.
        shown = (
            None
            if text is not None
            else f"{kind} {name} on {table} (made by SQLite for a constraint)"
        )
        schema[str(name)] = SchemaObject(
            str(kind), str(name), str(table), text, sql_tokens(text), columns, shown
        )
    return schema


def reference_key(server: object) -> Hashable:
    """One reference serves every SQLite ledger of this process (`server` is not needed)."""
    del server
    return "sqlite"


def build_reference(server: object = None) -> dict[str, dict[str, SchemaObject]]:
    """Revision -> schema, by running every migration on a scratch in-memory database."""
    del server
    # Imported on first use: the reference is built once per process.
    from alembic import command
    from sqlalchemy import create_engine
    from sqlalchemy.pool import StaticPool

    from bank.ledger.migrate import ALEMBIC_LOCK, alembic_config, revisions_oldest_first

    raw = sqlite3.connect(":memory:", check_same_thread=False)
    raw.execute("PRAGMA foreign_keys = ON")  # as on a ledger's own connections
    engine = create_engine("sqlite://", creator=lambda: raw, poolclass=StaticPool)
    schemas: dict[str, dict[str, SchemaObject]] = {}
    try:
        # Alembic keeps its running context in module globals: one migration at a time.
        with ALEMBIC_LOCK, engine.begin() as conn, quiet_alembic():
            cfg = alembic_config()
            cfg.attributes["connection"] = conn
            for revision in revisions_oldest_first():
                command.upgrade(cfg, revision)
                cur = raw.cursor()
                try:
                    schemas[revision] = read_schema(cur)
                finally:
                    cur.close()
    finally:
        engine.dispose()
        raw.close()
    return schemas
