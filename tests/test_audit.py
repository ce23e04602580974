"""Each audit rule, one at a time: a clean engine-built ledger audits clean, and each violation
(even one a forger re-hashed) is reported with its kind, seq or account, expected and found values;
the SQL views shipped by migration 0002 show the same balances to a plain `sqlite3` user."""

from __future__ import annotations

import io
import json
import sqlite3
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import Engine

import bank
from bank.errors import SchemaDowngradeRefused
from bank.ledger.audit import PROBLEMS_KEPT_MAX, audit_ledger
from bank.ledger.audit_report import run_audit_command
from bank.ledger.chain import GENESIS
from bank.ledger.migrate import head_revision, migrations_dir, upgrade_to_head
from bank.ledger.sqlite import create_ledger_engine, ledger_url
from bank.limits import AMOUNT_MAX, CASH_ACCOUNT_ID
from tests.audit_ledgers import (
    build_engine_ledger,
    copy_ledger,
    edit,
    kinds,
    named,
    rechain,
    recompute_running,
)


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("audit") / "clean.db"
    build_engine_ledger(path, transfers=1200, accounts=8, seed=3)
    return path


@pytest.fixture
def ledger(clean: Path, tmp_path: Path) -> Path:
    """A private copy of the clean ledger, to edit."""
    return copy_ledger(clean, tmp_path / "ledger.db")


def _one(db: Path, sql: str, *params: object) -> tuple[object, ...]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        row = conn.execute(sql, params).fetchone()
    finally:
        conn.close()
    assert row is not None, sql
    return tuple(row)


def _all(db: Path, sql: str, *params: object) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [tuple(r) for r in conn.execute(sql, params)]
    finally:
        conn.close()


def _recompute_balances(conn: sqlite3.Connection) -> None:
    """What a careful forger does after editing transfers: make accounts.balance and the
    rows' running balances agree."""
    recompute_running(conn)
    conn.execute(
        "UPDATE accounts SET balance = "
        "COALESCE((SELECT SUM(amount) FROM transfers WHERE credit_account_id = accounts.id), 0) - "
        "COALESCE((SELECT SUM(amount) FROM transfers WHERE debit_account_id = accounts.id), 0)"
    )


# -- a clean ledger --------------------------------------------------------------------


def test_clean_ledger_reports_what_it_audited(ledger: Path) -> None:
    report = audit_ledger(ledger)
    assert report.ok and report.problems == () and report.problems_total == 0
    last_seq, head = _one(ledger, "SELECT seq, hash FROM transfers ORDER BY seq DESC LIMIT 1")
    event_seq, event_head = _one(
        ledger, "SELECT seq, hash FROM account_events ORDER BY seq DESC LIMIT 1"
    )
    assert (report.seq, report.head_hash) == (last_seq, head)
    assert (report.accounts_seq, report.accounts_head_hash) == (event_seq, event_head)
    assert report.transfers_checked == last_seq
    assert report.accounts_checked == _one(ledger, "SELECT COUNT(*) FROM accounts")[0]
    assert report.account_events_checked == event_seq
    assert report.revision == head_revision()
    data = json.loads(report.to_json())
    assert data["ok"] is True and data["seq"] == last_seq and data["head_hash"] == head
    assert data["problems"] == [] and data["truncated"] is False


def test_empty_ledger_audits_clean_at_seq_zero(tmp_path: Path) -> None:
    path = tmp_path / "empty-ledger.db"
    with bank.Bank.open(path):
        pass
    report = audit_ledger(path)
    assert report.ok
    assert (report.seq, report.head_hash, report.transfers_checked) == (0, GENESIS, 0)
    assert report.accounts_checked == 1  # @cash


def test_bank_audit_uses_the_same_audit(tmp_path: Path) -> None:
    with bank.Bank.open(tmp_path / "live.db") as b:
        alice = b.open_account("alice", overdraft_limit=100)
        b.deposit(alice.id, 500)
        b.withdraw(alice.id, 550, key="atm-1")
        report = b.audit()
    assert report.ok and report.seq == 2


