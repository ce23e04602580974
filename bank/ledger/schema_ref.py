"""The schema each revision must have, derived by running the shipped migrations.

The audit never trusts a list of objects written by hand, nor the revision number
a ledger claims: it runs the Alembic migrations that ship with the package on a
scratch in-memory SQLite database, one revision at a time, and records
`sqlite_master` after each (type, name, table and SQL text of every table, column
list, constraint, index, view and trigger). A ledger's own `sqlite_master` is then
compared object by object with the one of the revision it claims: an object that
is missing, extra or different in any token is reported. A new migration is
covered the moment it ships, with no list to update.

The reference is built once per process (a few milliseconds; `reference_schemas`)
and cached. SQL is compared token by token (`sql_tokens`): whitespace, comments and
the case of keywords and bare names are ignored, string literals and quoted names
are compared exactly, so `'deposit'` and `'DEPOSIT'` differ.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

#: SQLite's planner statistics (written by ANALYZE and `PRAGMA optimize`): they change
#: query plans, never results, so a ledger may have them without being tampered with.
IGNORED_OBJECTS: Final = frozenset({"sqlite_stat1", "sqlite_stat2", "sqlite_stat3", "sqlite_stat4"})

#: (cid, name, declared type, notnull, default, pk, hidden) as PRAGMA table_xinfo gives them.
Column = tuple[int, str, str, int, str | None, int, int]

_TOKEN: Final = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<comment>--[^\n]*|/\*.*?(?:\*/|\Z))
  | (?P<literal>'(?:[^']|'')*'?)
  | (?P<quoted>"(?:[^"]|"")*"?|`(?:[^`]|``)*`?|\[[^\]]*\]?)
  | (?P<word>[A-Za-z_\u0080-\U0010ffff][A-Za-z0-9_$\u0080-\U0010ffff]*)
  | (?P<number>0[xX][0-9A-Fa-f]+|(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<operator>->>|->|<>|<=|>=|!=|==|<<|>>|\|\|)
  | (?P<other>.)
    """,
    re.VERBOSE | re.DOTALL,
)
_ASCII_LOWER: Final = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def sql_tokens(sql: str | None) -> tuple[str, ...]:
    """The statement as SQLite reads it: its tokens, without whitespace or comments.

    Keywords and bare names are case-folded (ASCII only, as SQLite folds them);
    string literals and quoted names keep their exact text; a trailing `;` is dropped.
    """
    return () if sql is None else _tokens(sql)


@lru_cache(maxsize=256)
def _tokens(sql: str) -> tuple[str, ...]:
    # Cached: a sound ledger's SQL is the reference's, text for text, at every audit.
    tokens: list[str] = []
    for match in _TOKEN.finditer(sql):
        group = match.lastgroup
        if group in {"space", "comment"}:
            continue
        text = match.group()
        tokens.append(text.translate(_ASCII_LOWER) if group == "word" else text)
    while tokens and tokens[-1] == ";":
        tokens.pop()
    return tuple(tokens)


@dataclass(frozen=True, slots=True)
class SchemaObject:
    """One row of `sqlite_master` (its SQL as tokens), plus a table's columns."""

    type: str
    name: str
    table: str
    sql: str | None
    tokens: tuple[str, ...]
    columns: tuple[Column, ...] = ()


#: A database's schema: object name -> object (SQLite names share one namespace).
Schema = Mapping[str, SchemaObject]


@dataclass(frozen=True, slots=True)
class Difference:
    """One way a ledger's schema differs from its revision's: `name` and what is wrong."""

    name: str
    message: str
    expected: str | None
    found: str | None


