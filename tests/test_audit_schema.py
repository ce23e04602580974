"""The audit checks the whole schema against what the shipped migrations create up to the ledger's
revision: every table, column type, constraint, index definition, view and trigger, no object more
or less, and a revision number set back or forward is seen in the objects, never trusted."""

from __future__ import annotations

import io
import json
import re
import sqlite3
import time
from pathlib import Path

import pytest

import bank
from bank.errors import CannotAudit
from bank.ledger.audit import AuditReport, audit_ledger
from bank.ledger.audit_report import run_audit_command
from bank.ledger.migrate import head_revision, known_revisions, revisions_oldest_first
from bank.ledger.schema_ref import read_schema, reference_schemas, sql_tokens
from tests.audit_ledgers import copy_ledger, kinds

#: What the audit must add for the schema check, per audit, once the reference is cached.
SCHEMA_CHECK_S_MAX = 0.3


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("schema") / "clean.db"
    with bank.Bank.open(path, durability="normal") as b:
        alice = b.open_account("alice", overdraft_limit=100)
        bob = b.open_account("bob")
        for n in range(30):
            b.deposit(alice.id, 1_000, key=f"dep-{n}")
            b.transfer(alice.id, bob.id, 7)
        b.set_overdraft_limit(bob.id, 300)
    return path


@pytest.fixture
def ledger(clean: Path, tmp_path: Path) -> Path:
    return copy_ledger(clean, tmp_path / "ledger.db")


def _run(db: Path, script: str) -> None:
    """Edit the ledger as a forger with plain `sqlite3` does."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.executescript(script)
    finally:
        conn.close()


def _schema(report: AuditReport) -> list[str]:
    return [p.message for p in report.problems if p.kind == "schema"]


def _table_sql(db: Path, table: str) -> str:
    conn = sqlite3.connect(db)
    try:
        (sql,) = conn.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
        ).fetchone()
    finally:
        conn.close()
    assert isinstance(sql, str)
    return sql


def _rebuild(db: Path, table: str, new_sql: str) -> None:
    """Rebuild `table` by hand with `new_sql` (same name), keeping every row and index."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        indexes = [
            r[0]
            for r in conn.execute(
                "SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = ? "
                "AND sql IS NOT NULL",
                (table,),
            )
        ]
        conn.executescript(
            f"PRAGMA foreign_keys = OFF; BEGIN; CREATE TEMP TABLE keep AS SELECT * FROM {table}; "
            f"DROP TABLE {table}; {new_sql}; INSERT INTO {table} SELECT * FROM keep; "
            "DROP TABLE keep; " + "".join(f"{sql}; " for sql in indexes) + "COMMIT;"
        )
    finally:
        conn.close()


# -- a sound ledger --------------------------------------------------------------------


def test_an_engine_ledger_has_exactly_the_reference_schema_of_its_revision(ledger: Path) -> None:
    schemas = reference_schemas("sqlite")
    assert list(schemas) == revisions_oldest_first() and set(schemas) == known_revisions()
    conn = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
    try:
        found = read_schema(conn.cursor())
    finally:
        conn.close()
    expected = schemas[head_revision()]
    assert found.keys() == expected.keys()
    for name, obj in expected.items():
        assert (found[name].type, found[name].table, found[name].tokens) == (
            obj.type,
            obj.table,
            obj.tokens,
        ), name
    report = audit_ledger(ledger)
    assert report.ok, report.problems


def test_the_schema_check_is_cached_and_cheap(ledger: Path) -> None:
    reference_schemas("sqlite")  # built once per process
    assert reference_schemas("sqlite") is reference_schemas("sqlite")
    started = time.perf_counter()
    for _ in range(5):
        audit_ledger(ledger)
    per_audit = (time.perf_counter() - started) / 5
    assert per_audit < SCHEMA_CHECK_S_MAX  # the whole audit of a small ledger, schema included


def test_layout_and_case_changes_are_not_differences_but_literals_are() -> None:
    a = "CREATE VIEW v AS SELECT x FROM t WHERE k = 'deposit'"
    assert sql_tokens(a) == sql_tokens(
        "create  view V as\n select X /* c */ from t -- x\n where k='deposit';"
    )
    assert sql_tokens(a) != sql_tokens(a.replace("'deposit'", "'DEPOSIT'"))
    assert sql_tokens(a) != sql_tokens(a.replace("'deposit'", "'deposit '"))
    assert sql_tokens('CREATE INDEX i ON t ("key")') != sql_tokens('CREATE INDEX i ON t ("KEY")')


def test_planner_statistics_are_not_a_schema_change(ledger: Path) -> None:
    _run(ledger, "ANALYZE;")
    assert audit_ledger(ledger).ok


def test_only_layout_changed_in_a_view_is_clean(ledger: Path) -> None:
    _run(
        ledger,
        "DROP VIEW balance_mismatches; CREATE VIEW balance_mismatches AS "
        "SELECT account_id, name, recomputed_balance, stored_balance, difference "
        "FROM   account_flows   WHERE stored_balance != recomputed_balance -- same view",
    )
    assert audit_ledger(ledger).ok


