"""The read-only readers take a path or a URL, and say clearly what they cannot read."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

import bank
from bank.check_history import check_history
from bank.cli import main
from bank.errors import CannotCheckHistory, UnsupportedLedgerUrl
from bank.ledger.reader import LedgerReader


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("readers")
    db, history = root / "sim.db", root / "sim.jsonl"
    assert main(["simulate", "--db", str(db), "--ops", "200", "--tellers", "2", "--window", "4",
                 "--accounts", "8", "--seed", "3", "--history", str(history),
                 "--no-progress"]) == 0  # fmt: skip
    return history, db


def test_a_sqlite_url_reads_as_its_path(recorded: tuple[Path, Path]) -> None:
    history, db = recorded
    with LedgerReader(db) as by_path, LedgerReader(f"sqlite:///{db}") as by_url:
        assert by_url.path == db and by_url.accounts() == by_path.accounts()
        assert by_url.history(1) == by_path.history(1)
    by_file, by_url_check = check_history(history, db), check_history(history, f"sqlite:///{db}")
    assert by_file.ok and by_url_check.ok
    assert by_url_check.rows_checked == by_file.rows_checked > 0


def test_a_url_of_another_kind_of_database_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedLedgerUrl, match="not in a database of kind 'mysql'"):
        LedgerReader("mysql://u@localhost/ledger")
    with pytest.raises(UnsupportedLedgerUrl, match="in-memory"):
        LedgerReader("sqlite://")


def test_check_history_of_a_ledger_with_a_table_dropped(
    recorded: tuple[Path, Path], tmp_path: Path
) -> None:
    history, db = recorded
    copy = tmp_path / "copy.db"
    copy.write_bytes(db.read_bytes())
    conn = sqlite3.connect(copy)
    conn.executescript("DROP VIEW IF EXISTS account_field_mismatches; DROP TABLE account_events;")
    conn.close()
    with pytest.raises(CannotCheckHistory, match="not a ledger"):
        check_history(history, copy)


def test_a_reader_of_a_file_a_bank_of_this_process_owns(tmp_path: Path) -> None:
    path = tmp_path / "owned.db"
    with bank.Bank.open(path) as b:
        b.open_account("a")
        with LedgerReader(f"sqlite:///{path}") as reader:
            assert [a.name for a in reader.accounts()] == ["@cash", "a"]


def test_a_postgres_server_that_cannot_be_reached_is_a_one_line_reason(
    recorded: tuple[Path, Path],
) -> None:
    pytest.importorskip("psycopg")
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql+psycopg://bank:secret@127.0.0.1:{port}/ledger?connect_timeout=5"
    with pytest.raises(bank.CannotOpenLedger, match="PostgreSQL could not be read") as info:
        LedgerReader(url)
    assert "secret" not in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(CannotCheckHistory, match="could not be read") as checked:
        check_history(recorded[0], url)
    assert "secret" not in str(checked.value)
