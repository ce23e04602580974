"""The audit never writes: a ledger (at rest, with WAL content, or open in a live bank) keeps its
bytes and modification times, and whatever is not an auditable ledger is refused with exit 2 and a
one-line reason, with nothing created or changed."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

import bank
from bank.errors import CannotAudit
from bank.ledger.audit import audit_ledger
from bank.ledger.audit_report import run_audit_command
from tests.audit_ledgers import build_engine_ledger, copy_ledger


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("readonly") / "clean.db"
    build_engine_ledger(path, transfers=600, accounts=6, seed=5)
    return path


def _state(directory: Path, *, skip: tuple[str, ...] = ()) -> dict[str, tuple[str, int]]:
    """Every file in `directory`: (sha256 of its bytes, mtime in ns)."""
    return {
        p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(directory.iterdir())
        if p.is_file() and not p.name.endswith(skip)
    }


def _audit_every_way(path: Path) -> None:
    """The library call, the command in both formats, and with an expected head."""
    report = audit_ledger(path)
    assert report.ok, report.problems[:5]
    for as_json in (False, True):
        assert (
            run_audit_command(
                str(path), as_json=as_json, expect_head=report.head, out=io.StringIO()
            )
            == 0
        )


def test_audit_of_a_ledger_at_rest_changes_and_creates_nothing(clean: Path, tmp_path: Path) -> None:
    ledger = copy_ledger(clean, tmp_path / "ledger.db")
    before = _state(tmp_path)
    assert list(before) == ["ledger.db"]
    _audit_every_way(ledger)
    assert _state(tmp_path) == before  # not even a -wal or -shm file appears


def test_audit_of_a_ledger_with_wal_content_leaves_db_and_wal_unchanged(tmp_path: Path) -> None:
    live = tmp_path / "live"
    image = tmp_path / "image"
    live.mkdir()
    image.mkdir()
    with bank.Bank.open(live / "ledger.db") as b:
        alice = b.open_account("alice", overdraft_limit=50)
        for n in range(40):
            b.deposit(alice.id, 100 + n, key=f"dep-{n}")
        b.withdraw(alice.id, 4000)
        # A crash image: the main file and its WAL, as `kill -9` would leave them.
        for name in ("ledger.db", "ledger.db-wal"):
            shutil.copy2(live / name, image / name)
    assert (image / "ledger.db-wal").stat().st_size > 0
    before = _state(image)
    report = audit_ledger(image / "ledger.db")
    assert report.ok and report.seq == 41  # the transfers that live only in the WAL are seen
    _audit_every_way(image / "ledger.db")
    # SQLite's readers may create the -shm index file (no ledger data); nothing else changes.
    assert _state(image, skip=("-shm",)) == before


def test_audit_of_an_open_idle_bank_leaves_db_and_wal_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with bank.Bank.open(path) as b:
        alice = b.open_account("alice")
        for _ in range(20):
            b.deposit(alice.id, 7)
        before = _state(tmp_path, skip=("-shm",))
        report = b.audit()
        assert report.ok and report.seq == 20
        _audit_every_way(path)
        assert _state(tmp_path, skip=("-shm",)) == before
        assert b.balance(alice.id) == 140  # the bank carries on


def _missing(path: Path) -> None:
    pass


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _text(path: Path) -> None:
    path.write_text("account,balance\nalice,100\n")


def _garbage_after_header(path: Path) -> None:
    path.write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 20)


def _other_program(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
    conn.execute("INSERT INTO notes (body) VALUES ('hello')")
    conn.commit()
    conn.close()


def _empty_database(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 1")  # a valid SQLite file with no tables
    conn.close()


def _tables_without_revision(clean: Path) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        copy_ledger(clean, path)
        conn = sqlite3.connect(path)
        conn.execute("DROP TABLE alembic_version")
        conn.commit()
        conn.close()

    return make


def _newer_revision(clean: Path) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        copy_ledger(clean, path)
        conn = sqlite3.connect(path)
        conn.execute("UPDATE alembic_version SET version_num = '9999_from_the_future'")
        conn.commit()
        conn.close()

    return make


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (_missing, "no such file"),
        (_empty, "empty file"),
        (_text, "not an SQLite database"),
        (_garbage_after_header, "SQLite could not"),
        (_other_program, "another program"),
        (_empty_database, "empty SQLite database"),
        ("tables_without_revision", "no schema revision"),
        ("newer_revision", "newer"),
    ],
)
def test_what_is_not_an_auditable_ledger_is_exit_2_and_untouched(
    clean: Path, tmp_path: Path, make: Callable[[Path], None] | str, reason: str
) -> None:
    if make == "tables_without_revision":
        make = _tables_without_revision(clean)
    elif make == "newer_revision":
        make = _newer_revision(clean)
    assert callable(make)
    path = tmp_path / "suspect.db"
    make(path)
    before = _state(tmp_path)
    with pytest.raises(CannotAudit, match=reason):
        audit_ledger(path)
    out, err = io.StringIO(), io.StringIO()
    assert run_audit_command(str(path), as_json=False, expect_head=None, out=out, err=err) == 2
    assert out.getvalue() == ""
    text = err.getvalue()
    assert text.count("\n") == 1 and reason in text and text.startswith("bank audit: cannot audit:")
    out = io.StringIO()
    assert run_audit_command(str(path), as_json=True, expect_head=None, out=out) == 2
    data = json.loads(out.getvalue())
    assert data["ok"] is False and reason in data["error"]
    # Nothing written, nothing created (not even the missing file).
    assert _state(tmp_path) == before


def test_a_directory_is_exit_2(tmp_path: Path) -> None:
    with pytest.raises(CannotAudit, match="not a regular file"):
        audit_ledger(tmp_path)
