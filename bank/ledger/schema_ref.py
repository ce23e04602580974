"""The schema each revision must have, derived by running the shipped migrations.

The audit never trusts a list of objects written by hand, nor the revision number
a ledger claims: it runs the Alembic migrations that ship with the package on a
scratch database, one revision at a time, and records the schema after each
(every table with its columns, constraint, index, view and trigger). A ledger's
own schema is then compared object by object with the one of the revision it
claims: an object that is missing, extra or different in any token is reported.
A new migration is covered the moment it ships, with no list to update.

This module is backend-independent: the objects, the tokenizer, the comparison.
Where a schema is read and how the reference is built is each backend's:

- `sqlite` (`bank.ledger.sqlite.schema`): `sqlite_master` and `PRAGMA table_xinfo`;
  the reference on a scratch in-memory database.
- `postgresql` (`bank.ledger.postgres.schema`): the catalog (`pg_catalog`,
  `pg_indexes`, `pg_views`, `pg_get_constraintdef`, `pg_get_triggerdef`, ...); the
  reference in a scratch schema on the *same* server, inside a transaction that is
  rolled back (the server's canonical texts are version-specific).

The entry points:

- `read_schema(source, dialect=None)`: the schema of a database, read through a
  SQLAlchemy `Connection` (in its transaction) or a DB-API cursor or connection
  (`sqlite3`, `psycopg`; the dialect is taken from the driver when not given).
- `reference_schemas(dialect, server=None)`: revision -> reference schema,
  oldest first; for `postgresql`, `server` is an `Engine`, URL or URL text of the
  server the ledger is on. Built once per process (per server and version) and cached.
- `compare_schema(expected, found, revision)` and `matching_revisions(found, schemas)`.

SQL is compared token by token (`sql_tokens`): whitespace, comments and the case
of keywords and bare names are ignored, string literals and quoted names are
compared exactly, so `'deposit'` and `'DEPOSIT'` differ.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Hashable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final, Protocol

from sqlalchemy import Connection

from bank.errors import UnsupportedLedgerUrl
from bank.ledger.backends import backend_module, dialect_of_driver

#: (cid, name, declared type, notnull, default, pk, hidden): as SQLite's PRAGMA table_xinfo
#: gives them; other backends fill the same fields from their catalog.
Column = tuple[int, str, str, int, str | None, int, int]

_TOKEN: Final = re.compile(
    r"""
    (?P<space>\s+)
  | (?P<comment>--[^\n]*|/\*.*?(?:\*/|\Z))
  | (?P<literal>'(?:[^']|'')*'?)
  | (?P<quoted>"(?:[^"]|"")*"?|`(?:[^`]|``)*`?|\[[^\]]*\]?)
  | (?P<word>[A-Za-z_\u0080-\U0010ffff][A-Za-z0-9_$\u0080-\U0010ffff]*)
  | (?P<number>0[xX][0-9A-Fa-f]+|(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<operator>->>|->|::|<>|<=|>=|!=|==|<<|>>|\|\|)
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
    """One schema object: its kind, name, table and SQL (as tokens), plus a table's columns.

    `sql` is the database's own text where it keeps one (SQLite), else a statement
    that makes the object, written from the catalog (PostgreSQL). `shown` is how an
    object without SQL is shown.
    """

    type: str
    name: str
    table: str
    sql: str | None
    tokens: tuple[str, ...]
    columns: tuple[Column, ...] = ()
    shown: str | None = None


#: A database's schema: key -> object. The key is the object's name where names share one
#: namespace (SQLite; PostgreSQL's relations), `table.name` for objects named per table
#: (PostgreSQL's constraints, triggers, rules and policies).
Schema = Mapping[str, SchemaObject]


@dataclass(frozen=True, slots=True)
class Difference:
    """One way a ledger's schema differs from its revision's: `name` and what is wrong."""

    name: str
    message: str
    expected: str | None
    found: str | None


def read_schema(source: object, dialect: str | None = None) -> dict[str, SchemaObject]:
    """Every object in the database `source` reads (see the module docstring).

    `source` is a SQLAlchemy `Connection` (read in its transaction, begun if none
    is), or a DB-API cursor or connection of `sqlite3` or `psycopg`. Tables come
    with their columns, used to say which column differs.
    """
    if isinstance(source, Connection):
        name = dialect or source.dialect.name
        if source.get_transaction() is None:
            source.begin()  # as the first execute would: the caller's snapshot
        cur = source.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            return _backend(name).read_schema(cur)
        finally:
            cur.close()
    name = dialect or dialect_of_driver(source)
    if hasattr(source, "fetchall"):
        return _backend(name).read_schema(source)
    cur = source.cursor()  # type: ignore[attr-defined]
    try:
        return _backend(name).read_schema(cur)
    finally:
        cur.close()


class _SchemaBackend(Protocol):
    """What a backend's schema module provides (`bank.ledger.<backend>.schema`)."""

    def read_schema(self, cur: Any) -> dict[str, SchemaObject]: ...
    def reference_key(self, server: object) -> Hashable: ...
    def build_reference(self, server: object) -> dict[str, dict[str, SchemaObject]]: ...


def _backend(dialect: str) -> _SchemaBackend:
    """The backend's schema module (`bank.ledger.<backend>.schema`)."""
    try:
        backend: _SchemaBackend = backend_module(dialect, "schema")
    except UnsupportedLedgerUrl:
        raise ValueError(f"no schema reader for databases of kind {dialect!r}") from None
    return backend


# -- the reference -----------------------------------------------------------------------

#: (backend's cache key) -> revision -> schema, filled under the lock by `reference_schemas`.
_reference: dict[Hashable, dict[str, dict[str, SchemaObject]]] = {}
_reference_lock = threading.Lock()


def reference_schemas(dialect: str, server: object = None) -> Mapping[str, Schema]:
    """Revision -> the schema the shipped migrations create up to it (oldest first).

    Built on first use by running every migration on a scratch database (SQLite:
    in memory; PostgreSQL: a scratch schema on `server`, rolled back), then cached
    for the life of the process. Raises whatever the migrations raise if they
    cannot run (a broken installation).
    """
    backend = _backend(dialect)
    key = (dialect, backend.reference_key(server))
    with _reference_lock:  # once per process and server: never contended for long
        schemas = _reference.get(key)
        if schemas is None:
            schemas = _reference[key] = backend.build_reference(server)
        return schemas


#: Alembic's loggers that announce each step: the audit migrates only a scratch database,
#: and "Running upgrade 0001 -> 0002" in an application's log would say otherwise.
_ALEMBIC_LOGGERS: Final = (
    "alembic.runtime.migration",
    "alembic.runtime.plugins",
    "alembic.ddl.impl",
)


def _drop_record(_record: logging.LogRecord) -> bool:
    return False


@contextmanager
def quiet_alembic() -> Iterator[None]:
    """Alembic's step announcements dropped while a scratch reference is migrated
    (hold `ALEMBIC_LOCK`: the filter is on the process-wide loggers)."""
    loggers = [logging.getLogger(name) for name in _ALEMBIC_LOGGERS]
    for logger in loggers:
        logger.addFilter(_drop_record)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(_drop_record)


def strip_qualifier(sql: str, qualifier: str) -> str:
    """`sql` without the `qualifier.` prefix of names (a schema name), literals untouched.

    For servers that print names qualified with the schema they are in: a ledger's
    objects compare with the reference's whichever schema each lives in.
    """
    folded = qualifier.translate(_ASCII_LOWER)
    quoted = '"' + qualifier.replace('"', '""') + '"'
    matches = list(_TOKEN.finditer(sql))
    out: list[str] = []
    skip = False
    for i, match in enumerate(matches):
        if skip:
            skip = False
            continue
        text = match.group()
        group = match.lastgroup
        if (
            i + 1 < len(matches)
            and matches[i + 1].group() == "."
            and (
                (group == "word" and text.translate(_ASCII_LOWER) == folded)
                or (group == "quoted" and text == quoted)
            )
        ):
            skip = True  # the "." after it
            continue
        out.append(text)
    return "".join(out)


# -- comparing ---------------------------------------------------------------------------


def compare_schema(expected: Schema, found: Schema, revision: str) -> list[Difference]:
    """Every difference of `found` from `expected` (the schema of `revision`), by key."""
    differences: list[Difference] = []
    for key in sorted(expected.keys() | found.keys()):
        want = expected.get(key)
        have = found.get(key)
        if have is None:
            assert want is not None
            differences.append(
                Difference(
                    key,
                    f"{want.type} {_named(key, want)} is missing (revision {revision} creates it)",
                    _shown(want),
                    None,
                )
            )
        elif want is None:
            on = f" on {have.table}" if have.table != have.name else ""
            differences.append(
                Difference(
                    key,
                    f"unexpected {have.type} {have.name}{on}: no migration up to revision "
                    f"{revision} creates it",
                    None,
                    _shown(have),
                )
            )
        elif (want.type, want.table, want.tokens) != (have.type, have.table, have.tokens):
            differences.append(
                Difference(
                    key,
                    f"{want.type} {_named(key, want)} differs from revision {revision}'s: "
                    f"{_detail(want, have)}",
                    _shown(want),
                    _shown(have),
                )
            )
    return differences


def _named(key: str, obj: SchemaObject) -> str:
    """An object as a message names it: its name, and its table when named per table."""
    return key if key == obj.name else f"{obj.name} on {obj.table}"


def matching_revisions(found: Schema, schemas: Mapping[str, Schema]) -> list[str]:
    """The revisions whose schema `found` is exactly (for naming a revision set back)."""
    return [rev for rev, schema in schemas.items() if not compare_schema(schema, found, rev)]


def _shown(obj: SchemaObject) -> str:
    """How an object is shown as expected/found: its SQL, or its type and table."""
    if obj.sql is not None:
        return obj.sql.strip()  # exact: a literal's spaces are part of what is compared
    return obj.shown or f"{obj.type} {obj.name} on {obj.table}"


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
