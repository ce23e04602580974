"""The chain's encoding is unambiguous and typed, the schema enforces every column's type, and the
audit checks it: the one-row edit of issue 9 finding 2 (a key's tail moved into a TEXT `ts_us`) is
refused, or found, and cannot buy a second payment; ledgers from revision 0002 keep verifying."""

from __future__ import annotations

import hashlib
import re
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from hypothesis import given, settings
from hypothesis import strategies as st

import bank
from bank.errors import LedgerCorrupt
from bank.ledger.audit import AuditReport, audit_ledger
from bank.ledger.migrate import head_revision, migrations_dir, upgrade_to_head
from bank.ledger.sqlite import create_ledger_engine, ledger_url

GENESIS = "0" * 64
INVOICE_KEY = "invoice|7"  # split by the attack: "invoice" moves into ts_us
ORDER_KEY = "order-17|"  # dropped by the attack: all of it moves into ts_us
SPLIT_NAME = "bob|smith"  # renamed by the attack: "bob" moves into the event's ts_us


# -- the documented formats, re-implemented from bank/ledger/chain.py's docstring ---------


def v(value: int | str | None) -> str:
    """V(value) of hash format 2."""
    if value is None:
        return "n"
    if type(value) is int:
        return f"i{value};"
    assert type(value) is str
    return f"s{len(value.encode())}:{value}"


def transfer_text_v2(prev: str, *row: int | str | None) -> str:
    return "bank:transfers:2\n" + v(prev) + "".join(v(x) for x in row)


def transfer_text_v3(prev: str, *row: int | str | None) -> str:
    """Format 3 (revision 0006): every column, the running balances and the 0006 ones too."""
    return "bank:transfers:3\n" + v(prev) + "".join(v(x) for x in row)


def transfer_text_v1(prev: str, seq: object, kind: object, *rest: object) -> str:
    debit, credit, amount, ts_us, key = rest
    return f"{prev}\n{seq}|{kind}|{debit}|{credit}|{amount}|{ts_us}|{key or ''}"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def parse_v2(message: str) -> list[int | str | None]:
    """Decode a format-2 message back into its typed values: the grammar admits one parse."""
    data = message.encode()
    tag, _, body = data.partition(b"\n")
    assert tag in (b"bank:transfers:2", b"bank:account_events:2")
    values: list[int | str | None] = []
    i = 0
    while i < len(body):
        t = body[i : i + 1]
        if t == b"n":
            values.append(None)
            i += 1
        elif t == b"i":
            end = body.index(b";", i)
            digits = body[i + 1 : end].decode()
            assert re.fullmatch(r"-?(0|[1-9][0-9]*)", digits)
            values.append(int(digits))
            i = end + 1
        elif t == b"s":
            colon = body.index(b":", i)
            n = int(body[i + 1 : colon])
            values.append(body[colon + 1 : colon + 1 + n].decode())
            i = colon + 1 + n
        else:
            raise AssertionError(f"no value starts with {t!r}")
    return values


ints = st.integers(-(2**63), 2**63 - 1)
texts = st.text(st.characters(codec="utf-8"), max_size=20) | st.sampled_from(
    ["|", "1|2", "s3:", ""]
)
values = st.one_of(ints, texts, st.none())


@settings(max_examples=300, deadline=None)
@given(st.lists(values, min_size=1, max_size=9))
def test_format_2_parses_back_one_way(row: list[int | str | None]) -> None:
    """Every value delimits itself and carries its type: the bytes determine the row."""
    assert parse_v2(transfer_text_v2(GENESIS, *row)) == [GENESIS, *row]


@settings(max_examples=200, deadline=None)
@given(
    seq=st.integers(1, 2**62),
    kind=st.sampled_from(["deposit", "withdrawal", "transfer"]),
    debit=st.integers(0, 2**63 - 1),
    credit=st.integers(0, 2**63 - 1),
    amount=st.integers(1, 10**15),
    ts_us=st.integers(0, 2**62),
    key=st.none() | st.text(st.characters(codec="utf-8"), min_size=1, max_size=128),
)
def test_the_writer_hashes_the_documented_format_2(
    seq: int, kind: str, debit: int, credit: int, amount: int, ts_us: int, key: str | None
) -> None:
    from bank.ledger.chain import stored_transfer_hash, transfer_hash_v2

    prev = sha(str(seq))
    expected = sha(transfer_text_v2(prev, seq, kind, debit, credit, amount, ts_us, key))
    assert transfer_hash_v2(prev, seq, kind, debit, credit, amount, ts_us, key) == expected
    assert stored_transfer_hash(2, prev, seq, kind, debit, credit, amount, ts_us, key) == expected


