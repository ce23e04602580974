"""The schema check, open-time verification and the read-only readers on a real PostgreSQL server.

The catalog is read as PostgreSQL describes it (`pg_indexes`, `pg_views`, `pg_get_*def`),
compared with what the shipped migrations create on the same server, and every
tampering a forger with `psql` can do to make the writer's rows vanish or change
(a dropped or redefined index, a view, a trigger, a rule, a column, an UNLOGGED table)
is reported with a message that names it. Each test gets a fresh database
`schema_<n>` on the server `BANK_TEST_POSTGRES_URL` names (skipped without one).
"""

from __future__ import annotations

import io
import itertools
import json
import os
import secrets
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import NullPool

import bank
from bank.check_history import check_history, run_check_history_command
from bank.cli import main
from bank.ledger import schema_ref
from bank.ledger.migrate import alembic_config, head_revision
from bank.ledger.reader import LedgerReader
from bank.ledger.schema_ref import compare_schema, read_schema, reference_schemas
from bank.ledger.verify import verify_ledger
from tests import postgres

pytest.importorskip("psycopg")

ENV_URL = "BANK_TEST_POSTGRES_URL"
_names = itertools.count(1)


@pytest.fixture(scope="module")
def server(postgres_server: postgres.Server) -> URL:
    """The server's maintenance database (a superuser's URL): the shared test server."""
    return make_url(postgres_server.url)


def _new_database(server: URL) -> URL:
    name = f"schema_{os.getpid()}_{next(_names)}_{secrets.token_hex(3)}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    admin.dispose()
    return server.set(database=name)


def _drop_database(server: URL, url: URL) -> None:
    admin = create_engine(server, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)')
    admin.dispose()


@pytest.fixture
def make_db(server: URL) -> Iterator[object]:
    """Fresh empty databases, dropped at the end of the test."""
    made: list[URL] = []

    def make() -> URL:
        url = _new_database(server)
        made.append(url)
        return url

    yield make
    for url in made:
        _drop_database(server, url)


def _upgrade(url: URL, revision: str) -> None:
    from alembic import command

    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            cfg = alembic_config()
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    finally:
        engine.dispose()


def _head_or_skip(url: URL) -> None:
    """Migrate to head, or skip: on a branch whose migrations do not yet run on PostgreSQL."""
    try:
        _upgrade(url, "head")
    except Exception as exc:  # the migrations' own failure, whatever it is
        pytest.skip(f"the migrations do not reach head on PostgreSQL here ({str(exc)[:80]})")


def _execute(url: URL, *statements: str) -> None:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.exec_driver_sql(statement)
    finally:
        engine.dispose()


def _read(url: URL) -> dict[str, schema_ref.SchemaObject]:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return read_schema(conn)
    finally:
        engine.dispose()


# -- reading the catalog ---------------------------------------------------------------------

#: Revision 0002 runs on PostgreSQL on every branch: the tampering tests compare with it.
BASE = "0002"


@pytest.fixture(scope="module")
def pristine(server: URL) -> Iterator[dict[str, schema_ref.SchemaObject]]:
    """The schema of a database migrated to BASE."""
    url = _new_database(server)
    try:
        _upgrade(url, BASE)
        yield _read(url)
    finally:
        _drop_database(server, url)


@pytest.fixture
def forged(make_db: object) -> URL:
    """A database migrated to BASE, to tamper with."""
    url: URL = make_db()  # type: ignore[operator]
    _upgrade(url, BASE)
    return url


