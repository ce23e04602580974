"""`Bank.open` refuses, with LedgerCorrupt and without writing a byte, a ledger whose stored
balances, limits or names disagree with its rows or whose newest rows do not chain; `bank
audit` agrees; a sound ledger (flows past 2**63 included) opens."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest

import bank
from bank.cli import main as cli_main
from bank.ledger.audit import audit_ledger
from bank.limits import AMOUNT_MAX
from tests.audit_ledgers import copy_ledger, edit
from tests.test_chain_encoding import rebuild_without_strict

# The base ledger's accounts, in opening order.
A, B, C, IDLE = 1, 2, 3, 4


@pytest.fixture(scope="module")
def sound(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small engine-built ledger: limits changed midway, an overdraft in use, an idle account."""
    path = tmp_path_factory.mktemp("open-verify") / "sound.db"
    with bank.Bank.open(path, durability="normal") as b:
        assert b.open_account("a").id == A
        assert b.open_account("b", overdraft_limit=500).id == B
        assert b.open_account("c").id == C
        b.deposit(A, 10_000)
        b.deposit(C, 2_000, key="pay-c")
        b.transfer(A, B, 1_500)
        b.set_overdraft_limit(B, 1_000)
        b.withdraw(B, 2_300)  # B at -800, inside its new limit
        b.transfer(C, A, 700, key="t-1")
        assert b.open_account("idle").id == IDLE  # the newest event: an opening
        b.transfer(A, C, 900)  # the newest transfer
    assert audit_ledger(path).ok
    return path


@pytest.fixture
def ledger(sound: Path, tmp_path: Path) -> Path:
    return copy_ledger(sound, tmp_path / "ledger.db")


