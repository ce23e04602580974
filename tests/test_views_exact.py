"""The auditor's SQL views give exact answers on every ledger the engine can produce: flows past
2**63 (issue 9 finding 9), balances at the ends of 64 bits, and balance sums whose partial sums
leave 64 bits, read with Python's sqlite3 and with the real `sqlite3` command line."""

from __future__ import annotations

import random
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

import bank
from bank.ledger.migrate import upgrade_to_head
from bank.ledger.sqlite import create_ledger_engine, ledger_url
from bank.limits import AMOUNT_MAX, BALANCE_MAX

ROUNDS = 10_000  # deposits and withdrawals of AMOUNT_MAX each: credits reach 10**19 > 2**63


@pytest.fixture(scope="module")
def busy_ledger(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """A real ledger where one account moved 10**19 in and out and now holds 0."""
    path = tmp_path_factory.mktemp("views") / "busy.db"
    with bank.Bank.open(path, durability="normal") as b:
        merchant = b.open_account("merchant").id
        commands: list[bank.Deposit | bank.Withdrawal] = []
        for _ in range(ROUNDS):
            commands.append(bank.Deposit(account=merchant, amount=AMOUNT_MAX))
            commands.append(bank.Withdrawal(account=merchant, amount=AMOUNT_MAX))
        for future in b.submit_many(commands):
            future.result()
        assert b.balance(merchant) == 0
    return path, merchant


def _query(path: Path, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def test_flows_past_2_63_are_exact_in_python_and_in_the_sqlite3_cli(
    busy_ledger: tuple[Path, int], tmp_path: Path
) -> None:
    source, merchant = busy_ledger
    path = tmp_path / "tampered.db"
    path.write_bytes(source.read_bytes())
    assert _query(path, "SELECT * FROM balance_mismatches") == []
    flows = _query(
        path,
        "SELECT transfers, credits_exact, debits_exact, recomputed_balance, difference "
        f"FROM account_flows WHERE account_id = {merchant}",
    )
    assert flows == [(2 * ROUNDS, str(ROUNDS * AMOUNT_MAX), str(ROUNDS * AMOUNT_MAX), 0, 0)]
    conn = sqlite3.connect(path)
    try:
        conn.execute("UPDATE accounts SET balance = balance + 7 WHERE id = ?", (merchant,))
        conn.commit()
    finally:
        conn.close()
    expected = [(merchant, "merchant", 0, 7, 7)]
    assert _query(path, "SELECT * FROM balance_mismatches") == expected
    assert _query(path, "SELECT balance_sum FROM ledger_totals") == [(7,)]
    cli = shutil.which("sqlite3")
    if cli is None:
        pytest.skip("no sqlite3 command line on this machine")
    done = subprocess.run(
        [cli, "-readonly", str(path), "SELECT * FROM balance_mismatches;"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == f"{merchant}|merchant|0|7|7\n"


def _scratch_ledger(path: Path) -> sqlite3.Connection:
    """An empty ledger at the head revision, for rows written directly (the views ignore hashes)."""
    engine = create_ledger_engine(ledger_url(path))
    try:
        upgrade_to_head(engine)
    finally:
        engine.dispose()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("UPDATE accounts SET overdraft_limit = ? WHERE id = 0", (BALANCE_MAX,))
    return conn


def _write(
    conn: sqlite3.Connection, accounts: int, moves: list[tuple[int, int, int]]
) -> dict[int, int]:
    """Insert `moves` (debit, credit, amount); stores and returns the exact balances."""
    balances = dict.fromkeys(range(accounts + 1), 0)
    conn.execute("BEGIN")
    for account in range(1, accounts + 1):
        conn.execute(
            "INSERT INTO accounts VALUES (?, ?, ?, 0)", (account, f"a{account}", BALANCE_MAX)
        )
    rows = []
    for seq, (debit, credit, amount) in enumerate(moves, start=1):
        kind = "deposit" if debit == 0 else "withdrawal" if credit == 0 else "transfer"
        balances[debit] -= amount
        balances[credit] += amount
        after = (balances[debit], balances[credit])  # the running balances (revision 0005)
        rows.append((seq, None, kind, debit, credit, amount, seq, "x", *after))
    conn.executemany(
        "INSERT INTO transfers (seq, key, kind, debit_account_id, credit_account_id, amount, "
        "ts_us, hash, debit_balance, credit_balance) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )
    for account, balance in balances.items():
        conn.execute("UPDATE accounts SET balance = ? WHERE id = ?", (balance, account))
    conn.execute("COMMIT")
    return balances


def _split(total: int) -> list[tuple[int, int, int]]:
    """`total` as amounts of at most AMOUNT_MAX (debit and credit filled in by the caller)."""
    full, rest = divmod(total, AMOUNT_MAX)
    return [(0, 0, AMOUNT_MAX)] * full + ([(0, 0, rest)] if rest else [])


def _move(debit: int, credit: int, total: int) -> list[tuple[int, int, int]]:
    return [(debit, credit, amount) for _, _, amount in _split(total)]


def _expected_flows(accounts: int, moves: list[tuple[int, int, int]]) -> dict[int, tuple[int, int]]:
    credits = dict.fromkeys(range(accounts + 1), 0)
    debits = dict.fromkeys(range(accounts + 1), 0)
    for debit, credit, amount in moves:
        debits[debit] += amount
        credits[credit] += amount
    return {a: (credits[a], debits[a]) for a in credits}


def _check_views(
    conn: sqlite3.Connection, accounts: int, moves: list[tuple[int, int, int]]
) -> None:
    # The views of revision 0002 failed right here, with "integer overflow".
    assert conn.execute("SELECT * FROM balance_mismatches").fetchall() == []
    assert conn.execute("SELECT balance_sum FROM ledger_totals").fetchall() == [(0,)]
    balances = dict(conn.execute("SELECT id, balance FROM accounts"))
    flows = _expected_flows(accounts, moves)
    rows = conn.execute(
        "SELECT account_id, credits_exact, debits_exact, recomputed_balance, stored_balance, "
        "difference FROM account_flows ORDER BY account_id"
    ).fetchall()
    assert rows == [
        (a, str(flows[a][0]), str(flows[a][1]), flows[a][0] - flows[a][1], balances[a], 0)
        for a in sorted(flows)
    ]
    for a, credits, debits in conn.execute("SELECT account_id, credits, debits FROM account_flows"):
        for value, exact in ((credits, flows[a][0]), (debits, flows[a][1])):
            if exact <= BALANCE_MAX:
                assert (type(value), value) == (int, exact)
            else:  # beyond 64 bits: an approximate REAL (credits_exact is exact)
                assert isinstance(value, float) and abs(value - exact) <= exact * 2**-50


def test_balances_at_the_ends_of_64_bits_and_sums_past_them(tmp_path: Path) -> None:
    """Every balance an engine can reach, and a balance sum whose running total leaves 64 bits.

    @cash ends at 2**63 - 1 (withdrawals), account 1 at 2**63 - 1 (a transfer): their sum
    alone passes 2**63, which the old `SUM(balance)` reported as `integer overflow`.
    Accounts 3 and 4 end at -(2**63 - 1), with overdraft limits that allow it.
    """
    conn = _scratch_ledger(tmp_path / "ends.db")
    moves = _move(3, 0, BALANCE_MAX) + _move(4, 1, BALANCE_MAX)
    try:
        _write(conn, 4, moves)
        _check_views(conn, 4, moves)
        # A stored balance edited by 5 near the bottom of 64 bits: found, exactly.
        conn.execute("UPDATE accounts SET balance = balance + 5 WHERE id = 4")
        assert conn.execute("SELECT account_id, difference FROM balance_mismatches").fetchall() == [
            (4, 5)
        ]
        assert conn.execute("SELECT balance_sum FROM ledger_totals").fetchall() == [(5,)]
    finally:
        conn.close()


@pytest.mark.parametrize("seed", range(4))
def test_random_flows_are_exact(tmp_path: Path, seed: int) -> None:
    """Random amounts (digits of every size, carries in every place) on five accounts."""
    rng = random.Random(seed)
    moves: list[tuple[int, int, int]] = []
    for _ in range(3000):
        debit, credit = rng.sample(range(6), 2)
        amount = rng.choice((AMOUNT_MAX, rng.randint(1, AMOUNT_MAX), rng.randint(1, 99_999)))
        moves.append((debit, credit, amount))
    conn = _scratch_ledger(tmp_path / f"random{seed}.db")
    try:
        _write(conn, 5, moves)
        _check_views(conn, 5, moves)
    finally:
        conn.close()