# -- the revision number ---------------------------------------------------------------


def test_revision_set_back_with_a_lying_view_is_reported(ledger: Path) -> None:
    """0002 ledger claiming 0001 (which once switched the view check off) and a view that lies."""
    _run(
        ledger,
        "UPDATE alembic_version SET version_num = '0001'; "
        "DROP VIEW balance_mismatches; CREATE VIEW balance_mismatches AS "
        "SELECT account_id, name, recomputed_balance, stored_balance, difference "
        "FROM account_flows WHERE 0;"
        "UPDATE accounts SET balance = balance + 5 WHERE id = 1;"
        "UPDATE accounts SET balance = balance - 5 WHERE id = 2;",
    )
    report = audit_ledger(ledger)
    assert report.revision == "0001"
    messages = _schema(report)
    for view in ("account_flows", "balance_mismatches", "account_field_mismatches"):
        assert any(f"unexpected view {view}" in m for m in messages), messages
    # The data checks run in full whatever the revision: the balance edit is found too.
    assert {"schema", "balance_mismatch"} <= kinds(report)
    conn = sqlite3.connect(ledger)
    try:
        assert conn.execute("SELECT * FROM balance_mismatches").fetchall() == []  # the lie
    finally:
        conn.close()


def test_revision_set_back_on_an_untouched_schema_names_the_real_revision(ledger: Path) -> None:
    _run(ledger, "UPDATE alembic_version SET version_num = '0002'")
    messages = _schema(audit_ledger(ledger))
    assert any(f"the schema is exactly revision {head_revision()}'s" in m for m in messages), (
        messages
    )


def test_revision_claiming_head_on_an_older_schema_is_reported(ledger: Path) -> None:
    views = [
        r[0]
        for r in sqlite3.connect(ledger).execute(
            "SELECT name FROM sqlite_master WHERE type = 'view'"
        )
    ]
    assert views
    _run(ledger, "".join(f"DROP VIEW {v};" for v in views))
    report = audit_ledger(ledger)
    assert report.revision == head_revision()
    messages = _schema(report)
    assert all(any(f"view {v} is missing" in m for m in messages) for v in views), messages


# -- indexes ---------------------------------------------------------------------------


def test_unique_key_index_swapped_for_a_non_unique_one(ledger: Path) -> None:
    _run(
        ledger,
        'DROP INDEX uq_transfers_key; CREATE INDEX uq_transfers_key ON transfers ("key") '
        "WHERE key IS NOT NULL;",
    )
    [message] = _schema(audit_ledger(ledger))
    assert "index uq_transfers_key" in message and "no longer UNIQUE" in message


def test_unique_key_index_swapped_for_a_vacuous_partial_one(ledger: Path) -> None:
    _run(
        ledger,
        'DROP INDEX uq_transfers_key; CREATE UNIQUE INDEX uq_transfers_key ON transfers ("key") '
        "WHERE 0;",
    )
    report = audit_ledger(ledger)
    [problem] = [p for p in report.problems if p.kind == "schema"]
    assert "WHERE clause is '0', not 'key is not null'" in problem.message
    assert problem.found is not None and "WHERE 0" in str(problem.found)
    assert problem.expected is not None and "WHERE key IS NOT NULL" in str(problem.expected)


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        (
            "CREATE TRIGGER hide AFTER INSERT ON transfers BEGIN SELECT 1; END",
            "unexpected trigger hide on transfers",
        ),
        ("CREATE VIEW my_totals AS SELECT 1", "unexpected view my_totals"),
        ("CREATE TABLE notes (x INTEGER)", "unexpected table notes"),
        ("CREATE INDEX ix_amount ON transfers (amount)", "unexpected index ix_amount on transfers"),
        ("CREATE UNIQUE INDEX ix_hash ON transfers (hash)", "unexpected index ix_hash"),
    ],
)
def test_an_object_the_migrations_did_not_make_is_reported(
    ledger: Path, sql: str, expected: str
) -> None:
    _run(ledger, sql)
    report = audit_ledger(ledger)
    assert kinds(report) == {"schema"}
    [message] = _schema(report)
    assert expected in message


# -- tables and columns ----------------------------------------------------------------


def test_column_type_weakened_by_a_rebuilt_table(ledger: Path) -> None:
    """`amount BIGINT` rebuilt as an untyped column: nothing would coerce a forged TEXT amount."""
    sql = _table_sql(ledger, "transfers")
    assert "amount INTEGER NOT NULL" in sql
    loose = re.sub(
        r"\)\s*STRICT\s*$", ")", sql.strip()
    )  # an untyped column needs a non-STRICT table
    _rebuild(ledger, "transfers", loose.replace("amount INTEGER NOT NULL", "amount NOT NULL"))
    report = audit_ledger(ledger)
    [message] = _schema(report)
    assert message.startswith("table transfers differs") and "column amount is untyped" in message


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("kind TEXT NOT NULL", "kind TEXT", "column kind is no longer NOT NULL"),
        (
            "CONSTRAINT ck_transfers_amount_positive CHECK (amount > 0), ",
            "",
            "text differs",
        ),
        ("CHECK (amount > 0)", "CHECK (amount > -1)", "text differs"),
        (
            "CONSTRAINT pk_transfers PRIMARY KEY (seq)",
            "CONSTRAINT pk_transfers PRIMARY KEY (seq), note TEXT",
            "extra column note TEXT",
        ),
    ],
)
def test_constraints_and_columns_changed_by_a_rebuilt_table(
    ledger: Path, old: str, new: str, expected: str
) -> None:
    sql = " ".join(_table_sql(ledger, "transfers").split())
    assert old in sql
    if "note TEXT" in new:  # a new column needs a value in the copy: add it the SQLite way
        _run(ledger, "ALTER TABLE transfers ADD COLUMN note TEXT")
    else:
        _rebuild(ledger, "transfers", sql.replace(old, new))
    [message] = _schema(audit_ledger(ledger))
    assert "table transfers differs" in message and expected in message, message


