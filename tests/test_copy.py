"""`bank copy` / `copy_ledger` copies a ledger row for row between backends, the copy audits
clean with the source's head and a bank goes on writing it; every refusal and failure
leaves the destination empty (real SQLite files and real PostgreSQL databases)."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest
from alembic import command
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

import bank
from bank.cli import main
from bank.errors import CannotCopy, DestinationNotEmpty, LedgerBusy
from bank.ledger.audit import audit_ledger
from bank.ledger.copy import copy_ledger
from bank.ledger.migrate import ALEMBIC_LOCK, alembic_config
from tests.conftest import LedgerDb
from tests.postgres import libpq_conninfo

pytestmark = pytest.mark.timeout(300)

#: The customer accounts `build_source` opens first (ids in opening order).
ALICE, BOB, SHOP = 1, 2, 3

#: Every table of a ledger and the order that lists its rows completely.
TABLE_ORDER = {
    "accounts": "id",
    "account_events": "seq",
    "transfers": "seq",
    "chain_formats": "chain, first_seq",
    "alembic_version": "version_num",
}


def build_source(path: Path) -> None:
    """A ledger made by the engine: keys, limit changes, accounts opened late, refused
    operations (which leave no row)."""
    with bank.Bank.open(path) as b:
        alice = b.open_account("alice", overdraft_limit=10_00).id
        bob = b.open_account("bob").id
        shop = b.open_account("shop", overdraft_limit=50_00).id
        assert (alice, bob, shop) == (ALICE, BOB, SHOP)
        b.deposit(alice, 100_00, key="pay-alice")
        b.deposit(bob, 40_00)
        for i in range(120):
            b.transfer(alice if i % 2 else bob, shop, 10 + i, key=f"order-{i}" if i % 3 else None)
            if i == 50:
                b.set_overdraft_limit(bob, 25_00)
        late = b.open_account("late", overdraft_limit=5_00).id
        b.transfer(shop, late, 7_00, key="late-1")
        with pytest.raises(bank.InsufficientFunds):
            b.withdraw(late, 10**6, key="too-much")
        with pytest.raises(bank.AccountNotFound):
            b.deposit(9_999, 1)
        b.set_overdraft_limit(alice, 0)


def rows(db: LedgerDb) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every ledger table, in a total order."""
    return {t: db.query(f"SELECT * FROM {t} ORDER BY {order}") for t, order in TABLE_ORDER.items()}


def pg_db(url: str) -> LedgerDb:
    return LedgerDb("postgres", url, url)


def pg_tables(url: str) -> list[str]:
    with psycopg.connect(libpq_conninfo(url), autocommit=True) as conn:
        found = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchall()
    return sorted(str(r[0]) for r in found)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "source.db"
    build_source(path)
    return path


# -- the copy itself ------------------------------------------------------------------------


def test_sqlite_to_postgres_is_verbatim_and_a_bank_goes_on(source: Path, pg_url: str) -> None:
    before = audit_ledger(source)
    report = copy_ledger(source, pg_url)
    assert report.ok, report.audit.problems
    assert report.source_head == report.destination_head == before.head
    assert report.audit.expect_head == before.head
    assert report.rows["transfers"] == before.seq and report.rows_total > before.seq
    assert rows(pg_db(pg_url)) == rows(LedgerDb.sqlite(source))  # identical, row for row
    with bank.Bank.open(source) as b:
        order_1 = b.find("order-1")  # i = 1: alice -> shop, 11
    assert order_1 is not None
    with bank.Bank.open(pg_url) as b:
        assert b.find("order-1") == order_1
        assert b.transfer(ALICE, SHOP, 11, key="order-1") == order_1  # still exactly-once
        receipt = b.transfer(ALICE, SHOP, 1_00)
        assert receipt.seq == before.seq + 1
        assert b.snapshot().seq == before.seq + 1
    after = audit_ledger(pg_url)
    assert after.ok and after.seq == before.seq + 1


def test_postgres_to_sqlite_round_trip(source: Path, pg_url: str, tmp_path: Path) -> None:
    assert copy_ledger(source, pg_url).ok
    back = tmp_path / "back" / "ledger.db"
    back.parent.mkdir()
    report = copy_ledger(pg_url, back)
    assert report.ok and report.destination_head == audit_ledger(source).head
    assert rows(LedgerDb.sqlite(back)) == rows(LedgerDb.sqlite(source))
    with bank.Bank.open(back) as b:
        assert b.snapshot().seq == report.rows["transfers"]
        assert b.deposit(SHOP, 1).seq == report.rows["transfers"] + 1


