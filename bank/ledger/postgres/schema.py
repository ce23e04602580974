"""PostgreSQL's side of the schema check: read the catalog, build the reference on the server.

A PostgreSQL database keeps no CREATE TABLE text, so each object is described by
a statement written from the catalog, in the server's own canonical forms where it
has them (`format_type`, `pg_get_expr`, `pg_get_constraintdef`, `pg_indexes.indexdef`,
`pg_views.definition`, `pg_get_triggerdef`, `pg_get_functiondef`): those are stable
for one server version, which is why the reference is built on the same server.

Read, in the connection's current schema (extension members excepted):
- tables (UNLOGGED shows: it gives up crash safety) with their columns' types,
  collations, NOT NULL, defaults, identity/generated, and row-level security;
- constraints (primary, unique, foreign keys, checks), keyed `table.name`;
- indexes (with their WHERE), views and materialized views, sequences, foreign tables;
- triggers that are not internal, with their enabled state; rules (a DO INSTEAD rule
  can swallow the writer's INSERTs as a trigger can), row-level security policies,
  and functions (a trigger's body).

The reference: every migration runs in a scratch schema (`search_path` set to it)
on its own connection, inside one transaction that is always rolled back, so
nothing is left behind even if the process dies; needs CREATE on the database.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Hashable, Iterable
from typing import Any, Final

from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from bank.errors import CannotOpenLedger
from bank.ledger.schema_ref import Column, SchemaObject, quiet_alembic, sql_tokens, strip_qualifier

#: Objects that belong to an extension (`CREATE EXTENSION` in the ledger's schema) are the
#: extension's, not the ledger's: left out.
_NOT_EXTENSION: Final = (
    "NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d WHERE d.classid = {catalog}::regclass "
    "AND d.objid = {oid} AND d.deptype = 'e')"
)

_RELATIONS_SQL: Final = f"""
SELECT c.oid, c.relname, c.relkind, c.relpersistence, c.relrowsecurity,
       c.relforcerowsecurity, COALESCE(array_to_string(c.reloptions, ', '), ''),
       CASE WHEN c.relkind = 'p' THEN pg_catalog.pg_get_partkeydef(c.oid) END
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %(schema)s AND c.relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
  AND {_NOT_EXTENSION.format(catalog="'pg_class'", oid="c.oid")}
"""

_COLUMNS_SQL: Final = """
SELECT a.attrelid, a.attnum, a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod),
       a.attnotnull, pg_catalog.pg_get_expr(d.adbin, d.adrelid), a.attidentity,
       a.attgenerated, CASE WHEN a.attcollation <> t.typcollation THEN co.collname END
FROM pg_catalog.pg_attribute a
JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
LEFT JOIN pg_catalog.pg_collation co ON co.oid = a.attcollation
WHERE n.nspname = %(schema)s AND c.relkind IN ('r', 'p', 'f') AND a.attnum > 0
  AND NOT a.attisdropped
ORDER BY a.attrelid, a.attnum
"""

_CONSTRAINTS_SQL: Final = """
SELECT c.relname, con.conname, con.contype, con.conkey,
       pg_catalog.pg_get_constraintdef(con.oid)
FROM pg_catalog.pg_constraint con
JOIN pg_catalog.pg_class c ON c.oid = con.conrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %(schema)s
"""

_INDEXES_SQL: Final = """
SELECT i.tablename, i.indexname, i.indexdef, x.indisvalid AND x.indisready
FROM pg_catalog.pg_indexes i
JOIN pg_catalog.pg_namespace n ON n.nspname = i.schemaname
JOIN pg_catalog.pg_class ic ON ic.relname = i.indexname AND ic.relnamespace = n.oid
JOIN pg_catalog.pg_index x ON x.indexrelid = ic.oid
WHERE i.schemaname = %(schema)s
"""

_VIEWS_SQL: Final = """
SELECT viewname, definition FROM pg_catalog.pg_views WHERE schemaname = %(schema)s
UNION ALL
SELECT matviewname, definition FROM pg_catalog.pg_matviews WHERE schemaname = %(schema)s
"""

_TRIGGERS_SQL: Final = """
SELECT c.relname, t.tgname, pg_catalog.pg_get_triggerdef(t.oid), t.tgenabled, t.tgisinternal
FROM pg_catalog.pg_trigger t
JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %(schema)s AND (NOT t.tgisinternal OR t.tgenabled <> 'O')
"""

_RULES_SQL: Final = """
SELECT tablename, rulename, definition FROM pg_catalog.pg_rules WHERE schemaname = %(schema)s
"""

_POLICIES_SQL: Final = """
SELECT tablename, policyname, permissive, array_to_string(roles, ', '), cmd, qual, with_check
FROM pg_catalog.pg_policies WHERE schemaname = %(schema)s
"""

_FUNCTIONS_SQL: Final = f"""
SELECT p.proname, pg_catalog.pg_get_function_identity_arguments(p.oid), p.prokind,
       CASE WHEN p.prokind IN ('f', 'p') THEN pg_catalog.pg_get_functiondef(p.oid) END
FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname = %(schema)s
  AND {_NOT_EXTENSION.format(catalog="'pg_proc'", oid="p.oid")}
"""

_KINDS: Final = {
    "r": "table",
    "p": "table",
    "v": "view",
    "m": "materialized view",
    "S": "sequence",
    "f": "foreign table",
}
_CONSTRAINT_KINDS: Final = {"p": "primary key", "u": "unique", "f": "foreign key", "c": "check"}
#: How ALTER TABLE says a trigger's `tgenabled` state other than the default 'O'.
_TRIGGER_STATES: Final = {"D": "DISABLE", "R": "ENABLE REPLICA", "A": "ENABLE ALWAYS"}
_BARE: Final = re.compile(r"[a-z_][a-z0-9_$]*")


def _ident(name: str) -> str:
    """`name` as SQL writes it: bare when PostgreSQL would fold it to itself, else quoted."""
    return name if _BARE.fullmatch(name) else '"' + name.replace('"', '""') + '"'


def _object(
    kind: str, name: str, table: str, sql: str, schema: str, columns: tuple[Column, ...] = ()
) -> SchemaObject:
    text = strip_qualifier(sql, schema).strip()
    return SchemaObject(kind, name, table, text, sql_tokens(text), columns)


def read_schema(cur: Any) -> dict[str, SchemaObject]:
    """Every object in the current schema of the psycopg cursor `cur` (in its transaction).

    Keys: the name for relations (tables, indexes, views, sequences: one namespace),
    `table.name` for what is named per table (constraints, triggers, rules, policies),
    `name(arguments)` for functions.
    """
    cur.execute("SELECT current_schema()")
    (schema,) = cur.fetchone()
    if schema is None:
        return {}  # no schema of the search_path exists: nothing to read
    params = {"schema": schema}
    out: dict[str, SchemaObject] = {}

    cur.execute(_CONSTRAINTS_SQL, params)
    constraints = cur.fetchall()
    primary: dict[str, list[int]] = {
        table: list(keys or []) for table, _, kind, keys, _ in constraints if kind == "p"
    }
    disabled: dict[str, list[str]] = {}  # table -> internal (constraint) triggers switched off
    cur.execute(_TRIGGERS_SQL, params)
    for table, name, definition, enabled, internal in cur.fetchall():
        state = _TRIGGER_STATES.get(enabled)
        alter = f"; ALTER TABLE {_ident(table)} {state} TRIGGER {_ident(name)}" if state else ""
        if internal:
            # A foreign key's own trigger, named by oid: only its state is the ledger's.
            disabled.setdefault(table, []).append(f"{state} TRIGGER (a constraint's)")
            continue
        out[f"{table}.{name}"] = _object("trigger", name, table, definition + alter, schema)

    cur.execute(_COLUMNS_SQL, params)
    columns: dict[int, list[tuple[int, Column]]] = {}  # relid -> (attnum, column)
    for (
        relid,
        attnum,
        name,
        type_,
        notnull,
        default,
        identity,
        generated,
        collation,
    ) in cur.fetchall():
        listed = columns.setdefault(relid, [])
        declared = type_ if collation is None else f'{type_} COLLATE "{collation}"'
        hidden = 2 if identity else 3 if generated else 0
        listed.append((attnum, (len(listed), name, declared, int(notnull), default, 0, hidden)))

    cur.execute(_RELATIONS_SQL, params)
    view_options: dict[str, str] = {}
    kinds: dict[str, str] = {}
    for oid, name, relkind, persistence, rls, force_rls, options, partkey in cur.fetchall():
        kind = kinds[name] = _KINDS[relkind]
        if relkind in ("r", "p", "f"):
            cols = _with_primary_key(columns.get(oid, []), primary.get(name, []))
            statements = [_table_sql(name, relkind, persistence, cols, partkey)]
            if rls:
                statements.append(f"ALTER TABLE {_ident(name)} ENABLE ROW LEVEL SECURITY")
            if force_rls:
                statements.append(f"ALTER TABLE {_ident(name)} FORCE ROW LEVEL SECURITY")
            statements += [f"ALTER TABLE {_ident(name)} {what}" for what in disabled.get(name, [])]
            out[name] = _object(kind, name, name, "; ".join(statements), schema, cols)
        elif relkind == "S":
            out[name] = _object(kind, name, name, f"CREATE SEQUENCE {_ident(name)}", schema)
        elif options:  # a view's WITH (security_barrier, check_option, ...)
            view_options[name] = f" WITH ({options})"

    cur.execute(_VIEWS_SQL, params)
    for name, definition in cur.fetchall():
        kind = kinds.get(name, "view")
        create = "CREATE MATERIALIZED VIEW" if kind == "materialized view" else "CREATE VIEW"
        sql = f"{create} {_ident(name)}{view_options.get(name, '')} AS {definition}"
        out[name] = _object(kind, name, name, sql, schema)

    for table, name, kind, _, definition in constraints:
        what = _CONSTRAINT_KINDS.get(kind, "constraint")
        sql = f"ALTER TABLE {_ident(table)} ADD CONSTRAINT {_ident(name)} {definition}"
        out[f"{table}.{name}"] = _object(f"{what} constraint", name, table, sql, schema)

    cur.execute(_INDEXES_SQL, params)
    for table, name, definition, valid in cur.fetchall():
        # An index left invalid (a failed CREATE INDEX CONCURRENTLY, or marked so by hand)
        # is not used to answer queries: not the index the migrations made.
        sql = definition if valid else f"{definition}; ALTER INDEX {_ident(name)} INVALID"
        out[name] = _object("index", name, table, sql, schema)

    cur.execute(_RULES_SQL, params)
    for table, name, definition in cur.fetchall():
        out[f"{table}.{name}"] = _object("rule", name, table, definition, schema)

    cur.execute(_POLICIES_SQL, params)
    for table, name, permissive, roles, command, qual, check in cur.fetchall():
        sql = f"CREATE POLICY {_ident(name)} ON {_ident(table)} AS {permissive} FOR {command}"
        sql += f" TO {roles}" + (f" USING ({qual})" if qual else "")
        sql += f" WITH CHECK ({check})" if check else ""
        out[f"{table}.{name}"] = _object("policy", name, table, sql, schema)

    cur.execute(_FUNCTIONS_SQL, params)
    for name, arguments, prokind, definition in cur.fetchall():
        key = f"{name}({arguments})"
        what = "procedure" if prokind == "p" else "function" if prokind == "f" else "aggregate"
        sql = definition or f"CREATE AGGREGATE {_ident(name)}({arguments})"
        out[key] = _object(what, key, key, sql, schema)
    return out


def _table_sql(
    name: str, relkind: str, persistence: str, columns: Iterable[Column], partkey: str | None
) -> str:
    """CREATE TABLE with the columns as the catalog has them (constraints are their own objects)."""
    parts = []
    for _, column, type_, notnull, default, _, hidden in columns:
        part = f"{_ident(column)} {type_}"
        if notnull:
            part += " NOT NULL"
        if default is not None:
            part += (
                f" GENERATED ALWAYS AS ({default}) STORED" if hidden == 3 else f" DEFAULT {default}"
            )
        if hidden == 2:
            part += " GENERATED AS IDENTITY"
        parts.append(part)
    create = {"u": "CREATE UNLOGGED TABLE", "t": "CREATE TEMPORARY TABLE"}.get(
        persistence, "CREATE FOREIGN TABLE" if relkind == "f" else "CREATE TABLE"
    )
    partition = f" PARTITION BY {partkey}" if partkey else ""
    return f"{create} {_ident(name)} ({', '.join(parts)}){partition}"


def _with_primary_key(columns: list[tuple[int, Column]], key: list[int]) -> tuple[Column, ...]:
    """The columns with their primary-key position (1-based; 0 when not in it), as SQLite's."""
    out = []
    for attnum, (cid, name, type_, notnull, default, _, hidden) in columns:
        position = key.index(attnum) + 1 if attnum in key else 0
        out.append((cid, name, type_, notnull, default, position, hidden))
    return tuple(out)