def _fingerprint(path: Path) -> tuple[str, list[str]]:
    """The main file's bytes and which side files exist."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    sides = sorted(p.name for p in path.parent.iterdir() if p.name.startswith(path.name + "-"))
    return digest, sides


def _last(path: Path, table: str) -> int:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        seq: int = conn.execute(f"SELECT MAX(seq) FROM {table}").fetchone()[0]
    finally:
        conn.close()  # not `with`: that only commits, and an open reader keeps the -wal
    return seq


def _open_error(path: Path) -> str:
    """The LedgerCorrupt message of opening `path` (a bank that opens is closed, not leaked)."""
    try:
        opened = bank.Bank.open(path)
    except bank.LedgerCorrupt as exc:
        return str(exc)
    opened.close()
    pytest.fail(f"{path} opened")


def _refused(path: Path, *words: str) -> str:
    """Open must raise LedgerCorrupt naming `words`, write nothing; the audit must agree."""
    before = _fingerprint(path)
    message = _open_error(path)
    for word in words:
        assert word in message, message
    assert "bank audit" in message and "problem" in message
    assert _fingerprint(path) == before  # not a byte written, no side file left
    assert not audit_ledger(path).ok
    assert cli_main(["audit", "--db", str(path)]) == 1
    return message


def test_a_sound_ledger_opens_and_keeps_working(ledger: Path) -> None:
    with bank.Bank.open(ledger) as b:
        assert b.balance(B) == -800
        b.withdraw(B, 200)
        with pytest.raises(bank.InsufficientFunds):
            b.withdraw(B, 1)
    assert audit_ledger(ledger).ok


def test_balances_edited_with_the_sum_kept_at_zero(ledger: Path) -> None:
    with edit(ledger) as conn:
        conn.execute("UPDATE accounts SET balance = balance + 5000 WHERE id = ?", (A,))
        conn.execute("UPDATE accounts SET balance = balance - 5000 WHERE id = ?", (C,))
    message = _refused(
        ledger,
        "account 1 ('a'): stored balance 13300 but its transfers give 8300",
        "account 3 ('c'): stored balance -2800 but its transfers give 2200",
        "(3 problems)",  # C is also below its floor of 0
    )
    assert "account 3 ('c'): balance -2800 is below -overdraft_limit (0)" in message


def test_limit_raised_in_accounts_only(ledger: Path) -> None:
    with edit(ledger) as conn:
        conn.execute("UPDATE accounts SET overdraft_limit = 1000000 WHERE id = ?", (A,))
    _refused(ledger, "account 1 ('a'): overdraft_limit 1000000 differs from its latest event (0)")


def test_limit_lowered_under_the_balance(ledger: Path) -> None:
    with edit(ledger) as conn:
        conn.execute("UPDATE accounts SET overdraft_limit = 100 WHERE id = ?", (B,))
    _refused(ledger, "overdraft_limit 100 differs", "balance -800 is below -overdraft_limit (-100)")


def test_name_edited_in_accounts(ledger: Path) -> None:
    with edit(ledger) as conn:
        conn.execute("UPDATE accounts SET name = 'mallory' WHERE id = ?", (B,))
    _refused(ledger, "account 2 ('mallory'): name differs from its latest event ('b')")


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE transfers SET ts_us = ts_us + 1 WHERE seq = :last",
        "UPDATE transfers SET key = 'stolen' WHERE seq = :last",
        "UPDATE transfers SET hash = substr(hash, 2) || '0' WHERE seq = :last",
        "UPDATE transfers SET hash = substr(hash, 2) || '0' WHERE seq = :last - 1",
    ],
    ids=["ts_us", "key", "own-hash", "predecessor-hash"],
)
def test_newest_transfer_edited(ledger: Path, sql: str) -> None:
    last = _last(ledger, "transfers")
    with edit(ledger) as conn:
        conn.execute(sql, {"last": last})
    _refused(ledger, f"transfers seq {last} (the newest row) does not hash")


def test_newest_transfer_amount_edited_with_balances_to_match(ledger: Path) -> None:
    last = _last(ledger, "transfers")
    with edit(ledger) as conn:  # the transfer A -> C of 900 becomes 9000, balances "fixed"
        conn.execute("UPDATE transfers SET amount = 9000 WHERE seq = ?", (last,))
        conn.execute("UPDATE accounts SET balance = balance - 8100 WHERE id = ?", (A,))
        conn.execute("UPDATE accounts SET balance = balance + 8100 WHERE id = ?", (C,))
    _refused(ledger, f"transfers seq {last} (the newest row) does not hash", "(1 problem)")


def test_newest_account_event_edited(ledger: Path) -> None:
    last = _last(ledger, "account_events")
    with edit(ledger) as conn:  # the idle account given a limit, in its event and its row
        conn.execute("UPDATE account_events SET overdraft_limit = 1000000 WHERE seq = ?", (last,))
        conn.execute("UPDATE accounts SET overdraft_limit = 1000000 WHERE id = ?", (IDLE,))
    _refused(ledger, f"account_events seq {last} (the newest row) does not hash", "(1 problem)")


def test_newest_account_event_renamed(ledger: Path) -> None:
    last = _last(ledger, "account_events")
    with edit(ledger) as conn:
        conn.execute("UPDATE account_events SET name = 'x' WHERE seq = ?", (last,))
        conn.execute("UPDATE accounts SET name = 'x' WHERE id = ?", (IDLE,))
    _refused(ledger, f"account_events seq {last} (the newest row) does not hash")


def test_newest_transfer_with_a_mistyped_column(ledger: Path) -> None:
    last = _last(ledger, "transfers")
    with edit(ledger) as conn:
        rebuild_without_strict(conn, "transfers")  # STRICT refuses the edit itself
        conn.execute("UPDATE transfers SET ts_us = 'soon' WHERE seq = ?", (last,))
    _refused(ledger, f"transfers seq {last} (the newest row): ts_us holds 'soon', not int")


def test_a_middle_transfer_deleted_with_balances_to_match(ledger: Path) -> None:
    with edit(ledger) as conn:  # seq 3 is the transfer A -> B of 1500
        conn.execute("DELETE FROM transfers WHERE seq = 3")
        conn.execute("UPDATE accounts SET balance = balance + 1500 WHERE id = ?", (A,))
        conn.execute("UPDATE accounts SET balance = balance - 1500 WHERE id = ?", (B,))
    _refused(ledger, "transfers: 5 row(s) for seq 1..6: not numbered 1..5")


def test_an_amount_made_real(ledger: Path) -> None:
    with edit(ledger) as conn:
        rebuild_without_strict(conn, "transfers")  # STRICT refuses the edit itself
        conn.execute("UPDATE transfers SET amount = amount + 0.5 WHERE seq = 2")
    _refused(ledger, f"1 row(s) with an amount that is not an integer from 1 to {AMOUNT_MAX}")


def test_an_accounts_row_without_an_opening_event(ledger: Path) -> None:
    with edit(ledger) as conn:
        conn.execute("INSERT INTO accounts VALUES (99, 'ghost', 0, 0)")
    _refused(ledger, "account 99 ('ghost'): has no opening event")


def test_an_opened_account_without_its_row(ledger: Path) -> None:
    with edit(ledger) as conn:
        conn.execute("DELETE FROM accounts WHERE id = ?", (IDLE,))
    _refused(ledger, "account 4: has chained events but no accounts row")


def test_the_cash_account_deleted(ledger: Path) -> None:
    with edit(ledger) as conn:
        conn.execute("DELETE FROM accounts WHERE id = 0")
    _refused(ledger, "the @cash account (id 0) is missing", "transfers name account 0")


def test_the_message_lists_a_few_problems_and_counts_the_rest(ledger: Path) -> None:
    with edit(ledger) as conn:
        conn.execute("UPDATE accounts SET name = name || '!' WHERE id > 0")
        conn.execute("UPDATE accounts SET overdraft_limit = overdraft_limit + 1 WHERE id > 0")
    message = _refused(ledger, "(8 problems)", "... and 3 more")
    assert len(message.splitlines()) == 1 + 5 + 1


def test_flows_past_two_to_the_63_are_summed_exactly(tmp_path: Path) -> None:
    # 9,300 deposits and withdrawals of the largest amount: each side of account 1
    # sums past 2**63 (SQLite's SUM would raise "integer overflow"); its balance stays small.
    path = tmp_path / "flows.db"
    rounds = 9_300
    assert rounds * AMOUNT_MAX > 2**63
    with bank.Bank.open(path, durability="normal") as b:
        a = b.open_account("a").id
        ops: list[bank.Deposit | bank.Withdrawal] = []
        for _ in range(rounds):
            ops.append(bank.Deposit(account=a, amount=AMOUNT_MAX))
            ops.append(bank.Withdrawal(account=a, amount=AMOUNT_MAX))
        for future in b.submit_many(ops):
            future.result()
        b.deposit(a, 3)
    with bank.Bank.open(path) as b:
        assert b.balance(a) == 3
    with edit(path) as conn:
        conn.execute("UPDATE accounts SET balance = balance + 1 WHERE id = 1")
        conn.execute("UPDATE accounts SET balance = balance - 1 WHERE id = 0")
    assert "stored balance 4 but its transfers give 3" in _open_error(path)


def test_bench_audit_open_runs_on_a_generated_ledger(tmp_path: Path) -> None:
    # scripts/bench_audit.py --open at a tiny size: its generated ledger (raw sqlite3 rows
    # with chain hashes) passes the open-time verification, and the timing is reported.
    import importlib.util
    import sys

    script = Path(__file__).resolve().parent.parent / "scripts" / "bench_audit.py"
    spec = importlib.util.spec_from_file_location("bank_bench_audit_script", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    argv = ["--open", "--sizes", "3000", "--cache", str(tmp_path), "--json"]
    assert module.main(argv) == 0
    # --floor re-hashes every row of the same ledger (each message must give its stored
    # hash, or it exits) and reports each step's cost and the ceiling they set.
    floor = module.measure_floor(module.cached_ledger(tmp_path, 3000), 3000)
    assert floor["rows"] == floor["hashes_verified"] == 3000
    assert set(floor["us_per_row"]) == {"read", "format", "sha256"}
    assert floor["ceiling_transfers_per_s"] > 0


# -- the postings watermark (revision 0007) ----------------------------------------------

_BACKFILL = (
    "INSERT INTO postings (account_id, seq) SELECT account_id, seq FROM ("
    "SELECT debit_account_id AS account_id, seq FROM transfers UNION ALL "
    "SELECT credit_account_id, seq FROM transfers) ORDER BY account_id, seq"
)


@pytest.fixture
def indexed(ledger: Path) -> Path:
    """The ledger with every row in postings and W at the head, as an upgrade leaves it."""
    with edit(ledger) as conn:
        conn.execute("DELETE FROM postings")
        conn.execute(_BACKFILL)
        conn.execute("UPDATE postings_upto SET seq = (SELECT max(seq) FROM transfers)")
    assert audit_ledger(ledger).ok
    bank.Bank.open(ledger).close()
    return ledger


@pytest.mark.parametrize(
    ("sql", "words"),
    [
        ("UPDATE postings_upto SET seq = seq + 1", ("postings watermark", "not a seq from 0")),
        ("UPDATE postings_upto SET seq = seq - 1", ("postings holds", "need")),
        (
            "DELETE FROM postings WHERE seq = (SELECT min(seq) FROM postings) "
            "AND account_id = (SELECT min(account_id) FROM postings)",
            ("postings holds", "deleted or added"),
        ),
        ("DELETE FROM postings_upto", ("postings_upto holds 0 rows",)),
    ],
)
def test_a_forged_postings_watermark_or_count_is_refused(
    indexed: Path, sql: str, words: tuple[str, ...]
) -> None:
    with edit(indexed) as conn:
        conn.execute(sql)
    _refused(indexed, *words)