def test_a_copy_while_a_bank_writes_the_source_is_a_prefix(tmp_path: Path, pg_url: str) -> None:
    path = tmp_path / "busy.db"
    build_source(path)
    stop = threading.Event()
    failures: list[BaseException] = []
    with bank.Bank.open(path) as b:

        def write() -> None:
            try:
                write_until_stopped()
            except BaseException as exc:  # the test must see it, not a thread warning
                failures.append(exc)

        def write_until_stopped() -> None:
            # There and back in each batch: however long the copy takes, nobody runs dry.
            while not stop.is_set():
                commands = [
                    bank.Transfer(source=a, target=z, amount=1)
                    for _ in range(25)
                    for a, z in ((SHOP, ALICE), (ALICE, SHOP))
                ]
                for f in b.submit_many(commands):
                    f.result()

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        try:
            report = copy_ledger(path, pg_url)
        finally:
            stop.set()
            writer.join(60)
    assert not writer.is_alive() and failures == []
    assert report.ok, report.audit.problems
    copied = report.rows["transfers"]
    source_rows = LedgerDb.sqlite(path).query("SELECT * FROM transfers ORDER BY seq")
    assert len(source_rows) > copied  # the bank went on after the snapshot
    assert pg_db(pg_url).query("SELECT * FROM transfers ORDER BY seq") == source_rows[:copied]


