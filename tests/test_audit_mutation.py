"""Every single random corruption of an engine-built ledger is reported, at the right seq or account."""

from __future__ import annotations

import random
import secrets
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bank.ledger.audit import audit_ledger
from bank.ledger.chain import transfer_hash
from tests.audit_ledgers import build_engine_ledger, copy_ledger, edit, named

TRANSFERS_MIN = 5_000
ITERATIONS = 240


@dataclass(frozen=True)
class Row:
    seq: int
    key: str | None
    kind: str
    debit: int
    credit: int
    amount: int
    ts_us: int
    hash: str
    debit_balance: int
    credit_balance: int


@dataclass(frozen=True)
class Ledger:
    """The clean ledger and what a mutation needs to know about it."""

    path: Path
    rows: list[Row]
    accounts: list[int]
    customers: list[int]
    events: list[tuple[int, int]]  # (event seq, account id)

    @property
    def last(self) -> int:
        return self.rows[-1].seq

    def row(self, seq: int) -> Row:
        return self.rows[seq - 1]


@dataclass
class Expect:
    """Where the audit must point: any one of these seqs, accounts or event seqs."""

    what: str
    seqs: set[int] = field(default_factory=set)
    accounts: set[int] = field(default_factory=set)
    events: set[int] = field(default_factory=set)


@pytest.fixture(scope="module")
def ledger(tmp_path_factory: pytest.TempPathFactory) -> Ledger:
    path = tmp_path_factory.mktemp("mutation") / "clean.db"
    committed = build_engine_ledger(path, transfers=TRANSFERS_MIN)
    assert committed >= TRANSFERS_MIN
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = [Row(*r) for r in conn.execute("SELECT * FROM transfers ORDER BY seq")]
        accounts = [r[0] for r in conn.execute("SELECT id FROM accounts ORDER BY id")]
        events = [
            (r[0], r[1])
            for r in conn.execute("SELECT seq, account_id FROM account_events ORDER BY seq")
        ]
    finally:
        conn.close()
    assert [r.seq for r in rows] == list(range(1, len(rows) + 1))
    return Ledger(path, rows, accounts, [a for a in accounts if a != 0], events)


Mutation = Callable[[sqlite3.Connection, random.Random, Ledger], Expect]


def _pick(rng: random.Random, ledger: Ledger) -> Row:
    return ledger.row(rng.randint(1, ledger.last))


def _touching(row: Row) -> set[int]:
    return {row.debit, row.credit}


def change_amount(conn: sqlite3.Connection, rng: random.Random, ledger: Ledger) -> Expect:
    r = _pick(rng, ledger)
    new = r.amount + rng.choice((-1, 1)) * rng.randint(1, 1000)
    if new <= 0 or new == r.amount:
        new = r.amount + 7
    conn.execute("UPDATE transfers SET amount = ? WHERE seq = ?", (new, r.seq))
    return Expect(f"amount of seq {r.seq}: {r.amount} -> {new}", seqs={r.seq})


def change_amount_rehashed(conn: sqlite3.Connection, rng: random.Random, ledger: Ledger) -> Expect:
    """Edit a row and recompute that row's hash only: the link to the next row breaks."""
    r = _pick(rng, ledger)
    new = r.amount + rng.randint(1, 1000)
    prev = ledger.row(r.seq - 1).hash if r.seq > 1 else "0" * 64
    forged = transfer_hash(prev, r.seq, r.kind, r.debit, r.credit, new, r.ts_us, r.key)
    conn.execute("UPDATE transfers SET amount = ?, hash = ? WHERE seq = ?", (new, forged, r.seq))
    return Expect(
        f"amount of seq {r.seq} with its hash recomputed",
        seqs={r.seq, r.seq + 1},
        accounts=_touching(r),
    )


def change_account(conn: sqlite3.Connection, rng: random.Random, ledger: Ledger) -> Expect:
    r = _pick(rng, ledger)
    column = rng.choice(("debit_account_id", "credit_account_id"))
    other = r.credit if column == "debit_account_id" else r.debit
    current = r.debit if column == "debit_account_id" else r.credit
    choices = [a for a in ledger.accounts if a not in (other, current)]
    # Sometimes an account that never existed.
    new = rng.choice([*choices, 10_000 + rng.randint(0, 99)])
    conn.execute(f"UPDATE transfers SET {column} = ? WHERE seq = ?", (new, r.seq))
    return Expect(f"{column} of seq {r.seq}: {current} -> {new}", seqs={r.seq})


def change_kind(conn: sqlite3.Connection, rng: random.Random, ledger: Ledger) -> Expect:
    r = _pick(rng, ledger)
    new = rng.choice([k for k in ("deposit", "withdrawal", "transfer") if k != r.kind])
    conn.execute("UPDATE transfers SET kind = ? WHERE seq = ?", (new, r.seq))
    return Expect(f"kind of seq {r.seq}: {r.kind} -> {new}", seqs={r.seq})