def test_expect_head_matches_or_is_a_head_mismatch(ledger: Path) -> None:
    report = audit_ledger(ledger)
    assert (
        report.head
        == f"{report.seq}:{report.head_hash}/{report.accounts_seq}:{report.accounts_head_hash}"
    )
    assert audit_ledger(ledger, expect_head=report.head).ok
    older = _one(ledger, "SELECT hash FROM transfers WHERE seq = 10")[0]
    assert isinstance(older, str)
    pin = f"10:{older}/{report.accounts_seq}:{report.accounts_head_hash}"
    late = audit_ledger(ledger, expect_head=pin)
    assert [p.kind for p in late.problems] == ["head_mismatch"]
    problem = late.problems[0]
    assert (problem.seq, problem.expected, problem.found) == (
        report.seq,
        f"10:{older}",
        f"{report.seq}:{report.head_hash}",
    )
    assert "after the pinned seq 10" in problem.message
    out = io.StringIO()
    forged = f"{report.seq}:{'f' * 64}/{report.accounts_seq}:{report.accounts_head_hash}"
    assert run_audit_command(str(ledger), as_json=True, expect_head=forged, out=out) == 1
    assert json.loads(out.getvalue())["problems"][0]["kind"] == "head_mismatch"


# -- the transfers chain and rules -----------------------------------------------------


def _row(db: Path, where: str) -> tuple[int, str, int, int, int]:
    seq, kind, debit, credit, amount = _one(
        db,
        f"SELECT seq, kind, debit_account_id, credit_account_id, amount FROM transfers WHERE {where} "
        "ORDER BY seq LIMIT 1 OFFSET 5",
    )
    assert isinstance(seq, int) and isinstance(kind, str)
    assert isinstance(debit, int) and isinstance(credit, int) and isinstance(amount, int)
    return seq, kind, debit, credit, amount


def test_edited_row_is_a_hash_mismatch_at_its_seq(ledger: Path) -> None:
    seq, *_ = _row(ledger, "kind = 'transfer'")
    with edit(ledger) as conn:
        conn.execute("UPDATE transfers SET ts_us = ts_us + 1 WHERE seq = ?", (seq,))
    report = audit_ledger(ledger)
    assert [(p.kind, p.seq) for p in report.problems] == [("hash_mismatch", seq)]
    assert (
        report.problems[0].found == _one(ledger, "SELECT hash FROM transfers WHERE seq = ?", seq)[0]
    )


def test_deleted_row_is_a_seq_gap(ledger: Path) -> None:
    seq, *_ = _row(ledger, "kind = 'deposit'")
    with edit(ledger) as conn:
        conn.execute("DELETE FROM transfers WHERE seq = ?", (seq,))
        _recompute_balances(conn)
    report = audit_ledger(ledger)
    assert ("seq_gap", seq) in [(p.kind, p.seq) for p in report.problems]
    gap = next(p for p in report.problems if p.kind == "seq_gap")
    assert (gap.expected, gap.found) == (seq, seq + 1)
    assert ("hash_mismatch", seq + 1) in [(p.kind, p.seq) for p in report.problems]


def test_overdraft_is_found_by_replay_even_when_rehashed(ledger: Path) -> None:
    seq, _, debit, _, _ = _row(ledger, "kind = 'transfer'")
    with edit(ledger) as conn:
        conn.execute("UPDATE transfers SET amount = ? WHERE seq = ?", (AMOUNT_MAX, seq))
        _recompute_balances(conn)
        rechain(conn)
    report = audit_ledger(ledger)
    assert kinds(report) == {"overdraft"}
    first = report.problems[0]
    assert (first.seq, first.account) == (seq, debit)
    assert isinstance(first.found, int) and first.found < -AMOUNT_MAX // 2
    assert isinstance(first.expected, str) and first.expected.startswith(">= ")


