"""The migrations on both backends: 64-bit ids and seqs on PostgreSQL, the partial key index
on both, exact views on PostgreSQL at the ends of 64 bits, upgrades in place (a SQLite
ledger at 0003, a PostgreSQL ledger of 0002's 32-bit columns) and a refused downgrade."""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
from alembic import command
from sqlalchemy import Engine, create_engine
from sqlalchemy.pool import NullPool

import bank
from bank.errors import SchemaDowngradeRefused
from bank.ledger.audit import audit_ledger
from bank.ledger.chain import GENESIS, transfer_hash_v2
from bank.ledger.migrate import ALEMBIC_LOCK, alembic_config, head_revision, upgrade_to_head
from bank.limits import AMOUNT_MAX, BALANCE_MAX
from tests.conftest import LedgerDb
from tests.postgres import libpq_conninfo

#: Every integer column of the head schema: all of them are 64-bit.
INTEGER_COLUMNS = {
    ("accounts", "id"),
    ("accounts", "overdraft_limit"),
    ("accounts", "balance"),
    ("transfers", "seq"),
    ("transfers", "debit_account_id"),
    ("transfers", "credit_account_id"),
    ("transfers", "amount"),
    ("transfers", "ts_us"),
    ("account_events", "seq"),
    ("account_events", "account_id"),
    ("account_events", "overdraft_limit"),
    ("account_events", "transfer_seq"),
    ("account_events", "ts_us"),
    ("chain_formats", "first_seq"),
    ("chain_formats", "version"),
    ("transfers", "hold_seq"),  # revision 0006
    ("transfers", "expires_us"),
    ("transfers", "link_first"),
    ("transfers", "link_count"),
    ("transfers", "debit_balance"),
    ("transfers", "credit_balance"),
    ("postings", "account_id"),  # revision 0007
    ("postings", "seq"),
    ("postings_upto", "id"),
    ("postings_upto", "seq"),
}
#: The columns of `transfers` before revision 0005 (what the hash chain covers).
CHAINED = "seq, key, kind, debit_account_id, credit_account_id, amount, ts_us, hash"


@pytest.fixture
def pg_engine(pg_url: str) -> Iterator[Engine]:
    engine = create_engine(pg_url, poolclass=NullPool)
    yield engine
    engine.dispose()


def _migrate(engine: Engine, verb: str, revision: str) -> None:
    with ALEMBIC_LOCK, engine.begin() as conn:
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        getattr(command, verb)(cfg, revision)


