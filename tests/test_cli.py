"""Every `bank` command has help and the documented exit codes on real, missing, foreign files."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

import bank
from bank.cli import build_parser, main

COMMANDS = ["simulate", "audit", "copy", "init", "accounts", "history"]


@pytest.fixture
def small_ledger(tmp_path: Path) -> Path:
    """A ledger with two customers and a few transfers (one with a key)."""
    path = tmp_path / "small.db"
    with bank.Bank.open(path) as b:
        alice = b.open_account("alice")
        shop = b.open_account("shop", overdraft_limit=5_00)
        b.deposit(alice.id, 100_00)
        b.transfer(alice.id, shop.id, 25_00, key="order-1")
        b.withdraw(shop.id, 30_00)
    return path


@pytest.fixture
def not_a_ledger(tmp_path: Path) -> Path:
    path = tmp_path / "notes.txt"
    path.write_text("this is not a ledger\n")
    return path


def test_every_command_is_listed_and_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    top = parser.format_help()
    for command in COMMANDS:
        assert command in top
        assert main([command, "--help"]) == 0
        text = capsys.readouterr().out
        assert f"usage: bank {command}" in text
        assert len(text) > 200, f"{command} --help is too thin"
    assert main(["--help"]) == 0
    assert "exit" in capsys.readouterr().out.lower()


def test_no_command_and_unknown_options_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert main(["accounts"]) == 2  # --db is required
    assert main(["frobnicate"]) == 2
    assert capsys.readouterr().err


def test_python_dash_m_bank_works() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bank", "--help"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0
    assert "simulate" in done.stdout


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
@pytest.mark.parametrize(
    "command",
    [["accounts"], ["history", "alice", "--format", "csv"], ["audit", "--json"], ["balance", "1"]],
)
def test_a_full_standard_output_is_named_and_no_traceback(
    small_ledger: Path, command: list[str]
) -> None:
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "bank", *command, "--db", str(small_ledger)],
            check=False,
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        f"bank {command[0]}: cannot write to standard output: No space left on device"
    )


def test_init_creates_then_upgrades(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "new.db"
    assert main(["init", "--db", str(path)]) == 0
    out = capsys.readouterr().out
    assert "created" in out and "revision" in out and "@cash" in out
    assert main(["init", "--db", str(path)]) == 0
    assert "opened existing" in capsys.readouterr().out
    assert main(["audit", "--db", str(path)]) == 0


def test_init_refuses_what_it_must_not_touch(
    tmp_path: Path, not_a_ledger: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = not_a_ledger.read_bytes()
    assert main(["init", "--db", str(not_a_ledger)]) == 2
    assert not_a_ledger.read_bytes() == before
    assert main(["init", "--db", str(tmp_path / "no" / "such" / "dir.db")]) == 2
    err = capsys.readouterr().err
    assert err.count("bank init:") == 2
    assert "Traceback" not in err


def test_accounts_lists_balances(small_ledger: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["accounts", "--db", str(small_ledger), "--format", "table"]) == 0
    out = capsys.readouterr().out
    assert "alice" in out and "shop" in out and "75.00" in out and "-5.00" in out
    assert main(["accounts", "--db", str(small_ledger), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["@cash", "alice", "shop"]
    assert {r["name"]: r["balance"] for r in rows} == {
        "@cash": -70_00,
        "alice": 75_00,
        "shop": -5_00,
    }
    assert all(type(r["balance"]) is int for r in rows)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_accounts_show_what_holds_reserve_and_which_are_closed(
    backend: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest
) -> None:
    db = (
        str(tmp_path / "holds.db")
        if backend == "sqlite"
        else str(request.getfixturevalue("pg_url"))
    )
    with bank.Bank.open(db) as b:
        alice = b.open_account("alice", 10_00).id
        shop = b.open_account("shop").id
        gone = b.open_account("gone").id
        b.deposit(alice, 50_00)
        b.hold(alice, shop, 20_00)
        b.hold(alice, shop, 5_00)
        posted = b.hold(alice, shop, 1_00)
        b.post(posted.seq)  # settled: no longer held
        b.close_account(gone)
    assert main(["accounts", "--db", db, "--format", "json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["alice"] == {
        "id": alice,
        "name": "alice",
        "balance": 49_00,
        "overdraft_limit": 10_00,
        "held": 25_00,
        "available": 49_00 + 10_00 - 25_00,
        "closed": False,
    }
    assert rows["gone"]["closed"] is True and rows["shop"]["closed"] is False
    assert rows["@cash"]["available"] is None and rows["@cash"]["held"] == 0
    assert main(["accounts", "--db", db, "--format", "table"]) == 0
    out = capsys.readouterr().out
    assert "held" in out and "available" in out and "34.00" in out and "25.00" in out
    assert "3 customer account(s), 1 closed" in out
    assert [line.split()[-1] for line in out.splitlines() if "gone" in line] == ["closed"]
    assert main(["accounts", "--db", db, "--format", "csv"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert {r["name"]: (r["held"], r["closed"]) for r in table}["alice"] == ("2500", "False")


def test_history_by_id_name_and_limit(
    small_ledger: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["history", "alice", "--db", str(small_ledger), "--json"]) == 0
    receipts = json.loads(capsys.readouterr().out)
    assert [r["kind"] for r in receipts] == ["deposit", "transfer"]
    assert receipts[1]["key"] == "order-1" and receipts[1]["amount"] == 25_00
    assert main(["history", "2", "--db", str(small_ledger), "--limit", "1", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 1
    assert main(["history", "shop", "--db", str(small_ledger), "--format", "table"]) == 0
    out = capsys.readouterr().out
    assert "order-1" in out and "withdrawal" in out
    assert main(["history", "@cash", "--db", str(small_ledger), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 2


def test_history_of_an_unknown_account_exits_1(
    small_ledger: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["history", "999", "--db", str(small_ledger)]) == 1
    assert main(["history", "nobody", "--db", str(small_ledger)]) == 1
    err = capsys.readouterr().err
    assert "AccountNotFound" in err and "Traceback" not in err


@pytest.mark.parametrize("command", [["accounts"], ["history", "1"], ["audit"]])
def test_missing_file_exits_2_and_creates_nothing(
    tmp_path: Path, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.db"
    assert main([*command, "--db", str(missing)]) == 2
    assert not missing.exists()
    captured = capsys.readouterr()
    assert (captured.err + captured.out).strip()  # `bank audit` prints its reason on stdout


@pytest.mark.parametrize("command", [["accounts"], ["history", "1"], ["audit"], ["init"]])
def test_a_file_that_is_not_a_ledger_exits_2_untouched(
    not_a_ledger: Path, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    before = not_a_ledger.read_bytes()
    assert main([*command, "--db", str(not_a_ledger)]) == 2
    assert not_a_ledger.read_bytes() == before
    captured = capsys.readouterr()
    said = captured.err + captured.out  # `bank audit` prints its reason on stdout
    assert said.strip() and "Traceback" not in said


def test_another_programs_sqlite_database_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
    for command in (["accounts"], ["history", "1"], ["audit"], ["init"]):
        assert main([*command, "--db", str(path)]) == 2


def test_audit_exit_codes_clean_json_and_tampered(
    small_ledger: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["audit", "--db", str(small_ledger)]) == 0
    capsys.readouterr()
    assert main(["audit", "--db", str(small_ledger), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True
    assert main(["audit", "--db", str(small_ledger), "--expect-head", report["head"]]) == 0
    with sqlite3.connect(small_ledger) as conn:
        conn.execute("UPDATE transfers SET amount = amount + 1 WHERE seq = 2")
    assert main(["audit", "--db", str(small_ledger)]) == 1


def test_reads_work_while_a_bank_runs_but_init_needs_the_ledger(
    small_ledger: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with bank.Bank.open(small_ledger) as b:
        b.deposit(1, 123)
        assert main(["accounts", "--db", str(small_ledger), "--json"]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert sum(r["balance"] for r in rows) == 0
        assert main(["history", "1", "--db", str(small_ledger), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)[-1]["amount"] == 123
        assert main(["init", "--db", str(small_ledger)]) == 2
    assert "already open" in capsys.readouterr().err


def test_simulate_refuses_a_file_that_is_not_a_ledger(
    tmp_path: Path, not_a_ledger: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = not_a_ledger.read_bytes()
    assert main(["simulate", "--db", str(not_a_ledger), "--ops", "10", "--no-progress"]) == 2
    assert not_a_ledger.read_bytes() == before
    missing_dir = tmp_path / "no" / "such" / "sim.db"
    assert main(["simulate", "--db", str(missing_dir), "--ops", "10", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("bank simulate:") == 2 and "Traceback" not in err


def test_simulate_refuses_output_paths_in_missing_directories(tmp_path: Path) -> None:
    db = tmp_path / "sim.db"
    for option in ("--json", "--plot"):
        target = str(tmp_path / "nowhere" / "out")
        assert main(["simulate", "--db", str(db), "--ops", "10", option, target]) == 2
    assert not db.exists()


# -- output formats, paging, --version -------------------------------------------------------


@pytest.fixture
def long_ledger(tmp_path: Path) -> Path:
    """One account with 7 transfers (seqs 1..7), the 4th keyed."""
    path = tmp_path / "long.db"
    with bank.Bank.open(path) as b:
        a = b.open_account("a").id
        shop = b.open_account("shop").id
        for i in range(7):
            if i == 3:
                b.transfer(a, shop, 1, key="k-4")
            else:
                b.deposit(a, 10 + i)
    return path


def _seqs(out: str) -> list[int]:
    return [r["seq"] for r in json.loads(out)]


def test_history_formats_agree(long_ledger: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(long_ledger)
    assert main(["history", "a", "--db", db]) == 0  # not a terminal: JSON by default
    as_json = json.loads(capsys.readouterr().out)
    assert [r["seq"] for r in as_json] == list(range(1, 8))
    assert main(["history", "a", "--db", db, "--format", "nl"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line) for line in lines] == as_json
    assert main(["history", "a", "--db", db, "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [int(r["seq"]) for r in rows] == list(range(1, 8))
    assert rows[3]["key"] == "k-4" and rows[0]["key"] == ""
    assert [int(r["amount"]) for r in rows] == [r["amount"] for r in as_json]
    assert main(["history", "a", "--db", db, "--format", "table"]) == 0
    table = capsys.readouterr().out
    assert "history of a (id 1)" in table and "k-4" in table and "7 transfer(s)" in table
    assert main(["accounts", "--db", db, "--format", "csv"]) == 0
    accounts = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [a["name"] for a in accounts] == ["@cash", "a", "shop"]
    assert sum(int(a["balance"]) for a in accounts) == 0
    assert main(["accounts", "--db", db, "--format", "nl"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_history_pages_forward_and_backward(
    long_ledger: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from bank.cli import ledger

    monkeypatch.setattr(ledger, "HISTORY_PAGE", 2)  # several reads per listing
    db = str(long_ledger)
    assert main(["history", "a", "--db", db, "--json"]) == 0
    assert _seqs(capsys.readouterr().out) == [1, 2, 3, 4, 5, 6, 7]
    assert main(["history", "a", "--db", db, "--json", "--after-seq", "3", "--limit", "3"]) == 0
    assert _seqs(capsys.readouterr().out) == [4, 5, 6]
    assert main(["history", "a", "--db", db, "--json", "--reverse", "--limit", "3"]) == 0
    assert _seqs(capsys.readouterr().out) == [7, 6, 5]
    assert main(["history", "a", "--db", db, "--json", "--reverse", "--after-seq", "5"]) == 0
    assert _seqs(capsys.readouterr().out) == [4, 3, 2, 1]
    # Paging by cursor gives every row once, in both directions.
    for reverse in ([], ["--reverse"]):
        seen: list[int] = []
        cursor = 0
        while True:
            argv = ["history", "a", "--db", db, "--json", "--limit", "3", "--after-seq"]
            assert main([*argv, str(cursor), *reverse]) == 0
            page = _seqs(capsys.readouterr().out)
            if not page:
                break
            seen += page
            cursor = page[-1]
        assert sorted(seen) == list(range(1, 8)) and len(seen) == 7
    assert main(["history", "shop", "--db", db, "--json", "--after-seq", "99"]) == 0
    assert json.loads(capsys.readouterr().out) == []


@pytest.mark.parametrize(
    "argv",
    [
        ["--format", "xml"],
        ["--after-seq", "-1"],
        ["--after-seq", "x"],
        ["--limit", "0"],
        ["--json", "--format", "csv"],
    ],
)
def test_history_bad_options_exit_2(
    long_ledger: Path, argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["history", "a", "--db", str(long_ledger), *argv]) == 2
    assert "usage:" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"bank {bank.__version__}"


def test_tables_fit_the_terminal_width() -> None:
    from bank.cli.output import Column, write_table

    columns = [
        Column("seq", right=True),
        Column("name", flexible=True),
        Column("key", flexible=True),
    ]
    rows = [("1", "a" * 60, "k" * 40), ("123456", "short", "")]
    out = io.StringIO()
    assert write_table(columns, rows, out, width=40) == 2
    lines = out.getvalue().splitlines()
    assert all(len(line) <= 40 for line in lines), lines
    assert "…" in lines[2] and lines[3].lstrip().startswith("123456")  # numbers are never cut
    wide = io.StringIO()
    write_table(columns, rows, wide, width=None)
    assert "a" * 60 in wide.getvalue() and "k" * 40 in wide.getvalue()