@pytest.mark.parametrize(
    ("sql", "kind"),
    [
        ("UPDATE transfers SET kind = 'withdrawal' WHERE seq = :seq", "kind_accounts"),
        ("UPDATE transfers SET kind = 'refund' WHERE seq = :seq", "bad_kind"),
        ("UPDATE transfers SET amount = 0 WHERE seq = :seq", "bad_amount"),
        ("UPDATE transfers SET amount = -5 WHERE seq = :seq", "bad_amount"),
        (f"UPDATE transfers SET amount = {AMOUNT_MAX + 1} WHERE seq = :seq", "bad_amount"),
        (
            "UPDATE transfers SET debit_account_id = credit_account_id WHERE seq = :seq",
            "same_account",
        ),
        ("UPDATE transfers SET credit_account_id = 999 WHERE seq = :seq", "unknown_account"),
        ("UPDATE transfers SET kind = 'transfer' WHERE seq = :seq", "kind_accounts"),
        ("UPDATE transfers SET debit_account_id = 999999 WHERE seq = :seq", "unknown_account"),
    ],
)
def test_rule_breaking_rows_are_reported_even_when_rehashed(
    ledger: Path, sql: str, kind: str
) -> None:
    seq, *_ = _row(ledger, "kind = 'deposit'")
    with edit(ledger, checks=False) as conn:
        conn.execute(sql, {"seq": seq})
        rechain(conn)
    report = audit_ledger(ledger)
    assert kind in kinds(report)
    problem = next(p for p in report.problems if p.kind == kind)
    assert problem.seq == seq
    assert "hash_mismatch" not in kinds(report)


def test_balance_overflow_is_reported(ledger: Path) -> None:
    seq, _, _, credit, _ = _row(ledger, "kind = 'deposit'")
    later = _one(
        ledger,
        "SELECT seq FROM transfers WHERE kind = 'deposit' AND credit_account_id = ? AND seq > ? ORDER BY seq",
        credit,
        seq,
    )[0]
    with edit(ledger) as conn:
        conn.execute("UPDATE transfers SET amount = ? WHERE seq IN (?, ?)", (3 * 2**61, seq, later))
        rechain(conn)
    report = audit_ledger(ledger)
    overflow = {(p.seq, p.account) for p in report.problems if p.kind == "balance_overflow"}
    # @cash gives 2**63 and goes below signed 64 bits; the customer goes above them.
    assert {(later, credit), (later, CASH_ACCOUNT_ID)} <= overflow


def test_account_used_before_its_opening(ledger: Path) -> None:
    account, event_seq, opened_at = _one(
        ledger,
        "SELECT account_id, seq, transfer_seq FROM account_events WHERE kind = 'open' AND transfer_seq > 0",
    )
    first = _one(
        ledger,
        "SELECT MIN(seq) FROM transfers WHERE ? IN (debit_account_id, credit_account_id)",
        account,
    )[0]
    assert isinstance(first, int) and isinstance(opened_at, int) and first > opened_at
    assert isinstance(account, int)
    with edit(ledger) as conn:
        conn.execute("UPDATE account_events SET transfer_seq = ? WHERE seq = ?", (first, event_seq))
        rechain(conn)
    report = audit_ledger(ledger)
    assert ("account_not_open", first, account) in [
        (p.kind, p.seq, p.account) for p in report.problems
    ]


def test_keys_must_be_unique_and_non_empty(ledger: Path) -> None:
    keyed = _all(
        ledger, "SELECT seq, key FROM transfers WHERE key IS NOT NULL ORDER BY seq LIMIT 2"
    )
    (_, k1), (s2, _) = keyed  # by seq: the duplicate is the later row
    unkeyed = _one(ledger, "SELECT seq FROM transfers WHERE key IS NULL ORDER BY seq LIMIT 1")[0]
    with edit(ledger) as conn:
        conn.execute("DROP INDEX uq_transfers_key")
        conn.execute("UPDATE transfers SET key = ? WHERE seq = ?", (k1, s2))
        # '' hashed like NULL in format 1; format 2 tells them apart ("s0:" and "n").
        conn.execute("UPDATE transfers SET key = '' WHERE seq = ?", (unkeyed,))
    report = audit_ledger(ledger)
    found = {(p.kind, p.seq) for p in report.problems}
    assert ("duplicate_key", s2) in found
    assert ("bad_key", unkeyed) in found
    assert ("hash_mismatch", unkeyed) in found
    assert "schema" in kinds(report)  # the unique index is gone