def _pg(url: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(libpq_conninfo(url), autocommit=True)


def test_every_integer_column_is_bigint_on_postgres(pg_engine: Engine, pg_url: str) -> None:
    assert upgrade_to_head(pg_engine) == head_revision()
    with _pg(pg_url) as conn:
        rows = conn.execute(
            "SELECT c.table_name, c.column_name, c.data_type FROM information_schema.columns c "
            "JOIN information_schema.tables t USING (table_schema, table_name) "
            "WHERE c.table_schema = 'public' AND t.table_type = 'BASE TABLE' "
            "AND c.data_type IN ('smallint', 'integer', 'bigint')"
        ).fetchall()
    found = {(str(t), str(c)): d for t, c, d in rows if t != "alembic_version"}
    assert set(found) == INTEGER_COLUMNS
    assert set(found.values()) == {"bigint"}


def test_the_key_index_is_partial_on_both(ledger_db: LedgerDb) -> None:
    engine = create_engine(ledger_db.url, poolclass=NullPool)
    try:
        upgrade_to_head(engine)
    finally:
        engine.dispose()
    if ledger_db.backend == "sqlite":
        conn = sqlite3.connect(ledger_db.path)
        try:
            (sql,) = conn.execute(
                "SELECT sql FROM sqlite_master WHERE name = 'uq_transfers_key'"
            ).fetchone()
        finally:
            conn.close()
        assert str(sql).endswith("WHERE key IS NOT NULL")
    else:
        with _pg(ledger_db.url) as pg:
            rows = pg.execute(
                "SELECT indexdef FROM pg_indexes WHERE tablename = 'transfers' "
                "AND indexname = 'uq_transfers_key'"
            ).fetchall()
        assert rows == [
            (
                "CREATE UNIQUE INDEX uq_transfers_key ON public.transfers USING btree (key) "
                "WHERE (key IS NOT NULL)",
            )
        ]


def test_ids_and_seqs_above_2_31_round_trip_on_postgres(pg_engine: Engine, pg_url: str) -> None:
    upgrade_to_head(pg_engine)
    big = [2**31, 2**40 + 7, BALANCE_MAX]
    with _pg(pg_url) as conn:
        for i, account in enumerate(big):
            conn.execute(
                "INSERT INTO accounts VALUES (%s, %s, 0, 0)", (account, f"big{i}"), prepare=False
            )
            conn.execute(
                "INSERT INTO account_events VALUES (%s, %s, 'open', %s, 0, %s, 0, 'x')",
                (account, account, f"big{i}", account),
            )
        conn.execute(
            "INSERT INTO transfers VALUES (%s, NULL, 'transfer', %s, %s, 1, 0, 'x', -1, 1)",
            (BALANCE_MAX, big[0], big[2]),
        )
        assert conn.execute("SELECT id FROM accounts WHERE id > 0 ORDER BY id").fetchall() == [
            (a,) for a in big
        ]
        assert conn.execute(
            "SELECT seq, account_id FROM account_events WHERE seq > 1"
        ).fetchall() == [(a, a) for a in big]
        assert conn.execute(
            "SELECT seq, debit_account_id, credit_account_id FROM transfers"
        ).fetchall() == [(BALANCE_MAX, big[0], big[2])]
        assert conn.execute("SELECT last_seq, missing_seqs FROM ledger_totals").fetchall() == [
            (BALANCE_MAX, BALANCE_MAX - 1)
        ]


def test_downgrade_is_refused_while_an_id_needs_64_bits(pg_engine: Engine, pg_url: str) -> None:
    upgrade_to_head(pg_engine)
    _migrate(pg_engine, "downgrade", "0003")  # nothing above 2**31 - 1 yet: allowed
    with _pg(pg_url) as conn:
        types = conn.execute(
            "SELECT data_type FROM information_schema.columns "
            "WHERE table_name = 'transfers' AND column_name = 'seq'"
        ).fetchall()
        assert types == [("integer",)]
    _migrate(pg_engine, "upgrade", "head")
    with _pg(pg_url) as conn:
        conn.execute("INSERT INTO accounts VALUES (%s, 'big', 0, 0)", (2**31,))
    with pytest.raises(SchemaDowngradeRefused, match="accounts rows hold a id above 2"):
        _migrate(pg_engine, "downgrade", "0003")
    with _pg(pg_url) as conn:  # untouched: still at head, still 64-bit
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [
            (head_revision(),)
        ]
        assert conn.execute("SELECT id FROM accounts WHERE id > 0").fetchall() == [(2**31,)]


def test_a_postgres_ledger_with_32_bit_columns_upgrades_in_place(
    pg_engine: Engine, pg_url: str
) -> None:
    """A ledger made by revisions 0001-0002 on PostgreSQL (32-bit ids, a plain key index)."""
    _migrate(pg_engine, "upgrade", "0002")
    with _pg(pg_url) as conn:
        conn.execute("UPDATE accounts SET balance = -5 WHERE id = 0")
        conn.execute("INSERT INTO accounts VALUES (1, 'alice', 0, 5)")
        conn.execute("INSERT INTO account_events VALUES (2, 1, 'open', 'alice', 0, 0, 1, 'h2')")
        conn.execute(
            "INSERT INTO transfers VALUES (1, 'k1', 'deposit', 0, 1, 5, 2, 'h1'), "
            "(2, NULL, 'transfer', 1, 0, 1, 3, 'h3'), (3, NULL, 'transfer', 0, 1, 1, 4, 'h4')"
        )
        before = conn.execute("SELECT * FROM transfers ORDER BY seq").fetchall()
    upgrade_to_head(pg_engine)
    with _pg(pg_url) as conn:
        assert conn.execute(f"SELECT {CHAINED} FROM transfers ORDER BY seq").fetchall() == before
        # Revision 0005's running balances, backfilled: (debit after, credit after) per row.
        assert conn.execute(
            "SELECT debit_balance, credit_balance FROM transfers ORDER BY seq"
        ).fetchall() == [(-5, 5), (4, -4), (-5, 5)]
        assert conn.execute(
            "SELECT chain, first_seq, version FROM chain_formats ORDER BY chain, first_seq"
        ).fetchall() == [
            ("account_events", 1, 1),
            ("account_events", 3, 2),
            ("transfers", 1, 1),
            ("transfers", 4, 3),  # 0003's format 2 from 4 covered no row: 0006 made it 3
        ]
        assert conn.execute("SELECT * FROM balance_mismatches").fetchall() == []
        types = conn.execute(
            "SELECT table_name, column_name, data_type FROM information_schema.columns "
            "WHERE (table_name, column_name) IN (('accounts', 'id'), ('transfers', 'seq'), "
            "('transfers', 'debit_account_id'), ('transfers', 'credit_account_id'), "
            "('account_events', 'seq'), ('account_events', 'account_id'))"
        ).fetchall()
        assert len(types) == 6 and {t for _, _, t in types} == {"bigint"}, types


def _hashes(path: Path) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return (
            conn.execute(f"SELECT {CHAINED} FROM transfers ORDER BY seq").fetchall(),
            conn.execute("SELECT * FROM account_events ORDER BY seq").fetchall(),
        )
    finally:
        conn.close()


def test_a_sqlite_ledger_at_0003_upgrades_in_place(tmp_path: Path) -> None:
    """Accounts made by the engine, the ledger set back to 0003, transfers written as 0003's
    engine wrote them (hash format 2), then opened: no row or hash changes (0004 only
    stamps; 0005 adds the running balances, backfilled exactly; 0006 adds NULL columns and
    starts format 3 after the last row). The engine's own rows are format 3 since 0006,
    which no downgrade below it keeps."""
    path = tmp_path / "ledger.db"
    with bank.Bank.open(path) as b:
        alice = b.open_account("alice", overdraft_limit=50).id
        bob = b.open_account("bob").id
        b.set_overdraft_limit(alice, 40)
    engine = create_engine(f"sqlite:///{path}", poolclass=NullPool)
    try:
        _migrate(engine, "downgrade", "0003")
    finally:
        engine.dispose()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [("0003",)]
        prev = GENESIS
        for seq, kind, debit, credit, amount, key in (
            (1, "deposit", 0, alice, 1_000, "d1"),
            (2, "transfer", alice, bob, 1_020, None),
        ):
            ts_us = 1_700_000_000_000_000 + seq
            prev = transfer_hash_v2(prev, seq, kind, debit, credit, amount, ts_us, key)
            conn.execute(
                "INSERT INTO transfers (seq, key, kind, debit_account_id, credit_account_id, "
                "amount, ts_us, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (seq, key, kind, debit, credit, amount, ts_us, prev),
            )
        for account, balance in ((0, -1_000), (alice, -20), (bob, 1_020)):
            conn.execute("UPDATE accounts SET balance = ? WHERE id = ?", (balance, account))
        conn.commit()
    finally:
        conn.close()
    before = _hashes(path)
    with bank.Bank.open(path) as b:
        assert b.revision == head_revision()
        assert (b.balance(alice), b.balance(bob)) == (-20, 1_020)
    assert _hashes(path) == before
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        assert conn.execute(
            "SELECT debit_balance, credit_balance FROM transfers ORDER BY seq"
        ).fetchall() == [(-1_000, 1_000), (-20, 1_020)]
    finally:
        conn.close()
    report = audit_ledger(path)
    assert report.ok, report


# --- views exact on PostgreSQL, near the ends of 64 bits (as tests/test_views_exact.py on SQLite)


def _scratch_pg_ledger(engine: Engine, url: str) -> psycopg.Connection[tuple[object, ...]]:
    upgrade_to_head(engine)
    conn = _pg(url)
    conn.execute("UPDATE accounts SET overdraft_limit = %s WHERE id = 0", (BALANCE_MAX,))
    return conn


def _write(
    conn: psycopg.Connection[tuple[object, ...]], accounts: int, moves: list[tuple[int, int, int]]
) -> None:
    balances = dict.fromkeys(range(accounts + 1), 0)
    with conn.transaction():
        for account in range(1, accounts + 1):
            conn.execute(
                "INSERT INTO accounts VALUES (%s, %s, %s, 0)", (account, f"a{account}", BALANCE_MAX)
            )
        rows = []
        for seq, (debit, credit, amount) in enumerate(moves, start=1):
            kind = "deposit" if debit == 0 else "withdrawal" if credit == 0 else "transfer"
            balances[debit] -= amount
            balances[credit] += amount
            rows.append((seq, kind, debit, credit, amount, seq, balances[debit], balances[credit]))
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO transfers VALUES (%s, NULL, %s, %s, %s, %s, %s, 'x', %s, %s)", rows
            )
        for account, balance in balances.items():
            conn.execute("UPDATE accounts SET balance = %s WHERE id = %s", (balance, account))