def test_the_same_migrations_read_the_same_in_any_database_and_schema(
    pristine: dict[str, schema_ref.SchemaObject], forged: URL
) -> None:
    other = forged
    want, have = pristine, _read(other)
    assert compare_schema(want, have, BASE) == []
    assert {"transfers", "uq_transfers_key", "account_flows", "transfers.pk_transfers"} <= set(want)
    assert not [o.sql for o in want.values() if o.sql and "public." in o.sql]  # unqualified
    # The same objects in another schema (search_path) read the same.
    _execute(other, "CREATE SCHEMA ledger")
    _upgrade(other.update_query_dict({"options": "-csearch_path=ledger"}), BASE)
    moved = _read(other.update_query_dict({"options": "-csearch_path=ledger"}))
    assert compare_schema(want, moved, BASE) == []
    # A bare psycopg connection or cursor (as a snapshot holds) reads the same.
    import psycopg

    with psycopg.connect(f"host={other.host} port={other.port} user={other.username} "
                         f"dbname={other.database}") as raw:  # fmt: skip
        assert compare_schema(want, read_schema(raw), BASE) == []
        with raw.cursor() as cur:
            assert compare_schema(want, read_schema(cur), BASE) == []


TAMPERING = {
    "index dropped": (
        ["DROP INDEX uq_transfers_key"],
        "index uq_transfers_key is missing (revision 0002 creates it)",
    ),
    "index made partial": (
        [
            "DROP INDEX uq_transfers_key",
            "CREATE UNIQUE INDEX uq_transfers_key ON transfers (key) WHERE kind = 'deposit'",
        ],
        "index uq_transfers_key differs from revision 0002's: its WHERE clause is "
        "\"( ( kind ) :: text = 'deposit' :: text )\", not '(none)'",
    ),
    "index no longer unique": (
        ["DROP INDEX uq_transfers_key", "CREATE INDEX uq_transfers_key ON transfers (key)"],
        "index uq_transfers_key differs from revision 0002's: it is no longer UNIQUE",
    ),
    "view redefined": (
        [
            "CREATE OR REPLACE VIEW balance_mismatches AS SELECT account_id, name, "
            "recomputed_balance, stored_balance, difference FROM account_flows "
            "WHERE difference > 0"
        ],
        "view balance_mismatches differs from revision 0002's: text differs at",
    ),
    "trigger added": (
        [
            "CREATE FUNCTION swallow() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RETURN NULL; END $$",
            "CREATE TRIGGER t1 BEFORE INSERT ON transfers FOR EACH ROW EXECUTE FUNCTION swallow()",
        ],
        "unexpected trigger t1 on transfers: no migration up to revision 0002 creates it",
    ),
    "rule added": (
        ["CREATE RULE r1 AS ON INSERT TO transfers DO INSTEAD NOTHING"],
        "unexpected rule r1 on transfers: no migration up to revision 0002 creates it",
    ),
    "column added": (
        ["ALTER TABLE accounts ADD COLUMN note text"],
        "table accounts differs from revision 0002's: extra column note text",
    ),
    "column type changed": (
        ["ALTER TABLE transfers ALTER COLUMN ts_us TYPE numeric"],
        "table transfers differs from revision 0002's: column ts_us is numeric, not bigint",
    ),
    "column made nullable": (
        ["ALTER TABLE transfers ALTER COLUMN hash DROP NOT NULL"],
        "table transfers differs from revision 0002's: column hash is no longer NOT NULL",
    ),
    "check constraint dropped": (
        ["ALTER TABLE transfers DROP CONSTRAINT ck_transfers_amount_positive"],
        "check constraint ck_transfers_amount_positive on transfers is missing",
    ),
    "table made unlogged": (
        ["ALTER TABLE account_events SET UNLOGGED"],
        "table account_events differs from revision 0002's: text differs at "
        "'create unlogged table account_events",
    ),
    "foreign keys switched off": (
        ["ALTER TABLE transfers DISABLE TRIGGER ALL"],
        "table transfers differs from revision 0002's: text differs at",
    ),
    "row-level security": (
        ["ALTER TABLE transfers ENABLE ROW LEVEL SECURITY"],
        "table transfers differs from revision 0002's: text differs at",
    ),
}