def test_overlong_key_is_reported(ledger: Path) -> None:
    seq, *_ = _row(ledger, "key IS NOT NULL")
    with edit(ledger) as conn:
        conn.execute("UPDATE transfers SET key = ? WHERE seq = ?", ("k" * 129, seq))
        rechain(conn)
    assert [(p.kind, p.seq) for p in audit_ledger(ledger).problems] == [("bad_key", seq)]


# -- accounts, balances and events -----------------------------------------------------


def test_edited_balance_is_a_mismatch_and_breaks_the_sum(ledger: Path) -> None:
    with edit(ledger) as conn:
        conn.execute("UPDATE accounts SET balance = balance + 1 WHERE id = 3")
    report = audit_ledger(ledger)
    by_kind = {p.kind: p for p in report.problems}
    assert set(by_kind) == {"balance_mismatch", "balance_sum"}
    mismatch = by_kind["balance_mismatch"]
    assert mismatch.account == 3
    assert isinstance(mismatch.expected, int) and mismatch.found == mismatch.expected + 1
    assert (by_kind["balance_sum"].expected, by_kind["balance_sum"].found) == (0, 1)


def test_limit_raised_by_editing_the_row_is_detected(ledger: Path) -> None:
    limit = _one(ledger, "SELECT overdraft_limit FROM accounts WHERE id = 2")[0]
    with edit(ledger) as conn:
        conn.execute(
            "UPDATE accounts SET overdraft_limit = 10000000, name = 'mallory' WHERE id = 2"
        )
    report = audit_ledger(ledger)
    by_kind = {p.kind: p for p in report.problems}
    assert set(by_kind) == {"limit_mismatch", "name_mismatch"}
    assert (by_kind["limit_mismatch"].account, by_kind["limit_mismatch"].expected) == (2, limit)
    assert by_kind["limit_mismatch"].found == 10_000_000
    assert (by_kind["name_mismatch"].expected, by_kind["name_mismatch"].found) == (
        "acct-001",
        "mallory",
    )


def test_limit_raised_in_its_event_breaks_the_accounts_chain(ledger: Path) -> None:
    event_seq, account = _one(
        ledger, "SELECT seq, account_id FROM account_events WHERE kind = 'limit' LIMIT 1"
    )
    with edit(ledger) as conn:
        conn.execute(
            "UPDATE account_events SET overdraft_limit = overdraft_limit + 1 WHERE seq = ?",
            (event_seq,),
        )
    report = audit_ledger(ledger)
    assert ("event_hash_mismatch", event_seq, account) in [
        (p.kind, p.event_seq, p.account) for p in report.problems
    ]