_maybe = st.none() | st.integers(-(2**63), 2**63 - 1)


@settings(max_examples=200, deadline=None)
@given(
    seq=st.integers(1, 2**62),
    kind=st.sampled_from(["deposit", "withdrawal", "transfer", "hold", "post", "void", "expire"]),
    accounts=st.tuples(st.integers(0, 2**63 - 1), st.integers(0, 2**63 - 1)),
    amount=st.integers(1, 10**15),
    ts_us=st.integers(0, 2**62),
    key=st.none() | st.text(st.characters(codec="utf-8"), min_size=1, max_size=128),
    balances=st.tuples(st.integers(-(2**63), 2**63 - 1), st.integers(-(2**63), 2**63 - 1)),
    extra=st.tuples(_maybe, _maybe, _maybe, _maybe),
)
def test_the_writer_and_the_audit_hash_the_documented_format_3(
    seq: int,
    kind: str,
    accounts: tuple[int, int],
    amount: int,
    ts_us: int,
    key: str | None,
    balances: tuple[int, int],
    extra: tuple[int | None, int | None, int | None, int | None],
) -> None:
    from bank.ledger.audit_chain import transfer_hash as audit_hash
    from bank.ledger.chain import stored_transfer_hash, transfer_hash

    prev = sha(str(seq))
    row = (seq, kind, *accounts, amount, ts_us, key)
    expected = sha(transfer_text_v3(prev, *row, *balances, *extra))
    assert transfer_hash(prev, *row, *balances, *extra) == expected
    assert stored_transfer_hash(3, prev, *row, *balances, *extra) == expected
    assert audit_hash(3, prev, *row, *balances, *extra) == expected


def test_the_finding_2_rows_collide_in_format_1_and_differ_in_format_2() -> None:
    """The edited row of finding 2 gives format 1's text exactly; format 2 tells them apart."""
    ts = 1_764_620_000_123_456
    genuine = (5, "deposit", 0, 1, 100, ts, INVOICE_KEY)
    edited = (5, "deposit", 0, 1, 100, f"{ts}|invoice", "7")
    assert transfer_text_v1(GENESIS, *genuine) == transfer_text_v1(GENESIS, *edited)
    assert transfer_text_v2(GENESIS, *genuine) != transfer_text_v2(GENESIS, *edited)
    dropped = (5, "deposit", 0, 1, 100, f"{ts}|order-17", None)
    assert transfer_text_v1(GENESIS, 5, "deposit", 0, 1, 100, ts, ORDER_KEY) == transfer_text_v1(
        GENESIS, *dropped
    )


# -- ledgers ---------------------------------------------------------------------------------


def build_head_ledger(path: Path) -> dict[str, int]:
    """A ledger written by the engine: keyed deposits and an account whose name has a '|'."""
    with bank.Bank.open(path, durability="normal") as b:
        alice = b.open_account("alice").id
        bob = b.open_account(SPLIT_NAME).id
        invoice = b.deposit(alice, 100_00, key=INVOICE_KEY).seq
        order = b.deposit(bob, 50_00, key=ORDER_KEY).seq
        b.transfer(alice, bob, 10_00)
        return {"alice": alice, "bob": bob, "invoice": invoice, "order": order}