def read_schema(cur: sqlite3.Cursor) -> dict[str, SchemaObject]:
    """Every object in the database of `cur` (planner statistics excepted).

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
        schema[str(name)] = SchemaObject(
            str(kind), str(name), str(table), text, sql_tokens(text), columns
        )
    return schema


# -- the reference -----------------------------------------------------------------------

#: revision -> schema, filled once (under the lock) by `reference_schemas`.
_reference: dict[str, dict[str, SchemaObject]] = {}
_reference_lock = threading.Lock()


def reference_schemas() -> Mapping[str, Schema]:
    """Revision -> the schema the shipped migrations create up to it (oldest first).

    Built on first use by running every migration on a scratch in-memory database,
    then cached for the life of the process. Raises whatever Alembic raises if the
    installed migrations cannot run (a broken installation).
    """
    with _reference_lock:  # once per audit: never contended for long
        if not _reference:
            _reference.update(_build_reference())
        return _reference


#: Alembic's loggers that announce each step: the audit migrates only a scratch database,
#: and "Running upgrade 0001 -> 0002" in an application's log would say otherwise.
_ALEMBIC_LOGGERS: Final = (
    "alembic.runtime.migration",
    "alembic.runtime.plugins",
    "alembic.ddl.impl",
)


def _drop_record(_record: logging.LogRecord) -> bool:
    return False


def _build_reference() -> dict[str, dict[str, SchemaObject]]:
    # Imported on first use: the reference is built once per process.
    from alembic import command
    from sqlalchemy import create_engine
    from sqlalchemy.pool import StaticPool

    from bank.ledger.migrate import ALEMBIC_LOCK, alembic_config, revisions_oldest_first

    raw = sqlite3.connect(":memory:", check_same_thread=False)
    raw.execute("PRAGMA foreign_keys = ON")  # as on a ledger's own connections (bank.ledger.sqlite)
    engine = create_engine("sqlite://", creator=lambda: raw, poolclass=StaticPool)
    schemas: dict[str, dict[str, SchemaObject]] = {}
    try:
        # Alembic keeps its running context in module globals: one migration at a time
        # (which also keeps the loggers quiet for this run only).
        with ALEMBIC_LOCK, engine.begin() as conn:
            loggers = [logging.getLogger(name) for name in _ALEMBIC_LOGGERS]
            for logger in loggers:
                logger.addFilter(_drop_record)
            try:
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
                for logger in loggers:
                    logger.removeFilter(_drop_record)
    finally:
        engine.dispose()
        raw.close()
    return schemas


# -- comparing ---------------------------------------------------------------------------


def compare_schema(expected: Schema, found: Schema, revision: str) -> list[Difference]:
    """Every difference of `found` from `expected` (the schema of `revision`), by name."""
    differences: list[Difference] = []
    for name in sorted(expected.keys() | found.keys()):
        want = expected.get(name)
        have = found.get(name)
        if have is None:
            assert want is not None
            differences.append(
                Difference(
                    name,
                    f"{want.type} {name} is missing (revision {revision} creates it)",
                    _shown(want),
                    None,
                )
            )
        elif want is None:
            on = f" on {have.table}" if have.table != name else ""
            differences.append(
                Difference(
                    name,
                    f"unexpected {have.type} {name}{on}: no migration up to revision "
                    f"{revision} creates it",
                    None,
                    _shown(have),
                )
            )
        elif (want.type, want.table, want.tokens) != (have.type, have.table, have.tokens):
            differences.append(
                Difference(
                    name,
                    f"{want.type} {name} differs from revision {revision}'s: {_detail(want, have)}",
                    _shown(want),
                    _shown(have),
                )
            )
    return differences


def matching_revisions(found: Schema, schemas: Mapping[str, Schema]) -> list[str]:
    """The revisions whose schema `found` is exactly (for naming a revision set back)."""
    return [rev for rev, schema in schemas.items() if not compare_schema(schema, found, rev)]


def _shown(obj: SchemaObject) -> str:
    """How an object is shown as expected/found: its SQL, or its type and table."""
    if obj.sql is not None:
        return obj.sql.strip()  # exact: a literal's spaces are part of what is compared
    return f"{obj.type} {obj.name} on {obj.table} (made by SQLite for a constraint)"


def _detail(want: SchemaObject, have: SchemaObject) -> str:
    """A short account of how two versions of one object differ."""
    if want.type != have.type:
        return f"it is a {have.type}, not a {want.type}"
    if want.table != have.table:
        return f"it is on {have.table}, not on {want.table}"
    parts: list[str] = []
    if want.type == "table":
        parts.extend(_column_changes(want.columns, have.columns))
    elif want.type == "index":
        parts.extend(_index_changes(want.tokens, have.tokens))
    if not parts:
        parts.append(_first_difference(want.tokens, have.tokens))
    return "; ".join(parts)


def _column_changes(want: Iterable[Column], have: Iterable[Column]) -> list[str]:
    expected = {c[1]: c for c in want}
    found = {c[1]: c for c in have}
    changes = [f"column {n} is missing" for n in expected if n not in found]
    changes += [f"extra column {n} {found[n][2]}".rstrip() for n in found if n not in expected]
    for n in expected.keys() & found.keys():
        _, _, want_type, want_notnull, want_default, want_pk, want_hidden = expected[n]
        _, _, have_type, have_notnull, have_default, have_pk, have_hidden = found[n]
        if want_type.upper() != have_type.upper():
            changes.append(f"column {n} is {have_type or 'untyped'}, not {want_type or 'untyped'}")
        if want_notnull != have_notnull:
            changes.append(f"column {n} {'is' if have_notnull else 'is no longer'} NOT NULL")
        if want_default != have_default:
            changes.append(f"column {n} defaults to {have_default}, not {want_default}")
        if (want_pk, want_hidden) != (have_pk, have_hidden):
            changes.append(f"column {n}'s primary-key or generated role changed")
    if not changes and [c[1] for c in want] != [c[1] for c in have]:
        changes.append("its columns are in another order")
    return sorted(changes)


def _index_changes(want: tuple[str, ...], have: tuple[str, ...]) -> list[str]:
    changes: list[str] = []
    want_unique = want[1:2] == ("unique",)
    if want_unique != (have[1:2] == ("unique",)):
        changes.append("it is no longer UNIQUE" if want_unique else "it became UNIQUE")
    want_where = _where(want)
    have_where = _where(have)
    if want_where != have_where:
        changes.append(
            f"its WHERE clause is {have_where or '(none)'!r}, not {want_where or '(none)'!r}"
        )
    return changes


def _where(tokens: tuple[str, ...]) -> str:
    """The partial-index condition of a CREATE INDEX (its only WHERE)."""
    return " ".join(tokens[tokens.index("where") + 1 :]) if "where" in tokens else ""


def _first_difference(want: tuple[str, ...], have: tuple[str, ...]) -> str:
    at = next(
        (i for i, (a, b) in enumerate(zip(want, have, strict=False)) if a != b),
        min(len(want), len(have)),
    )
    start = max(0, at - 4)

    def around(tokens: tuple[str, ...]) -> str:
        text = " ".join(tokens[start : at + 4])
        return ("… " if start else "") + (text or "(end)") + (" …" if at + 4 < len(tokens) else "")

    return f"text differs at {around(have)!r} (expected {around(want)!r})"