def test_a_dropped_column_the_audit_reads_cannot_be_audited_and_says_why(ledger: Path) -> None:
    # (The views of revision 0006 read it: SQLite drops no column a view reads.)
    _run(
        ledger,
        "DROP VIEW account_holds; DROP VIEW open_holds; ALTER TABLE transfers DROP COLUMN ts_us",
    )
    with pytest.raises(CannotAudit, match=r"lacks column.*ts_us.*schema difference"):
        audit_ledger(ledger)


def test_the_command_shows_schema_problems_and_exits_1(ledger: Path) -> None:
    _run(ledger, "UPDATE alembic_version SET version_num = '0001'")
    out = io.StringIO()
    assert run_audit_command(str(ledger), as_json=True, expect_head=None, out=out) == 1
    data = json.loads(out.getvalue())
    assert data["problem_counts"]["schema"] >= 4 and data["revision"] == "0001"
    problem = next(p for p in data["problems"] if p["message"].startswith("unexpected view"))
    assert problem["expected"] is None and problem["found"].startswith("CREATE VIEW")


def test_building_the_reference_logs_no_migration_and_serves_every_thread(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The scratch migrations must not look like a migration of the ledger in an app's log."""
    import logging
    import threading

    from bank.ledger import schema_ref

    monkeypatch.setattr(schema_ref, "_reference", {})
    results: list[object] = []
    with caplog.at_level(logging.DEBUG):
        threads = [
            threading.Thread(target=lambda: results.append(reference_schemas("sqlite")))
            for _ in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    assert len(results) == 4 and all(r is results[0] for r in results)
    assert not [r for r in caplog.records if "upgrade" in r.getMessage().lower()]


def test_an_index_whose_contents_were_forged_under_its_original_text(ledger: Path) -> None:
    """An empty `WHERE 0` b-tree under the original text: every key looks free, text compares equal."""
    conn = sqlite3.connect(ledger, isolation_level=None)
    try:
        (original,) = conn.execute(
            "SELECT sql FROM sqlite_master WHERE name = 'uq_transfers_key'"
        ).fetchone()
        conn.executescript(
            'DROP INDEX uq_transfers_key; CREATE UNIQUE INDEX uq_transfers_key ON transfers ("key") '
            "WHERE 0; PRAGMA writable_schema = ON;"
        )
        conn.execute(
            "UPDATE sqlite_master SET sql = ? WHERE name = 'uq_transfers_key'", (original,)
        )
        conn.execute("PRAGMA writable_schema = OFF")
    finally:
        conn.close()
    check = sqlite3.connect(ledger)
    try:  # what the engine and any reader now see through the index: no key at all
        assert check.execute("SELECT COUNT(*) FROM transfers WHERE key = 'dep-3'").fetchone() == (
            0,
        )
    finally:
        check.close()
    report = audit_ledger(ledger)
    assert kinds(report) == {"integrity"}  # the text is the original one
    messages = [p.message for p in report.problems]
    assert any("missing from index uq_transfers_key" in m for m in messages), messages


def test_the_integrity_check_leaves_check_constraints_to_the_row_checks(ledger: Path) -> None:
    conn = sqlite3.connect(ledger, isolation_level=None)
    try:
        conn.execute("PRAGMA ignore_check_constraints = ON")
        conn.execute("UPDATE transfers SET amount = -5 WHERE seq = 3")
        conn.execute("PRAGMA ignore_check_constraints = OFF")
        assert conn.execute("PRAGMA integrity_check").fetchall() == [
            ("CHECK constraint failed in transfers",)
        ]
    finally:
        conn.close()
    report = audit_ledger(ledger)
    assert "integrity" not in kinds(report) and "bad_amount" in kinds(report)


def test_an_older_schema_claiming_head_names_its_real_revision(tmp_path: Path) -> None:
    """A 0002 ledger (no STRICT tables, no chain_formats) whose alembic_version says head."""
    from tests.test_chain_encoding import build_0002_ledger

    path = tmp_path / "old.db"
    build_0002_ledger(path)
    _run(path, f"UPDATE alembic_version SET version_num = '{head_revision()}'")
    report = audit_ledger(path)
    assert report.revision == head_revision()
    messages = _schema(report)
    assert any("the schema is exactly revision 0002's" in m for m in messages), messages
