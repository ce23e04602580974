"""The same seeded `bank simulate` run on SQLite and on PostgreSQL (issue 10, acceptance 2).

With one teller and a window of 1 the order of operations is deterministic, so both
ledgers end with identical balances and identical transfer rows apart from their
timestamps and hashes; with many tellers both end with a clean audit, and `bank audit`
works on both.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import bank
from bank.cli import main
from tests.conftest import LedgerDb

SIMULATE = ["--ops", "400", "--accounts", "20", "--seed", "7", "--no-progress"]


def _rows(ledger: LedgerDb) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    accounts = ledger.query("SELECT id, name, overdraft_limit, balance FROM accounts ORDER BY id")
    transfers = ledger.query(
        "SELECT seq, key, kind, debit_account_id, credit_account_id, amount "
        "FROM transfers ORDER BY seq"
    )
    return accounts, transfers


def test_one_teller_gives_the_same_ledger_on_both(tmp_path: Path, pg_url: str) -> None:
    sqlite_db = LedgerDb.sqlite(tmp_path / "ledger.db")
    postgres_db = LedgerDb("postgres", pg_url, pg_url)
    for ledger in (sqlite_db, postgres_db):
        argv = ["simulate", "--db", str(ledger.db), "--tellers", "1", "--window", "1"]
        assert main([*argv, *SIMULATE]) == 0
        assert main(["audit", "--db", str(ledger.db)]) == 0
    accounts, transfers = _rows(sqlite_db)
    assert len(transfers) > 300 and len(accounts) == 21
    assert _rows(postgres_db) == (accounts, transfers)


@pytest.mark.timeout(120)
def test_many_tellers_end_with_a_clean_audit(ledger_db: LedgerDb) -> None:
    argv = ["simulate", "--db", str(ledger_db.db), "--tellers", "8", "--window", "8"]
    assert main([*argv, *SIMULATE]) == 0
    assert main(["audit", "--db", str(ledger_db.db)]) == 0
    (total,) = ledger_db.query("SELECT SUM(balance) FROM accounts")
    assert total == (0,)


def test_the_command_line_works_on_both(
    ledger_db: LedgerDb, capsys: pytest.CaptureFixture[str]
) -> None:
    """`bank init/accounts/history/audit --db` take a file or a URL alike."""
    db = str(ledger_db.db)
    assert main(["init", "--db", db]) == 0
    assert "schema revision" in capsys.readouterr().out
    with bank.Bank.open(ledger_db.db) as b:
        alice = b.open_account("alice").id
        b.deposit(alice, 1_234, key="pay")
    assert main(["accounts", "--db", db]) == 0
    assert "alice" in capsys.readouterr().out
    assert main(["history", "--db", db, "--json", "alice"]) == 0
    assert '"key": "pay"' in capsys.readouterr().out
    assert main(["audit", "--db", db]) == 0