# -- the reference -----------------------------------------------------------------------


def _engine(server: object) -> tuple[Engine, bool]:
    """An engine for `server` (an Engine, URL or URL text), and whether it is ours to dispose."""
    if isinstance(server, Engine):
        return create_engine(server.url, poolclass=NullPool), True
    if isinstance(server, URL | str):
        url = make_url(server) if isinstance(server, str) else server
        return create_engine(url, poolclass=NullPool), True
    raise TypeError(
        "the PostgreSQL reference schema is built on the ledger's server: pass its Engine or URL"
    )


def _server_url(server: object) -> URL:
    if isinstance(server, Engine):
        return server.url
    if isinstance(server, str):
        return make_url(server)
    if isinstance(server, URL):
        return server
    raise TypeError(
        "the PostgreSQL reference schema is built on the ledger's server: pass its Engine or URL"
    )


#: (host, port, database) -> the server's version, as first seen by this process.
_versions: dict[tuple[object, ...], object] = {}


def reference_key(server: object) -> Hashable:
    """Which cached reference serves `server`: one per server, database and server version.

    The version comes from an Engine that has connected, else from one connection,
    remembered per server for the life of the process.
    """
    url = _server_url(server)
    where = (url.host, url.port, url.database)
    version: object = None
    if isinstance(server, Engine):
        version = server.dialect.server_version_info
    if version is None:
        version = _versions.get(where)
    if version is None:
        engine, _ = _engine(server)
        try:
            with engine.connect() as conn:
                version = conn.dialect.server_version_info
        finally:
            engine.dispose()
    _versions[where] = version
    return (*where, version)