def _move(debit: int, credit: int, total: int) -> list[tuple[int, int, int]]:
    full, rest = divmod(total, AMOUNT_MAX)
    return [(debit, credit, AMOUNT_MAX)] * full + ([(debit, credit, rest)] if rest else [])


def _exact(value: object) -> int:
    """An integer-valued column: Python int (bigint) or a Decimal with no fraction (numeric)."""
    assert isinstance(value, int | Decimal), value
    assert value == int(value)
    return int(value)


def _check_views(
    conn: psycopg.Connection[tuple[object, ...]], accounts: int, moves: list[tuple[int, int, int]]
) -> None:
    assert conn.execute("SELECT * FROM balance_mismatches").fetchall() == []
    assert [(_exact(v),) for (v,) in conn.execute("SELECT balance_sum FROM ledger_totals")] == [
        (0,)
    ]
    credits = dict.fromkeys(range(accounts + 1), 0)
    debits = dict.fromkeys(range(accounts + 1), 0)
    for debit, credit, amount in moves:
        debits[debit] += amount
        credits[credit] += amount
    balances = {_exact(a): _exact(b) for a, b in conn.execute("SELECT id, balance FROM accounts")}
    rows = conn.execute(
        "SELECT account_id, credits, debits, credits_exact, debits_exact, recomputed_balance, "
        "stored_balance, difference FROM account_flows ORDER BY account_id"
    ).fetchall()
    assert [
        (a, _exact(c), _exact(d), ce, de, _exact(r), s, _exact(diff))
        for a, c, d, ce, de, r, s, diff in rows
    ] == [
        (
            a,
            credits[a],
            debits[a],
            str(credits[a]),
            str(debits[a]),
            credits[a] - debits[a],
            balances[a],
            0,
        )
        for a in range(accounts + 1)
    ]