def test_the_cli_copies_and_reports(
    source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "copy.db"
    assert main(["copy", "--from", str(source), "--to", str(target), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["heads_match"] and out["audit"]["ok"]
    assert out["source_head"] == out["destination_head"] == audit_ledger(source).head
    assert out["rows"]["transfers"] == audit_ledger(source).seq and out["rows_per_s"] > 0
    again = tmp_path / "again.db"
    assert main(["copy", "--from", str(source), "--to", str(again)]) == 0
    text = capsys.readouterr().out
    assert "rows/s" in text and "(the same)" in text and "CLEAN" in text
    assert main(["copy", "--from", str(source), "--to", str(again)]) == 2  # not empty now
    assert "not empty" in capsys.readouterr().err


def test_a_damaged_source_is_copied_and_its_audit_says_so(
    source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A row edited within the constraints: the copy takes it as it is, and the copy's audit
    (the same rules on the same rows) finds it: exit 1, not a clean copy."""
    conn = sqlite3.connect(source)
    conn.execute("UPDATE transfers SET amount = amount + 1 WHERE seq = 40")
    conn.commit()
    conn.close()
    target = tmp_path / "copy.db"
    assert main(["copy", "--from", str(source), "--to", str(target)]) == 1
    captured = capsys.readouterr()
    assert "hash_mismatch" in captured.out and "the source is damaged too" in captured.err
    report = audit_ledger(target)
    assert not report.ok and 40 in {p.seq for p in report.problems}


# -- refusals: the destination is left as it was ------------------------------------------------


def test_a_destination_holding_a_ledger_is_refused(source: Path, ledger_db: LedgerDb) -> None:
    with bank.Bank.open(ledger_db.db) as b:
        b.deposit(b.open_account("someone").id, 5)
    before = rows(ledger_db)
    with pytest.raises(DestinationNotEmpty, match=r"not empty.*already holds a ledger"):
        copy_ledger(source, ledger_db.db)
    assert rows(ledger_db) == before


def test_a_destination_with_other_tables_is_refused(source: Path, ledger_db: LedgerDb) -> None:
    if ledger_db.backend == "sqlite":
        conn = sqlite3.connect(ledger_db.path)
        conn.execute("CREATE TABLE notes (body TEXT)")
        conn.commit()
        conn.close()
    else:
        ledger_db.execute("CREATE TABLE notes (body TEXT)")
    with pytest.raises(DestinationNotEmpty, match=r"not empty.*notes"):
        copy_ledger(source, ledger_db.db)
    assert ledger_db.query("SELECT count(*) FROM notes") == [(0,)]


def test_a_destination_a_bank_has_open_is_busy(source: Path, ledger_db: LedgerDb) -> None:
    with bank.Bank.open(ledger_db.db) as b:
        with pytest.raises(LedgerBusy):
            copy_ledger(source, ledger_db.db)
        assert b.snapshot().seq == 0  # untouched, still working
        b.deposit(b.open_account("after").id, 1)


def test_a_missing_or_foreign_source_is_refused(tmp_path: Path, pg_url: str) -> None:
    target = tmp_path / "copy.db"
    with pytest.raises(CannotCopy, match="no such file"):
        copy_ledger(tmp_path / "absent.db", target)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a ledger\n")
    with pytest.raises(CannotCopy, match="not an SQLite database"):
        copy_ledger(notes, target)
    foreign = tmp_path / "foreign.db"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE t (x)")
    conn.close()
    with pytest.raises(CannotCopy, match="another program"):
        copy_ledger(foreign, target)
    with pytest.raises(CannotCopy, match="empty PostgreSQL database"):
        copy_ledger(pg_url, target)
    assert not target.exists()
    assert pg_tables(pg_url) == []


def test_a_source_at_an_older_revision_is_refused(tmp_path: Path, pg_url: str) -> None:
    # Accounts only: the engine's transfers are hash format 3 (revision 0006), which no
    # downgrade below 0006 keeps.
    source = tmp_path / "old.db"
    with bank.Bank.open(source) as b:
        b.open_account("alice")
    engine = create_engine(f"sqlite:///{source}", poolclass=NullPool)
    try:
        with ALEMBIC_LOCK, engine.begin() as conn:
            cfg = alembic_config()
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0003")
    finally:
        engine.dispose()
    with pytest.raises(CannotCopy, match=r"revision 0003 is older.*bank init --db"):
        copy_ledger(source, pg_url)
    assert pg_tables(pg_url) == []
    with bank.Bank.open(source):  # what the message says to do (`bank init` opens it so)
        pass
    assert copy_ledger(source, pg_url).ok


def test_the_same_ledger_is_refused(source: Path, pg_url: str) -> None:
    link = source.with_name("link.db")
    link.symlink_to(source)
    before = rows(LedgerDb.sqlite(source))
    for dst in (source, f"sqlite:///{source}", link):
        with pytest.raises(CannotCopy, match="the same ledger"):
            copy_ledger(source, dst)
    assert rows(LedgerDb.sqlite(source)) == before
    with pytest.raises(CannotCopy, match="the same ledger"):
        copy_ledger(pg_url, pg_url)


# -- a failure in the middle leaves the destination empty -----------------------------------------

#: Source edits that the destination's constraints refuse (made with plain sqlite3, whose
#: foreign keys are off and whose CHECKs `ignore_check_constraints` turns off).
TAMPERS = {
    "dangling account": "UPDATE transfers SET credit_account_id = 999 WHERE seq = 100",
    "zero amount": "UPDATE transfers SET amount = 0 WHERE seq = 100",
}


@pytest.mark.parametrize("tamper", sorted(TAMPERS))
def test_a_row_the_destination_refuses_leaves_it_empty(
    source: Path, ledger_db: LedgerDb, tamper: str
) -> None:
    conn = sqlite3.connect(source)
    conn.execute("PRAGMA ignore_check_constraints = ON")
    original = conn.execute("SELECT credit_account_id, amount FROM transfers WHERE seq = 100")
    credit, amount = original.fetchone()
    conn.execute(TAMPERS[tamper])
    conn.commit()
    with pytest.raises(CannotCopy, match=r"refused a row of the source.*left empty"):
        copy_ledger(source, ledger_db.db)
    if ledger_db.backend == "sqlite":
        leftovers = [p.name for p in ledger_db.path.parent.iterdir() if p.name.startswith("ledger")]
        assert leftovers == []  # the file this copy created is gone, side files too
    else:
        assert pg_tables(ledger_db.url) == []
    # The destination is as new: the source put right copies into it.
    conn.execute(
        "UPDATE transfers SET credit_account_id = ?, amount = ? WHERE seq = 100", (credit, amount)
    )
    conn.commit()
    conn.close()
    report = copy_ledger(source, ledger_db.db)
    assert report.ok, report.audit.problems