def change_key(conn: sqlite3.Connection, rng: random.Random, ledger: Ledger) -> Expect:
    r = _pick(rng, ledger)
    keyed = [row for row in ledger.rows if row.key is not None]
    how = rng.choice(("new", "null", "empty", "duplicate"))
    if how == "null" and r.key is None:
        how = "new"
    if how == "empty":
        # '' hashes exactly like NULL: only the key rule can see this one.
        conn.execute("UPDATE transfers SET key = '' WHERE seq = ?", (r.seq,))
        return Expect(f"key of seq {r.seq}: {r.key!r} -> ''", seqs={r.seq})
    if how == "duplicate":
        other = rng.choice([row for row in keyed if row.seq != r.seq])
        conn.execute("DROP INDEX uq_transfers_key")
        conn.execute("UPDATE transfers SET key = ? WHERE seq = ?", (other.key, r.seq))
        return Expect(f"key of seq {r.seq} set to seq {other.seq}'s", seqs={r.seq, other.seq})
    new = None if how == "null" else f"forged-{secrets.token_hex(4)}"
    conn.execute("UPDATE transfers SET key = ? WHERE seq = ?", (new, r.seq))
    return Expect(f"key of seq {r.seq}: {r.key!r} -> {new!r}", seqs={r.seq})


def change_balance(conn: sqlite3.Connection, rng: random.Random, ledger: Ledger) -> Expect:
    a = rng.choice(ledger.accounts)
    delta = rng.choice((-1, 1)) * rng.randint(1, 10**6)
    if rng.random() < 0.5:
        conn.execute("UPDATE accounts SET balance = balance + ? WHERE id = ?", (delta, a))
        return Expect(f"balance of account {a} + {delta}", accounts={a})
    b = rng.choice([x for x in ledger.accounts if x != a])
    # Moving money between two balances keeps the sum at 0: only the replay sees it.
    conn.execute("UPDATE accounts SET balance = balance + ? WHERE id = ?", (delta, a))
    conn.execute("UPDATE accounts SET balance = balance - ? WHERE id = ?", (delta, b))
    return Expect(f"{delta} moved from balance {b} to {a}", accounts={a, b})


def change_limit(conn: sqlite3.Connection, rng: random.Random, ledger: Ledger) -> Expect:
    a = rng.choice(ledger.customers)
    if rng.random() < 0.7:
        conn.execute(
            "UPDATE accounts SET overdraft_limit = overdraft_limit + 1000000 WHERE id = ?", (a,)
        )
        return Expect(f"overdraft limit of account {a} raised in place", accounts={a})
    seq = max(s for s, acc in ledger.events if acc == a)
    conn.execute(
        "UPDATE account_events SET overdraft_limit = overdraft_limit + 1000000 WHERE seq = ?",
        (seq,),
    )
    return Expect(f"overdraft limit raised in account event {seq}", accounts={a}, events={seq})


def change_account_id(conn: sqlite3.Connection, rng: random.Random, ledger: Ledger) -> Expect:
    a = rng.choice(ledger.customers)
    conn.execute("UPDATE accounts SET id = ? WHERE id = ?", (50_000, a))
    return Expect(f"accounts.id {a} -> 50000", accounts={a, 50_000})


def change_running_balance(conn: sqlite3.Connection, rng: random.Random, ledger: Ledger) -> Expect:
    """A running balance (not covered by the hash) edited: only the replay sees it."""
    r = _pick(rng, ledger)
    column = rng.choice(("debit_balance", "credit_balance"))
    delta = rng.choice((-1, 1)) * rng.randint(1, 10**6)
    conn.execute(f"UPDATE transfers SET {column} = {column} + ? WHERE seq = ?", (delta, r.seq))
    return Expect(f"{column} of seq {r.seq} + {delta}", seqs={r.seq})


def change_hash(conn: sqlite3.Connection, rng: random.Random, ledger: Ledger) -> Expect:
    r = _pick(rng, ledger)
    conn.execute("UPDATE transfers SET hash = ? WHERE seq = ?", (secrets.token_hex(32), r.seq))
    return Expect(f"hash of seq {r.seq}", seqs={r.seq})


def delete_row(conn: sqlite3.Connection, rng: random.Random, ledger: Ledger) -> Expect:
    r = ledger.row(ledger.last) if rng.random() < 0.1 else _pick(rng, ledger)
    conn.execute("DELETE FROM transfers WHERE seq = ?", (r.seq,))
    return Expect(f"deleted seq {r.seq}", seqs={r.seq}, accounts=_touching(r))


def delete_event(conn: sqlite3.Connection, rng: random.Random, ledger: Ledger) -> Expect:
    seq, account = rng.choice(ledger.events)
    conn.execute("DELETE FROM account_events WHERE seq = ?", (seq,))
    return Expect(f"deleted account event {seq}", accounts={account}, events={seq})