def test_accounts_and_events_must_match_one_to_one(ledger: Path) -> None:
    with edit(ledger) as conn:
        conn.execute("INSERT INTO accounts VALUES (777, 'ghost', 0, 0)")
        conn.execute("UPDATE accounts SET id = 888 WHERE id = 4")
    report = audit_ledger(ledger)
    found = {(p.kind, p.account) for p in report.problems}
    assert {("account_without_open", 777), ("account_without_open", 888)} <= found
    assert ("event_for_missing_account", 4) in found


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("UPDATE account_events SET kind = 'open' WHERE seq = :limit_seq", "opened a second time"),
        (
            "UPDATE account_events SET account_id = 555 WHERE seq = :limit_seq",
            "before the account was opened",
        ),
        (
            "UPDATE account_events SET overdraft_limit = -1 WHERE seq = :limit_seq",
            "overdraft limit",
        ),
        ("UPDATE account_events SET kind = 'freeze' WHERE seq = :limit_seq", "unknown event kind"),
        ("UPDATE account_events SET name = '' WHERE seq = :limit_seq", "name"),
        ("UPDATE account_events SET transfer_seq = 0 WHERE seq = :limit_seq", "back in time"),
        (
            "UPDATE account_events SET transfer_seq = 10000000 WHERE seq = :last_seq",
            "beyond the last transfer",
        ),
    ],
)
def test_bad_account_events_are_reported_even_when_rehashed(
    ledger: Path, sql: str, message: str
) -> None:
    limit_seq = _one(ledger, "SELECT seq FROM account_events WHERE kind = 'limit' LIMIT 1")[0]
    last_seq = _one(ledger, "SELECT MAX(seq) FROM account_events")[0]
    with edit(ledger, checks=False) as conn:
        conn.execute(sql, {"limit_seq": limit_seq, "last_seq": last_seq})
        rechain(conn)
    report = audit_ledger(ledger)
    bad = [p for p in report.problems if p.kind == "bad_event"]
    assert any(message in p.message for p in bad), report.problems
    assert "event_hash_mismatch" not in kinds(report)


def test_deleted_event_is_an_event_seq_gap(ledger: Path) -> None:
    with edit(ledger) as conn:
        conn.execute("DELETE FROM account_events WHERE seq = 3")
    report = audit_ledger(ledger)
    assert ("event_seq_gap", 3) in [(p.kind, p.event_seq) for p in report.problems]
    assert ("event_hash_mismatch", 4) in [(p.kind, p.event_seq) for p in report.problems]


# -- schema ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "DROP VIEW balance_mismatches; CREATE VIEW balance_mismatches AS "
        "SELECT account_id, name, recomputed_balance, stored_balance, difference FROM account_flows WHERE 0",
        "DROP VIEW ledger_totals",
        "CREATE TRIGGER hide AFTER INSERT ON transfers BEGIN SELECT 1; END",
    ],
)
def test_tampered_views_and_added_triggers_are_schema_problems(ledger: Path, sql: str) -> None:
    conn = sqlite3.connect(ledger)
    conn.executescript(sql)
    conn.close()
    report = audit_ledger(ledger)
    assert kinds(report) == {"schema"}


def _alembic(conn_engine: Engine, target: str, *, down: bool = False) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    with conn_engine.begin() as conn:
        cfg.attributes["connection"] = conn
        (command.downgrade if down else command.upgrade)(cfg, target)


def test_a_ledger_with_format_2_rows_is_not_downgraded(ledger: Path) -> None:
    """Revision 0002's code could not verify format-2 rows (nor 0005's format-3 rows): the
    downgrade refuses, changing nothing."""
    before = _all(ledger, "SELECT seq, hash FROM transfers ORDER BY seq")
    engine = create_ledger_engine(ledger_url(ledger))
    try:
        with pytest.raises(SchemaDowngradeRefused, match=r"format [23]"):
            _alembic(engine, "0002", down=True)
    finally:
        engine.dispose()
    assert _all(ledger, "SELECT seq, hash FROM transfers ORDER BY seq") == before
    report = audit_ledger(ledger)
    assert report.ok and report.revision == head_revision()


def test_views_migration_downgrades_and_a_0001_ledger_still_audits(tmp_path: Path) -> None:
    """A ledger with no format-2 row yet (only the @cash opening) goes down to 0001 and back."""
    path = tmp_path / "fresh.db"
    engine = create_ledger_engine(ledger_url(path))
    try:
        upgrade_to_head(engine)
        _alembic(engine, "0001", down=True)
        assert _all(path, "SELECT name FROM sqlite_master WHERE type = 'view'") == []
        report = audit_ledger(path)
        assert report.ok and report.revision == "0001"
        assert upgrade_to_head(engine) == head_revision()
    finally:
        engine.dispose()
    views = {r[0] for r in _all(path, "SELECT name FROM sqlite_master WHERE type = 'view'")}
    assert views == set(_migration_views(head_revision()))
    assert audit_ledger(path).ok


