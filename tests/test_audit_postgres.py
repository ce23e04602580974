"""The audit on PostgreSQL: the same ledger content (same rows, same hashes) as an SQLite
file gives the same head and, tampered the same way, the same problems; the audit's
transaction refuses writes; memory stays flat.

Runs on the shared test server (`pg_url`: a fresh database per test). PostgreSQL ledgers
are migrated to head, then hold the SQLite ledger's rows
(`tests.audit_ledgers.copy_to_postgres`).
"""

from __future__ import annotations

import secrets
import sqlite3
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from bank.ledger.audit import AuditReport, audit, audit_ledger
from tests.audit_ledgers import build_engine_ledger, copy_ledger, copy_to_postgres

psycopg = pytest.importorskip("psycopg")


def _libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


@pytest.fixture(scope="module")
def engine_ledger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("audit-pg") / "clean.db"
    build_engine_ledger(path, transfers=2_500)
    return path


def _same(a: AuditReport, b: AuditReport) -> None:
    """Everything but the location and the timing."""
    assert a.head == b.head
    assert (a.revision, a.transfers_checked, a.accounts_checked, a.account_events_checked) == (
        b.revision,
        b.transfers_checked,
        b.accounts_checked,
        b.account_events_checked,
    )
    assert [p.as_dict() for p in a.problems] == [p.as_dict() for p in b.problems]
    assert a.problem_counts == b.problem_counts


def test_the_same_ledger_audits_clean_with_the_same_head(engine_ledger: Path, pg_url: str) -> None:
    copy_to_postgres(engine_ledger, pg_url)
    on_sqlite = audit_ledger(engine_ledger)
    on_postgres = audit_ledger(pg_url)
    assert on_sqlite.ok and on_postgres.ok, on_postgres.problems[:3]
    _same(on_sqlite, on_postgres)
    assert on_postgres.path == pg_url  # no password in this URL: shown as given
    pinned = audit_ledger(pg_url, expect_head=on_sqlite.head)
    assert pinned.ok