def insert_forged(conn: sqlite3.Connection, rng: random.Random, ledger: Ledger) -> Expect:
    """A new row after the head, chained to it (that row's hash recomputed) or not."""
    seq = ledger.last + rng.choice((1, 1, 1, 2, 50))
    a, b = rng.sample(ledger.customers, 2)
    kind, debit, credit = rng.choice((("deposit", 0, a), ("withdrawal", a, 0), ("transfer", a, b)))
    amount = rng.randint(1, 10_000)
    ts_us = ledger.row(ledger.last).ts_us + 1
    head = ledger.row(ledger.last).hash
    digest = (
        transfer_hash(head, seq, kind, debit, credit, amount, ts_us, None)
        if rng.random() < 0.5
        else secrets.token_hex(32)
    )
    # Running balances as the forger would compute them from the accounts' last rows.
    after = {}
    for account, sign in ((debit, -1), (credit, 1)):
        last = conn.execute(
            "SELECT CASE WHEN debit_account_id = ? THEN debit_balance ELSE credit_balance END "
            "FROM transfers WHERE debit_account_id = ? OR credit_account_id = ? "
            "ORDER BY seq DESC LIMIT 1",
            (account, account, account),
        ).fetchone()
        after[account] = (last[0] if last else 0) + sign * amount
    conn.execute(
        "INSERT INTO transfers VALUES (?, NULL, ?, ?, ?, ?, ?, ?, ?, ?)",
        (seq, kind, debit, credit, amount, ts_us, digest, after[debit], after[credit]),
    )
    return Expect(
        f"forged row at seq {seq}",
        seqs=set(range(ledger.last + 1, seq + 1)),
        accounts={debit, credit},
    )


def insert_forged_low(conn: sqlite3.Connection, rng: random.Random, ledger: Ledger) -> Expect:
    """A forged row before the first one (seq 0 or negative) is the only way into the middle."""
    seq = rng.choice((0, -1, -1000))
    a = rng.choice(ledger.customers)
    digest = transfer_hash("0" * 64, seq, "deposit", 0, a, 500, 0, None)
    conn.execute(
        "INSERT INTO transfers VALUES (?, NULL, 'deposit', 0, ?, 500, 0, ?, -500, 500)",
        (seq, a, digest),
    )
    return Expect(f"forged row at seq {seq}", seqs={seq}, accounts={a})


def swap_rows(conn: sqlite3.Connection, rng: random.Random, ledger: Ledger) -> Expect:
    s1, s2 = sorted(rng.sample(range(1, ledger.last + 1), 2))
    conn.execute("UPDATE transfers SET seq = -7 WHERE seq = ?", (s1,))
    conn.execute("UPDATE transfers SET seq = ? WHERE seq = ?", (s1, s2))
    conn.execute("UPDATE transfers SET seq = ? WHERE seq = -7", (s2,))
    return Expect(f"swapped seq {s1} and {s2}", seqs={s1, s2})


MUTATIONS: list[Mutation] = [
    change_amount,
    change_amount_rehashed,
    change_account,
    change_kind,
    change_key,
    change_balance,
    change_limit,
    change_account_id,
    change_running_balance,
    change_hash,
    delete_row,
    delete_event,
    insert_forged,
    insert_forged_low,
    swap_rows,
]


def test_clean_copy_audits_clean(ledger: Ledger, tmp_path: Path) -> None:
    report = audit_ledger(copy_ledger(ledger.path, tmp_path / "copy.db"))
    assert report.ok, report.problems[:5]
    assert report.seq == ledger.last >= TRANSFERS_MIN
    assert report.head_hash == ledger.rows[-1].hash
    assert report.transfers_checked == len(ledger.rows)


def test_every_random_corruption_is_found_and_located(ledger: Ledger, tmp_path: Path) -> None:
    rng = random.Random(20261124)
    seen: dict[str, int] = {}
    target = tmp_path / "mutated.db"
    for i in range(ITERATIONS):
        mutation = MUTATIONS[i % len(MUTATIONS)] if i < len(MUTATIONS) else rng.choice(MUTATIONS)
        copy_ledger(ledger.path, target)
        with edit(target) as conn:
            expect = mutation(conn, rng, ledger)
        report = audit_ledger(target)
        seen[mutation.__name__] = seen.get(mutation.__name__, 0) + 1
        assert not report.ok, f"iteration {i}: {expect.what}: not detected"
        seqs, accounts, events = named(report)
        assert seqs & expect.seqs or accounts & expect.accounts or events & expect.events, (
            f"iteration {i}: {expect.what}: the report points elsewhere: "
            f"{[(p.kind, p.seq, p.account, p.event_seq) for p in report.problems[:10]]}"
        )
    assert set(seen) == {m.__name__ for m in MUTATIONS}