# -- the views -------------------------------------------------------------------------


def test_views_recompute_balances_like_the_audit(ledger: Path) -> None:
    flows = _all(
        ledger,
        "SELECT account_id, recomputed_balance, stored_balance, difference FROM account_flows",
    )
    assert flows and all(
        recomputed == stored and diff == 0 for _, recomputed, stored, diff in flows
    )
    assert _all(ledger, "SELECT * FROM balance_mismatches") == []
    assert _all(ledger, "SELECT * FROM account_field_mismatches") == []
    report = audit_ledger(ledger)
    totals = _one(
        ledger,
        "SELECT accounts, balance_sum, transfers, last_seq, missing_seqs, head_hash, accounts_head_hash "
        "FROM ledger_totals",
    )
    assert totals == (
        report.accounts_checked,
        0,
        report.transfers_checked,
        report.seq,
        0,
        report.head_hash,
        report.accounts_head_hash,
    )
    with edit(ledger) as conn:
        conn.execute(
            "UPDATE accounts SET balance = balance + 5, overdraft_limit = 123456 WHERE id = 1"
        )
    assert _all(ledger, "SELECT account_id, difference FROM balance_mismatches") == [(1, 5)]
    field_rows = _all(ledger, "SELECT account_id, overdraft_limit FROM account_field_mismatches")
    assert field_rows == [(1, 123456)]


# -- the report ------------------------------------------------------------------------


def test_problems_are_capped_but_counted(ledger: Path) -> None:
    with edit(ledger) as conn:
        conn.execute("UPDATE transfers SET hash = 'x'")
    report = audit_ledger(ledger)
    assert report.problems_total == report.transfers_checked > PROBLEMS_KEPT_MAX
    assert len(report.problems) == PROBLEMS_KEPT_MAX and report.truncated
    assert report.problem_counts == {"hash_mismatch": report.transfers_checked}
    data = json.loads(report.to_json())
    assert data["truncated"] is True and len(data["problems"]) == PROBLEMS_KEPT_MAX


def test_command_output_and_exit_codes(ledger: Path) -> None:
    out = io.StringIO()
    assert run_audit_command(str(ledger), as_json=False, expect_head=None, out=out) == 0
    assert "CLEAN" in out.getvalue()
    with edit(ledger) as conn:
        conn.execute("UPDATE accounts SET overdraft_limit = 99 WHERE id = 1")
    out = io.StringIO()
    assert run_audit_command(str(ledger), as_json=False, expect_head=None, out=out) == 1
    text = out.getvalue()
    assert "1 PROBLEM" in text and "limit_mismatch" in text
    out = io.StringIO()
    assert run_audit_command(str(ledger), as_json=True, expect_head=None, out=out) == 1
    data = json.loads(out.getvalue())
    assert data["ok"] is False
    assert data["problems"][0]["kind"] == "limit_mismatch"
    assert (data["problems"][0]["account"], data["problems"][0]["found"]) == (1, 99)


def test_cash_balance_edit_names_cash(ledger: Path) -> None:
    with edit(ledger) as conn:
        conn.execute("UPDATE accounts SET balance = balance - 1 WHERE id = ?", (CASH_ACCOUNT_ID,))
    seqs, accounts, _ = named(audit_ledger(ledger))
    assert accounts == {CASH_ACCOUNT_ID} and seqs == set()


def _migration_views(revision: str) -> dict[str, str]:
    """The views migration `revision` creates, from its own frozen copy (`VIEWS`)."""
    import importlib.util

    from bank.ledger.migrate import migrations_dir

    [path] = (migrations_dir() / "versions").glob(f"{revision}_*.py")
    spec = importlib.util.spec_from_file_location(f"rev{revision}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    views: dict[str, str] = module.VIEWS
    return views