def test_workers_read_the_exported_snapshot(
    engine_ledger: Path, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The fast path: seq ranges checked by worker processes on `pg_export_snapshot()`."""
    import logging

    copy_to_postgres(engine_ledger, pg_url)
    with caplog.at_level(logging.INFO, logger="bank.ledger.audit"):
        fast = audit(pg_url, processes=3, parallel_rows_min=1)
    assert fast.ok
    assert not any("exact pass" in r.getMessage() for r in caplog.records)
    _same(fast, audit_ledger(engine_ledger))


#: Forgeries in SQL both databases take, each with what it must be found as.
TAMPERS: dict[str, tuple[str, str]] = {
    "amount": ("UPDATE transfers SET amount = amount + 1 WHERE seq = 100", "hash_mismatch"),
    "deleted_row": ("DELETE FROM transfers WHERE seq = 200", "seq_gap"),
    "balance": ("UPDATE accounts SET balance = balance + 7 WHERE id = 3", "balance_mismatch"),
    "event_limit": (
        "UPDATE account_events SET overdraft_limit = overdraft_limit + 1000 WHERE seq = 5",
        "event_hash_mismatch",
    ),
    "account_limit": (
        "UPDATE accounts SET overdraft_limit = overdraft_limit + 1 WHERE id = 4",
        "limit_mismatch",
    ),
    "key_dropped": (
        "UPDATE transfers SET key = NULL WHERE seq = "
        "(SELECT min(seq) FROM transfers WHERE key IS NOT NULL)",
        "hash_mismatch",
    ),
    "format_moved": (
        "UPDATE chain_formats SET first_seq = 50 WHERE chain = 'transfers' AND first_seq = 1",
        "chain_format",
    ),
    "last_row_gone": ("DELETE FROM transfers WHERE seq = (SELECT max(seq) FROM transfers)", ""),
}


@pytest.mark.parametrize("tamper", sorted(TAMPERS))
def test_the_same_forgery_gives_the_same_problems(
    tamper: str, engine_ledger: Path, pg_url: str, tmp_path: Path
) -> None:
    statement, kind = TAMPERS[tamper]
    copy_to_postgres(engine_ledger, pg_url)
    head = audit_ledger(engine_ledger).head
    path = copy_ledger(engine_ledger, tmp_path / "forged.db")
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute(statement)
    finally:
        conn.close()
    with psycopg.connect(_libpq(pg_url), autocommit=True) as pg:
        pg.execute(statement)
    on_sqlite = audit_ledger(path, expect_head=head)
    on_postgres = audit_ledger(pg_url, expect_head=head)
    assert not on_sqlite.ok
    if kind:
        assert kind in on_sqlite.problem_counts, on_sqlite.problem_counts
    else:
        assert "head_mismatch" in on_sqlite.problem_counts
    _same(on_sqlite, on_postgres)
    # The fast path (worker processes on the exported snapshot) finds the same, too.
    _same(on_postgres, audit(pg_url, expect_head=head, processes=2, parallel_rows_min=1))


def test_a_rechained_forgery_copied_to_postgres_is_found_the_same(
    engine_ledger: Path, pg_url: str, tmp_path: Path
) -> None:
    """A forger who re-hashes both chains: only the replay and the cross-checks remain."""
    from tests.audit_ledgers import edit, rechain

    path = copy_ledger(engine_ledger, tmp_path / "rechained.db")
    with edit(path) as conn:
        conn.execute("UPDATE transfers SET amount = amount + 50000000 WHERE seq = 300")
        rechain(conn)
    copy_to_postgres(path, pg_url)
    on_sqlite = audit_ledger(path)
    assert {"balance_mismatch"} <= on_sqlite.problem_counts.keys()
    _same(on_sqlite, audit_ledger(pg_url))


def test_the_audit_transaction_refuses_writes(engine_ledger: Path, pg_url: str) -> None:
    from sqlalchemy.engine import make_url

    from bank.ledger.postgres.snapshot import open_snapshot

    copy_to_postgres(engine_ledger, pg_url)

    class Where:
        url = make_url(pg_url)

    with open_snapshot(Where()) as snap:
        conn: Any = snap._conn
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("UPDATE accounts SET balance = 0 WHERE id = 1")
    assert audit_ledger(pg_url).ok


def test_what_is_not_a_ledger_cannot_be_audited(pg_url: str) -> None:
    from bank.errors import CannotAudit

    with pytest.raises(CannotAudit, match="an empty PostgreSQL database, not a ledger"):
        audit_ledger(pg_url)
    with psycopg.connect(_libpq(pg_url), autocommit=True) as pg:
        pg.execute("CREATE TABLE orders (id int)")
    with pytest.raises(CannotAudit, match="of another program"):
        audit_ledger(pg_url)
    base, _, _ = pg_url.rpartition("/")
    with pytest.raises(CannotAudit, match="could not be reached"):
        audit_ledger(f"{base}/audit_no_such_database_{secrets.token_hex(3)}")


def _synthetic(url: str, transfers: int, tmp_path: Path) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
    from bench_audit import build_postgres_ledger

    build_postgres_ledger(url, transfers, accounts=200)


def test_memory_stays_flat_on_a_longer_ledger(
    pg_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The traced peak of a ledger 8x as long grows by far less than its rows would take."""
    _synthetic(pg_url, 60_000, tmp_path)
    tracemalloc.start()
    try:
        report = audit(pg_url, processes=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert report.ok, report.problems[:3]
    assert report.transfers_checked == 60_000
    # 60,000 rows of ~10 Python objects (revision 0005's running balances included) would
    # be > 40 MiB held at once; a stream holds a batch or two (seen at 17-21 MiB: the
    # driver's buffers and the other threads' allocations are traced too).
    assert peak < 28 * 2**20, peak