@contextmanager
def forger(path: Path) -> Iterator[sqlite3.Connection]:
    """A plain sqlite3 connection in one transaction, as a forger at the command line has one."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN")
        yield conn
        conn.execute("COMMIT")
    finally:
        conn.close()


def rebuild_without_strict(conn: sqlite3.Connection, table: str) -> None:
    """What a forger does first on a STRICT ledger: the same table, minus STRICT, same rows."""
    views = conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'view'").fetchall()
    for name, _ in views:
        conn.execute(f"DROP VIEW {name}")
    (sql,) = conn.execute(
        "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
    ).fetchone()
    indexes = [
        r[0]
        for r in conn.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = ? AND sql IS NOT NULL",
            (table,),
        )
    ]
    conn.execute(f"ALTER TABLE {table} RENAME TO _strict_{table}")
    conn.execute(re.sub(r"\)\s*STRICT\s*$", ")", sql.strip()))
    conn.execute(f"INSERT INTO {table} SELECT * FROM _strict_{table}")
    conn.execute(f"DROP TABLE _strict_{table}")
    for index in indexes:
        conn.execute(index)
    for _, view in views:
        conn.execute(view)


#: The three edits of finding 2, each keeping format 1's text of the row unchanged.
ATTACKS = {
    "key split": (
        "transfers",
        "UPDATE transfers SET ts_us = CAST(ts_us AS TEXT) || '|invoice', key = '7' WHERE seq = :invoice",
    ),
    "key dropped": (
        "transfers",
        "UPDATE transfers SET ts_us = CAST(ts_us AS TEXT) || '|order-17', key = NULL WHERE seq = :order",
    ),
    "account renamed": (
        "account_events",
        "UPDATE account_events SET ts_us = CAST(ts_us AS TEXT) || '|bob', name = 'smith' "
        "WHERE account_id = :bob AND kind = 'open'",
    ),
}


def attack(conn: sqlite3.Connection, name: str, ids: dict[str, int]) -> None:
    _, sql = ATTACKS[name]
    conn.execute(sql, ids)
    if name == "account renamed":
        conn.execute("UPDATE accounts SET name = 'smith' WHERE id = :bob", ids)


def problems_at(report: AuditReport, kind: str) -> set[tuple[int | None, int | None]]:
    return {(p.seq, p.event_seq) for p in report.problems if p.kind == kind}


def edited_location(name: str, ids: dict[str, int], path: Path) -> tuple[int | None, int | None]:
    """(transfer seq, event seq) of the row an attack edits."""
    if name == "key split":
        return ids["invoice"], None
    if name == "key dropped":
        return ids["order"], None
    conn = sqlite3.connect(path)
    try:
        (seq,) = conn.execute(
            "SELECT seq FROM account_events WHERE account_id = ? AND kind = 'open'", (ids["bob"],)
        ).fetchone()
    finally:
        conn.close()
    return None, seq


@pytest.fixture(scope="module")
def head_ledger(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    path = tmp_path_factory.mktemp("chain") / "head.db"
    return path, build_head_ledger(path)


def copy_of(source: Path, target: Path) -> Path:
    target.write_bytes(source.read_bytes())  # the engine closed it: no -wal content left
    return target


# (a) the schema refuses the edit -----------------------------------------------------------


@pytest.mark.parametrize("name", list(ATTACKS))
def test_strict_tables_refuse_the_finding_2_edit(
    head_ledger: tuple[Path, dict[str, int]], tmp_path: Path, name: str
) -> None:
    path = copy_of(head_ledger[0], tmp_path / "l.db")
    before = path.read_bytes()
    refused = pytest.raises(sqlite3.IntegrityError, match="cannot store TEXT value in INTEGER")
    with refused, forger(path) as conn:
        attack(conn, name, head_ledger[1])
    assert path.read_bytes() == before
    assert audit_ledger(path).ok


@pytest.mark.parametrize(
    ("table", "sql"),
    [
        ("transfers", "UPDATE transfers SET amount = 2.5 WHERE seq = 1"),
        ("transfers", "UPDATE transfers SET amount = 'lots' WHERE seq = 1"),
        ("transfers", "UPDATE transfers SET key = x'01' WHERE seq = 1"),
        ("transfers", "UPDATE transfers SET hash = x'00' WHERE seq = 1"),
        ("accounts", "UPDATE accounts SET balance = 'lots' WHERE id = 1"),
        ("account_events", "UPDATE account_events SET overdraft_limit = 1.5 WHERE seq = 2"),
    ],
)
def test_every_column_type_is_enforced_by_the_schema_and_checked_by_the_audit(
    head_ledger: tuple[Path, dict[str, int]], tmp_path: Path, table: str, sql: str
) -> None:
    path = copy_of(head_ledger[0], tmp_path / "l.db")
    with pytest.raises(sqlite3.IntegrityError, match="cannot store"), forger(path) as conn:
        conn.execute(sql)
    with forger(path) as conn:
        rebuild_without_strict(conn, table)
        conn.execute(sql)
    assert "bad_type" in {p.kind for p in audit_ledger(path).problems}


# (b) a rebuilt, non-STRICT table: the audit reports the type and the hash -----------------


@pytest.mark.parametrize("name", list(ATTACKS))
def test_the_audit_finds_the_finding_2_edit_on_a_rebuilt_table(
    head_ledger: tuple[Path, dict[str, int]], tmp_path: Path, name: str
) -> None:
    source, ids = head_ledger
    path = copy_of(source, tmp_path / "l.db")
    head = audit_ledger(path).head
    with forger(path) as conn:
        rebuild_without_strict(conn, ATTACKS[name][0])
        attack(conn, name, ids)
    report = audit_ledger(path, expect_head=head)
    where = edited_location(name, ids, path)
    assert where in problems_at(report, "bad_type")
    mismatch = "hash_mismatch" if where[0] is not None else "event_hash_mismatch"
    assert where in problems_at(report, mismatch)
    assert not report.ok


# (c) no second payment goes unnoticed -------------------------------------------------------


@pytest.mark.parametrize("name", ["key split", "key dropped"])
def test_a_retry_after_the_edit_does_not_pay_twice_unnoticed(
    head_ledger: tuple[Path, dict[str, int]], tmp_path: Path, name: str
) -> None:
    source, ids = head_ledger
    path = copy_of(source, tmp_path / "l.db")
    with forger(path) as conn:
        rebuild_without_strict(conn, "transfers")
        attack(conn, name, ids)
    key, account, amount = (
        (INVOICE_KEY, ids["alice"], 100_00)
        if name == "key split"
        else (ORDER_KEY, ids["bob"], 50_00)
    )
    try:
        with bank.Bank.open(path, durability="normal") as b:
            receipt = b.deposit(account, amount, key=key)
    except bank.BankError as exc:  # Bank.open's own verification may refuse the ledger
        assert type(exc).__name__ == "LedgerCorrupt", exc
        return
    paid_twice = receipt.seq != ids["invoice" if name == "key split" else "order"]
    report = audit_ledger(path)
    assert not report.ok, "a retry paid a second time and the audit said CLEAN"
    if paid_twice:
        assert {"bad_type", "hash_mismatch"} <= {p.kind for p in report.problems}


def test_an_account_name_freed_by_the_edit_is_noticed(
    head_ledger: tuple[Path, dict[str, int]], tmp_path: Path
) -> None:
    source, ids = head_ledger
    path = copy_of(source, tmp_path / "l.db")
    with forger(path) as conn:
        rebuild_without_strict(conn, "account_events")
        attack(conn, "account renamed", ids)
    try:
        with bank.Bank.open(path, durability="normal") as b:
            b.open_account(SPLIT_NAME)
    except bank.BankError as exc:
        assert type(exc).__name__ == "LedgerCorrupt", exc
        return
    report = audit_ledger(path)
    assert {"bad_type", "event_hash_mismatch"} <= {p.kind for p in report.problems}


# -- ledgers from revision 0002 --------------------------------------------------------------


def _alembic(path: Path, target: str) -> None:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    engine = create_ledger_engine(ledger_url(path))
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, target)
    finally:
        engine.dispose()


def build_0002_ledger(path: Path) -> dict[str, int]:
    """A ledger as revision 0002's engine wrote it: format-1 hashes, no STRICT tables.

    Rows are written with plain sqlite3 and the format-1 formula (re-implemented above):
    accounts alice and 'bob|smith', two keyed deposits and a transfer.
    """
    _alembic(path, "0002")
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN")
        (prev,) = conn.execute("SELECT hash FROM account_events WHERE seq = 1").fetchone()
        ts = 1_700_000_000_000_000
        for seq, (account, name) in enumerate([(1, "alice"), (2, SPLIT_NAME)], start=2):
            conn.execute("INSERT INTO accounts VALUES (?, ?, 0, 0)", (account, name))
            prev = sha(f"{prev}\n{seq}|{account}|open|0|0|{ts}|{name}")
            conn.execute(
                "INSERT INTO account_events VALUES (?, ?, 'open', ?, 0, 0, ?, ?)",
                (seq, account, name, ts, prev),
            )
        prev = GENESIS
        rows = [
            ("deposit", 0, 1, 100_00, INVOICE_KEY),
            ("deposit", 0, 2, 50_00, ORDER_KEY),
            ("transfer", 1, 2, 10_00, None),
        ]
        for seq, (kind, debit, credit, amount, key) in enumerate(rows, start=1):
            ts += 1
            prev = sha(transfer_text_v1(prev, seq, kind, debit, credit, amount, ts, key))
            conn.execute(
                "INSERT INTO transfers VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (seq, key, kind, debit, credit, amount, ts, prev),
            )
        for account, balance in ((0, -150_00), (1, 90_00), (2, 60_00)):
            conn.execute("UPDATE accounts SET balance = ? WHERE id = ?", (balance, account))
        conn.execute("COMMIT")
    finally:
        conn.close()
    return {"alice": 1, "bob": 2, "invoice": 1, "order": 2}


def _revision(path: Path) -> str:
    conn = sqlite3.connect(path)
    try:
        return str(conn.execute("SELECT version_num FROM alembic_version").fetchone()[0])
    finally:
        conn.close()


@pytest.fixture(scope="module")
def ledger_0002(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    path = tmp_path_factory.mktemp("chain") / "rev0002.db"
    ids = build_0002_ledger(path)
    assert _revision(path) == "0002"
    return path, ids


@pytest.mark.parametrize("name", list(ATTACKS))
def test_the_audit_finds_the_finding_2_edit_at_revision_0002(
    ledger_0002: tuple[Path, dict[str, int]], tmp_path: Path, name: str
) -> None:
    source, ids = ledger_0002
    path = copy_of(source, tmp_path / "l.db")
    assert audit_ledger(path).ok
    head = audit_ledger(path).head
    with forger(path) as conn:
        attack(conn, name, ids)
    report = audit_ledger(path, expect_head=head)
    where = edited_location(name, ids, path)
    assert where in problems_at(report, "bad_type")
    mismatch = "hash_mismatch" if where[0] is not None else "event_hash_mismatch"
    assert where in problems_at(report, mismatch)


def test_an_edited_0002_ledger_is_not_upgraded(
    ledger_0002: tuple[Path, dict[str, int]], tmp_path: Path
) -> None:
    """STRICT would coerce or reject the edited row: the migration refuses, leaving it all as it was."""
    source, ids = ledger_0002
    path = copy_of(source, tmp_path / "l.db")
    with forger(path) as conn:
        attack(conn, "key split", ids)
    with pytest.raises(LedgerCorrupt, match=r"transfers row seq=1 holds a text in column ts_us"):
        bank.Bank.open(path, durability="normal")
    assert _revision(path) == "0002"
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT key FROM transfers WHERE seq = 1").fetchone() == ("7",)
    finally:
        conn.close()


def test_a_0002_ledger_upgrades_keeps_its_hashes_and_chains_on_in_format_2(
    ledger_0002: tuple[Path, dict[str, int]], tmp_path: Path
) -> None:
    source, ids = ledger_0002
    path = copy_of(source, tmp_path / "l.db")
    rows_before = _rows(path)
    with bank.Bank.open(path, durability="normal") as b:
        assert b.deposit(ids["alice"], 100_00, key=INVOICE_KEY).seq == ids["invoice"]  # still taken
        new = [b.deposit(ids["alice"], 7_00, key="after-upgrade").seq, b.withdraw(ids["bob"], 5)]
        carol = b.open_account("carol").id
        b.transfer(ids["alice"], carol, 3_00)
    assert _revision(path) == head_revision()
    rows_after = _rows(path)
    assert rows_after["transfers"][: len(rows_before["transfers"])] == rows_before["transfers"]
    assert rows_after["account_events"][:3] == rows_before["account_events"]
    conn = sqlite3.connect(path)
    try:
        formats = conn.execute("SELECT * FROM chain_formats ORDER BY chain, first_seq").fetchall()
        strict = conn.execute(
            "SELECT name FROM pragma_table_list WHERE schema = 'main' AND strict = 1"
        ).fetchall()
        index = conn.execute(
            "SELECT sql FROM sqlite_master WHERE name = 'uq_transfers_key'"
        ).fetchone()
    finally:
        conn.close()
    assert formats == [
        ("account_events", 1, 1),
        ("account_events", 4, 2),
        ("transfers", 1, 1),
        ("transfers", 4, 3),  # 0003 made it format 2; no row had it when 0006 made it 3
    ]
    assert {n for (n,) in strict} == {
        "accounts",
        "transfers",
        "account_events",
        "chain_formats",
        "postings",  # revision 0007
        "postings_upto",
    }
    assert "WHERE key IS NOT NULL" in index[0] and "UNIQUE" in index[0]
    # The new rows are format 3, chained to the last format-1 row.
    seq, kind, debit, credit, amount, ts_us, key, digest = rows_after["transfers"][3]
    prev = rows_after["transfers"][2][-1]
    assert (seq, key) == (new[0], "after-upgrade")
    conn = sqlite3.connect(path)
    try:
        after = conn.execute(
            "SELECT debit_balance, credit_balance FROM transfers WHERE seq = ?", (seq,)
        ).fetchone()
    finally:
        conn.close()
    text = transfer_text_v3(prev, seq, kind, debit, credit, amount, ts_us, key, *after)
    assert digest == sha(text + "nnnn")
    report = audit_ledger(path)
    assert report.ok, report.problems
    assert report.transfers_checked == 6 and report.account_events_checked == 4


@pytest.fixture
def upgraded(ledger_0002: tuple[Path, dict[str, int]], tmp_path: Path) -> Path:
    path = copy_of(ledger_0002[0], tmp_path / "l.db")
    with bank.Bank.open(path, durability="normal") as b:
        b.deposit(1, 7_00)
        b.deposit(2, 9_00)
        b.open_account("carol")
    return path


@pytest.mark.parametrize(
    ("sql", "kind", "seq", "event_seq"),
    [
        ("UPDATE transfers SET amount = amount + 1 WHERE seq = 2", "hash_mismatch", 2, None),
        ("UPDATE transfers SET amount = amount + 1 WHERE seq = 5", "hash_mismatch", 5, None),
        ("UPDATE account_events SET name = 'alicia' WHERE seq = 2", "event_hash_mismatch", None, 2),
        (
            "UPDATE account_events SET ts_us = ts_us + 1 WHERE seq = 4",
            "event_hash_mismatch",
            None,
            4,
        ),
        # Moving a boundary breaks the hashes of the rows it moves over.
        (
            "UPDATE chain_formats SET first_seq = 5 WHERE chain = 'transfers' AND version = 3",
            "hash_mismatch",
            4,
            None,
        ),
        (
            "UPDATE chain_formats SET first_seq = 3 WHERE chain = 'transfers' AND version = 3",
            "hash_mismatch",
            3,
            None,
        ),
        (
            "DELETE FROM chain_formats WHERE chain = 'transfers' AND version = 3",
            "hash_mismatch",
            4,
            None,
        ),
    ],
)
def test_a_one_row_edit_of_an_old_or_new_row_is_found(
    upgraded: Path, sql: str, kind: str, seq: int | None, event_seq: int | None
) -> None:
    assert audit_ledger(upgraded).ok
    with forger(upgraded) as conn:
        conn.execute(sql)
    report = audit_ledger(upgraded)
    assert (seq, event_seq) in problems_at(report, kind), report.problems


def test_a_deleted_chain_formats_entry_is_a_chain_format_problem(upgraded: Path) -> None:
    with forger(upgraded) as conn:
        conn.execute("DELETE FROM chain_formats WHERE chain = 'account_events' AND first_seq = 1")
    report = audit_ledger(upgraded)
    assert "chain_format" in {p.kind for p in report.problems}


def _rows(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    conn = sqlite3.connect(path)
    try:
        return {
            "transfers": conn.execute(
                "SELECT seq, kind, debit_account_id, credit_account_id, amount, ts_us, key, hash "
                "FROM transfers ORDER BY seq"
            ).fetchall(),
            "account_events": conn.execute("SELECT * FROM account_events ORDER BY seq").fetchall(),
        }
    finally:
        conn.close()


def test_a_new_ledger_chains_transfers_in_format_3_from_seq_1(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    engine = create_ledger_engine(ledger_url(path))
    try:
        upgrade_to_head(engine)
    finally:
        engine.dispose()
    conn = sqlite3.connect(path)
    try:
        formats = conn.execute("SELECT * FROM chain_formats ORDER BY chain, first_seq").fetchall()
    finally:
        conn.close()
    # Event 1 (@cash, written by migration 0001) stays format 1; every event after is
    # format 2, every transfer format 3 (revision 0006).
    assert formats == [("account_events", 1, 1), ("account_events", 2, 2), ("transfers", 1, 3)]


def test_alembic_check_finds_no_drift_after_0003(tmp_path: Path) -> None:
    """CI's check: the models match what the migrations build (STRICT types included)."""
    url = f"sqlite:///{tmp_path / 'check.db'}"
    ini = str(migrations_dir() / "alembic.ini")
    alembic = [str(Path(__import__("sys").executable).with_name("alembic")), "-c", ini, "-x"]
    subprocess.run([*alembic, f"url={url}", "upgrade", "head"], check=True, capture_output=True)
    done = subprocess.run(
        [*alembic, f"url={url}", "check"], check=False, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "No new upgrade operations detected" in done.stdout + done.stderr