def test_what_changes_plans_or_belongs_to_an_extension_is_not_a_schema_change(
    pristine: dict[str, schema_ref.SchemaObject], forged: URL
) -> None:
    statements = [
        "ANALYZE",
        "CREATE STATISTICS st ON debit_account_id, credit_account_id FROM transfers",
    ]
    engine = create_engine(forged, poolclass=NullPool)
    with engine.connect() as conn:
        available = {
            name
            for (name,) in conn.exec_driver_sql(
                "SELECT name FROM pg_available_extensions WHERE name IN ('pg_trgm', 'pgcrypto')"
            )
        }
    engine.dispose()
    statements += [f"CREATE EXTENSION {name}" for name in sorted(available)]
    _execute(forged, *statements)
    assert compare_schema(pristine, _read(forged), BASE) == []


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_tampering_is_reported_with_a_message_that_names_it(
    pristine: dict[str, schema_ref.SchemaObject], forged: URL, case: str
) -> None:
    statements, message = TAMPERING[case]
    _execute(forged, *statements)
    differences = compare_schema(pristine, _read(forged), BASE)
    assert differences, case
    assert any(d.message.startswith(message) for d in differences), [d.message for d in differences]
    for d in differences:
        assert d.expected is not None or d.found is not None


# -- the reference ---------------------------------------------------------------------------