#: SQLSTATE insufficient_privilege.
_NO_PRIVILEGE: Final = "42501"


def _create_scratch(conn: Connection, scratch: str) -> None:
    try:
        conn.exec_driver_sql(f'CREATE SCHEMA "{scratch}"')
    except DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) != _NO_PRIVILEGE:
            raise
        url = conn.engine.url
        raise CannotOpenLedger(
            f"{url.render_as_string(hide_password=True)}: the schema check runs the migrations "
            "in a scratch schema on this server (rolled back, nothing is left) and needs the "
            f"CREATE privilege on database {url.database!r}, which role {url.username!r} "
            "lacks: GRANT CREATE ON DATABASE to it"
        ) from None


def build_reference(server: object) -> dict[str, dict[str, SchemaObject]]:
    """Revision -> schema, by running every migration in a scratch schema on `server`.

    One transaction, always rolled back: the scratch schema never becomes visible
    to anyone else and nothing is left behind.
    """
    from alembic import command

    from bank.ledger.migrate import ALEMBIC_LOCK, alembic_config, revisions_oldest_first

    engine, _ = _engine(server)
    scratch = f"bank_schema_ref_{os.getpid()}_{secrets.token_hex(4)}"
    schemas: dict[str, dict[str, SchemaObject]] = {}
    try:
        with ALEMBIC_LOCK, engine.connect() as conn, quiet_alembic():
            transaction = conn.begin()
            try:
                _create_scratch(conn, scratch)
                conn.exec_driver_sql(f'SET LOCAL search_path TO "{scratch}"')
                cfg = alembic_config()
                cfg.attributes["connection"] = conn
                for revision in revisions_oldest_first():
                    command.upgrade(cfg, revision)
                    cur = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
                    try:
                        schemas[revision] = read_schema(cur)
                    finally:
                        cur.close()
            finally:
                transaction.rollback()
    finally:
        engine.dispose()
    return schemas