def test_postgres_views_are_exact_at_the_ends_of_64_bits(pg_engine: Engine, pg_url: str) -> None:
    """Balances at +-(2**63 - 1), flows and a balance sum whose partial sums leave 64 bits."""
    conn = _scratch_pg_ledger(pg_engine, pg_url)
    moves = _move(3, 0, BALANCE_MAX) + _move(4, 1, BALANCE_MAX)
    # Round trips of AMOUNT_MAX: account 2's credits and debits pass 2**63 (10**19 each).
    moves += [(0, 2, AMOUNT_MAX), (2, 0, AMOUNT_MAX)] * 10_000
    try:
        _write(conn, 4, moves)
        _check_views(conn, 4, moves)
        assert conn.execute(
            "SELECT credits_exact, debits_exact FROM account_flows WHERE account_id = 2"
        ).fetchall() == [(str(10**19), str(10**19))]
        conn.execute("UPDATE accounts SET balance = balance + 5 WHERE id = 4")
        mismatches = conn.execute("SELECT account_id, difference FROM balance_mismatches")
        assert [(a, _exact(d)) for a, d in mismatches] == [(4, 5)]
        assert [_exact(v) for (v,) in conn.execute("SELECT balance_sum FROM ledger_totals")] == [5]
    finally:
        conn.close()


def test_postgres_views_are_exact_on_random_flows(pg_engine: Engine, pg_url: str) -> None:
    rng = random.Random(7)
    moves: list[tuple[int, int, int]] = []
    for _ in range(3000):
        debit, credit = rng.sample(range(6), 2)
        amount = rng.choice((AMOUNT_MAX, rng.randint(1, AMOUNT_MAX), rng.randint(1, 99_999)))
        moves.append((debit, credit, amount))
    conn = _scratch_pg_ledger(pg_engine, pg_url)
    try:
        _write(conn, 5, moves)
        _check_views(conn, 5, moves)
    finally:
        conn.close()