def test_the_reference_is_built_on_the_same_server_cached_and_leaves_nothing(
    make_db: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    url: URL = make_db()  # type: ignore[operator]
    _head_or_skip(url)
    monkeypatch.setattr(schema_ref, "_reference", {})
    schemas = reference_schemas("postgresql", url)
    assert list(schemas)[-1] == head_revision()
    assert reference_schemas("postgresql", url.render_as_string(hide_password=False)) is schemas
    assert compare_schema(schemas[head_revision()], _read(url), head_revision()) == []
    engine = create_engine(url, poolclass=NullPool)
    with engine.connect() as conn:
        left = conn.execute(
            text("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'bank_schema_ref%'")
        ).all()
    engine.dispose()
    assert left == []


def test_a_role_that_may_not_create_a_schema_is_told_what_the_check_needs(
    server: URL, make_db: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    url: URL = make_db()  # type: ignore[operator]
    role = f"schema_role_{secrets.token_hex(4)}"
    _execute(
        url, f"CREATE ROLE {role} LOGIN", f'GRANT CONNECT ON DATABASE "{url.database}" TO {role}'
    )
    monkeypatch.setattr(schema_ref, "_reference", {})
    try:
        with pytest.raises(bank.CannotOpenLedger, match="needs the CREATE privilege on database"):
            reference_schemas("postgresql", url.set(username=role, password=None))
    finally:
        _drop_database(server, url)
        _execute(server, f"DROP ROLE {role}")


# -- a ledger on PostgreSQL, made from an SQLite ledger's rows ---------------------------------

_TABLES = ("accounts", "account_events", "transfers", "chain_formats")


def _copy_ledger(sqlite_path: Path, url: URL) -> None:
    """The rows of an SQLite ledger, verbatim, in a PostgreSQL database at head."""
    _head_or_skip(url)
    source = sqlite3.connect(sqlite_path)
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            for table in ("account_events", "transfers", "chain_formats", "accounts"):
                conn.exec_driver_sql(f"DELETE FROM {table}")
            for table in _TABLES:
                cur = source.execute(f"SELECT * FROM {table}")
                names = [d[0] for d in cur.description]
                rows = [dict(zip(names, row, strict=True)) for row in cur]
                if rows:
                    listed = ", ".join(f'"{n}"' for n in names)
                    values = ", ".join(f":{n}" for n in names)
                    conn.execute(text(f"INSERT INTO {table} ({listed}) VALUES ({values})"), rows)
    finally:
        engine.dispose()
        source.close()


@pytest.fixture(scope="module")
def sqlite_ledger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pgschema") / "ledger.db"
    with bank.Bank.open(path, durability="normal") as b:
        alice = b.open_account("alice", overdraft_limit=100)
        bob = b.open_account("bob")
        for n in range(20):
            b.deposit(alice.id, 1_000, key=f"dep-{n}")
            b.transfer(alice.id, bob.id, 7)
        b.set_overdraft_limit(bob.id, 300)
    return path


def _verify(url: URL) -> list[str]:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return verify_ledger(conn).problems
    finally:
        engine.dispose()


def test_verify_passes_a_sound_ledger_and_finds_a_balance_edited_by_hand(
    sqlite_ledger: Path, make_db: object
) -> None:
    url: URL = make_db()  # type: ignore[operator]
    _copy_ledger(sqlite_ledger, url)
    assert _verify(url) == []
    _execute(url, "UPDATE accounts SET balance = balance + 5 WHERE name = 'bob'")
    problems = _verify(url)
    assert any("stored balance" in p and "'bob'" in p for p in problems), problems
    assert any("sum to 5, not 0" in p for p in problems), problems


def test_verify_finds_a_trigger_that_would_swallow_the_writers_rows(
    sqlite_ledger: Path, make_db: object
) -> None:
    url: URL = make_db()  # type: ignore[operator]
    _copy_ledger(sqlite_ledger, url)
    _execute(
        url,
        "CREATE FUNCTION swallow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$",
        "CREATE TRIGGER t1 BEFORE INSERT ON transfers FOR EACH ROW EXECUTE FUNCTION swallow()",
    )
    problems = _verify(url)
    assert "schema: unexpected trigger t1 on transfers: no migration up to revision " in (
        problems[0] if problems else ""
    ) or any(p.startswith("schema: unexpected trigger t1 on transfers") for p in problems), problems


def test_the_reader_reads_a_postgres_ledger_by_url(sqlite_ledger: Path, make_db: object) -> None:
    url: URL = make_db()  # type: ignore[operator]
    _copy_ledger(sqlite_ledger, url)
    with LedgerReader(sqlite_ledger) as on_file:
        want = on_file.accounts(), on_file.history(1)
    with LedgerReader(url.render_as_string(hide_password=False)) as reader:
        assert reader.path is None and reader.revision == head_revision()
        assert (reader.accounts(), reader.history(1)) == want
        # A READ ONLY transaction: nothing can be written through a reader.
        with pytest.raises(Exception, match="read-only transaction"):
            reader.read(lambda conn: conn.exec_driver_sql("DELETE FROM transfers"))


def test_the_reader_refuses_an_empty_postgres_database(make_db: object) -> None:
    url: URL = make_db()  # type: ignore[operator]
    with pytest.raises(bank.NotALedger, match="an empty database, not a ledger"):
        LedgerReader(url)


def test_check_history_on_postgres_gives_the_verdict_it_gives_on_sqlite(
    tmp_path: Path, make_db: object
) -> None:
    db, history = tmp_path / "sim.db", tmp_path / "sim.jsonl"
    assert main(["simulate", "--db", str(db), "--ops", "400", "--tellers", "2", "--window", "4",
                 "--accounts", "10", "--seed", "5", "--history", str(history),
                 "--no-progress"]) == 0  # fmt: skip
    url: URL = make_db()  # type: ignore[operator]
    _copy_ledger(db, url)
    on_file = check_history(history, db)
    on_server = check_history(history, url.render_as_string(hide_password=False))
    assert on_file.ok and on_server.ok, on_server.violations[:3]
    assert on_server.rows_checked == on_file.rows_checked > 0
    assert "@" not in on_server.db or ":***@" in on_server.db or "postgres@" in on_server.db
    out = io.StringIO()
    code = run_check_history_command(
        str(history), url.render_as_string(hide_password=False), as_json=True, out=out
    )
    assert code == 0 and json.loads(out.getvalue())["ok"] is True
    assert main(["check-history", str(history), "--db", url.render_as_string(False)]) == 0
    # An edited row on the server is a violation, as it is on a file.
    _execute(url, "UPDATE transfers SET amount = amount + 1 WHERE seq = 3")
    assert not check_history(history, url.render_as_string(hide_password=False)).ok
