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
from tests.audit_ledgers import (
    build_engine_ledger,
    copy_ledger,
    edit,
    named,
    rechain,
    recompute_running,
)

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
    hold_seq: int | None
    expires_us: int | None
    link_first: int | None
    link_count: int | None

    def rehash(self, prev: str, **changed: object) -> str:
        """This row's format-3 hash with some fields changed (a forger's recomputation)."""
        f = {**self.__dict__, **changed}
        return transfer_hash(
            prev, f["seq"], f["kind"], f["debit"], f["credit"], f["amount"], f["ts_us"],
            f["key"], f["debit_balance"], f["credit_balance"], f["hold_seq"], f["expires_us"],
            f["link_first"], f["link_count"],
        )  # fmt: skip


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
    committed = build_engine_ledger(path, transfers=TRANSFERS_MIN, holds=True)
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
    forged = r.rehash(prev, amount=new)
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
    """A running balance edited (covered by hash format 3, and replayed)."""
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
    digest = (
        transfer_hash(
            head, seq, kind, debit, credit, amount, ts_us, None, after[debit], after[credit]
        )
        if rng.random() < 0.5
        else secrets.token_hex(32)
    )
    conn.execute(
        "INSERT INTO transfers VALUES (?, NULL, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, NULL, NULL)",
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
    digest = transfer_hash("0" * 64, seq, "deposit", 0, a, 500, 0, None, -500, 500)
    conn.execute(
        "INSERT INTO transfers VALUES (?, NULL, 'deposit', 0, ?, 500, 0, ?, -500, 500, "
        "NULL, NULL, NULL, NULL)",
        (seq, a, digest),
    )
    return Expect(f"forged row at seq {seq}", seqs={seq}, accounts={a})


def swap_rows(conn: sqlite3.Connection, rng: random.Random, ledger: Ledger) -> Expect:
    s1, s2 = sorted(rng.sample(range(1, ledger.last + 1), 2))
    conn.execute("UPDATE transfers SET seq = -7 WHERE seq = ?", (s1,))
    conn.execute("UPDATE transfers SET seq = ? WHERE seq = ?", (s1, s2))
    conn.execute("UPDATE transfers SET seq = ? WHERE seq = -7", (s2,))
    return Expect(f"swapped seq {s1} and {s2}", seqs={s1, s2})


# -- holds and groups (revision 0006): each field and kind; the "rechained" ones recompute
# every hash (and the running balances), so only the hold and group rules can see them.


def _of_kind(ledger: Ledger, *kinds: str) -> list[Row]:
    rows = [r for r in ledger.rows if r.kind in kinds]
    assert rows, f"the ledger has no {kinds} rows"
    return rows


def change_hold_field(conn: sqlite3.Connection, rng: random.Random, ledger: Ledger) -> Expect:
    """hold_seq, expires_us, link_first or link_count of a row edited (the hash sees it)."""
    r = rng.choice([x for x in ledger.rows if x.hold_seq or x.expires_us or x.link_first])
    column = rng.choice(
        [c for c in ("hold_seq", "expires_us", "link_first", "link_count") if getattr(r, c)]
    )
    value = rng.choice((None, getattr(r, column) + rng.randint(1, 5)))
    conn.execute("DROP INDEX uq_transfers_hold_seq")
    conn.execute(f"UPDATE transfers SET {column} = ? WHERE seq = ?", (value, r.seq))
    return Expect(f"{column} of seq {r.seq} -> {value}", seqs={r.seq})


def change_kind_two_phase(conn: sqlite3.Connection, rng: random.Random, ledger: Ledger) -> Expect:
    """A kind turned into or out of a two-phase kind, the chain and balances recomputed."""
    # (A post made a transfer, with its hold left pending, is a consistent forgery of the
    # whole chain: only a pinned head catches that, see `expect_head`.)
    r = rng.choice(
        [x for x in ledger.rows if x.kind in ("deposit", "withdrawal", "transfer", "hold")]
    )
    new = "transfer" if r.kind == "hold" else rng.choice(("hold", "void"))
    conn.execute("UPDATE transfers SET kind = ? WHERE seq = ?", (new, r.seq))
    recompute_running(conn)
    rechain(conn)
    # A transfer made a hold moves nothing any more: the stored balances then disagree.
    return Expect(
        f"kind of seq {r.seq}: {r.kind} -> {new}, rechained",
        seqs={r.seq},
        accounts={r.debit, r.credit},
    )


def post_beyond_hold_rechained(
    conn: sqlite3.Connection, rng: random.Random, ledger: Ledger
) -> Expect:
    r = rng.choice(_of_kind(ledger, "post"))
    conn.execute("UPDATE transfers SET amount = amount + 5000 WHERE seq = ?", (r.seq,))
    recompute_running(conn)
    conn.execute("UPDATE accounts SET balance = balance - 5000 WHERE id = ?", (r.debit,))
    conn.execute("UPDATE accounts SET balance = balance + 5000 WHERE id = ?", (r.credit,))
    rechain(conn)
    return Expect(f"post {r.seq} beyond its hold, rechained", seqs={r.seq})


def settle_twice_rechained(conn: sqlite3.Connection, rng: random.Random, ledger: Ledger) -> Expect:
    """A void pointed at a hold that another row settled (the unique index dropped)."""
    r = rng.choice(_of_kind(ledger, "void"))
    other = rng.choice([x for x in _of_kind(ledger, "post", "void", "expire") if x.seq != r.seq])
    conn.execute("DROP INDEX uq_transfers_hold_seq")
    conn.execute("UPDATE transfers SET hold_seq = ? WHERE seq = ?", (other.hold_seq, r.seq))
    rechain(conn)
    return Expect(
        f"void {r.seq} re-pointed at hold {other.hold_seq}, rechained",
        seqs={r.seq, other.seq, other.hold_seq or 0},
    )


def settle_after_deadline_rechained(
    conn: sqlite3.Connection, rng: random.Random, ledger: Ledger
) -> Expect:
    """An expire stamped before its hold's deadline, or a hold's deadline moved before a
    post of it."""
    r = rng.choice(_of_kind(ledger, "expire"))
    hold = ledger.row(r.hold_seq or 0)
    assert hold.expires_us is not None
    conn.execute("UPDATE transfers SET expires_us = ? WHERE seq = ?", (r.ts_us + 10**9, hold.seq))
    rechain(conn)
    return Expect(f"hold {hold.seq}'s deadline after its expire {r.seq}", seqs={r.seq})


def cut_group_rechained(conn: sqlite3.Connection, rng: random.Random, ledger: Ledger) -> Expect:
    r = rng.choice([x for x in ledger.rows if x.link_first is not None])
    how = rng.choice(("unlink", "delete"))
    if how == "unlink":
        conn.execute(
            "UPDATE transfers SET link_first = NULL, link_count = NULL WHERE seq = ?", (r.seq,)
        )
    else:
        conn.execute("UPDATE transfers SET link_count = link_count + 1 WHERE link_first = ?",
                     (r.link_first,))  # fmt: skip
    rechain(conn)
    first = r.link_first or 0
    return Expect(
        f"group at {first} cut ({how}) at seq {r.seq}, rechained",
        seqs=set(range(first, first + (r.link_count or 0) + 2)),
    )


MUTATIONS: list[Mutation] = [
    change_hold_field,
    change_kind_two_phase,
    post_beyond_hold_rechained,
    settle_twice_rechained,
    settle_after_deadline_rechained,
    cut_group_rechained,
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
