"""Ledgers for the audit tests: built by the real engine, then edited with plain sqlite3."""

from __future__ import annotations

import random
import shutil
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path

import bank
from bank.ledger.audit import AuditReport
from bank.ledger.chain import (
    GENESIS,
    stored_account_event_hash,
    stored_transfer_hash,
    version_at,
)
from bank.records import Receipt


def build_engine_ledger(
    path: Path, *, transfers: int, accounts: int = 24, seed: int = 7, holds: bool = False
) -> int:
    """Run the engine until `path` holds at least `transfers` committed transfers.

    Mixes transfers, deposits and withdrawals, keys on one operation in seven,
    accounts opened midway and overdraft limits raised midway, so every
    kind of row and event appears. With `holds`, also holds (some with a deadline that
    passes), partial and full posts, voids, expiries and atomic groups (revision 0006).
    Returns the number of transfers committed.
    """
    rng = random.Random(seed)
    committed = 0
    with bank.Bank.open(path, workers=4, durability="normal") as b:
        ids = [
            b.open_account(f"acct-{i:03d}", overdraft_limit=rng.choice((0, 0, 500, 10_000))).id
            for i in range(accounts)
        ]
        for f in b.submit_many([bank.Deposit(account=i, amount=100_000) for i in ids]):
            f.result()
            committed += 1
        chunk = 0
        while committed < transfers:
            chunk += 1
            if chunk % 2 == 0:
                # Accounts opened and limits raised between operations: events at transfer_seq > 0.
                ids.append(
                    b.open_account(f"late-{chunk:03d}", overdraft_limit=rng.choice((0, 300))).id
                )
                b.set_overdraft_limit(rng.choice(ids[1:]), rng.choice((1_000, 20_000)))
            commands: list[bank.Deposit | bank.Withdrawal | bank.Transfer] = []
            for n in range(500):
                roll = rng.random()
                key = f"op-{chunk}-{n}" if rng.random() < 1 / 7 else None
                a, c = rng.sample(ids, 2)
                amount = rng.randint(1, 5_000)
                if roll < 0.1:
                    commands.append(bank.Deposit(account=a, amount=amount, key=key))
                elif roll < 0.2:
                    commands.append(bank.Withdrawal(account=a, amount=amount, key=key))
                else:
                    commands.append(bank.Transfer(source=a, target=c, amount=amount, key=key))
            futures: list[Future[Receipt]] = b.submit_many(commands)
            for f in futures:
                if f.exception() is None:
                    committed += 1
            if holds:
                committed += _holds_and_groups(b, rng, ids, chunk)
    return committed


def _holds_and_groups(b: bank.Bank, rng: random.Random, ids: list[int], chunk: int) -> int:
    """A round of two-phase operations and groups; returns the rows committed."""
    rows = 0
    made: list[bank.Receipt] = []
    for n in range(40):
        a, c = rng.sample(ids, 2)
        expires = rng.choice((None, None, 600, 0.001))
        key = f"hold-{chunk}-{n}" if n % 5 == 0 else None
        try:
            made.append(b.hold(a, c, rng.randint(1, 3_000), key=key, expires_s=expires))
        except bank.BankError:
            continue
        rows += 1
    for h in made:
        roll = rng.random()
        try:
            if roll < 0.4:
                b.post(h.seq, rng.randint(1, h.amount) if rng.random() < 0.5 else None)
            elif roll < 0.7:
                b.void(h.seq)
            else:
                continue  # left pending (or to expire)
        except bank.BankError:
            continue  # it expired first
        rows += 1
    for n in range(5):
        a, c, d = rng.sample(ids, 3)
        group: list[bank.BankCommand] = [
            bank.Transfer(source=a, target=c, amount=rng.randint(1, 2_000)),
            bank.Transfer(source=a, target=d, amount=rng.randint(1, 100), key=f"fee-{chunk}-{n}"),
            bank.Hold(source=c, target=d, amount=rng.randint(1, 500)),
        ]
        try:
            rows += len(b.transact(group))
        except bank.LinkedCommandFailed:
            continue
    time.sleep(0.002)  # the 1 ms holds' deadlines pass: the timer expires them
    return rows


def copy_ledger(source: Path, target: Path) -> Path:
    """Copy a closed ledger (and any side files) to `target`."""
    shutil.copyfile(source, target)
    for suffix in ("-wal", "-shm"):
        side = source.with_name(source.name + suffix)
        if side.exists():
            shutil.copyfile(side, target.with_name(target.name + suffix))
    return target


@contextmanager
def edit(path: Path, *, checks: bool = True) -> Iterator[sqlite3.Connection]:
    """A plain sqlite3 connection, as a forger at the command line has one (FKs off).

    `checks=False` also turns CHECK constraints off, as `PRAGMA ignore_check_constraints` does.
    """
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        if not checks:
            conn.execute("PRAGMA ignore_check_constraints = ON")
        conn.execute("BEGIN")
        yield conn
        conn.execute("COMMIT")
    finally:
        conn.close()


def chain_formats(conn: sqlite3.Connection, chain: str) -> list[tuple[int, int]]:
    """One chain's sorted `(first_seq, version)` entries; none on a ledger before 0003."""
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "chain_formats" not in tables:
        return []
    rows = conn.execute(
        "SELECT first_seq, version FROM chain_formats WHERE chain = ? ORDER BY first_seq", (chain,)
    )
    return [(first_seq, version) for first_seq, version in rows]


def recompute_running(conn: sqlite3.Connection) -> None:
    """Rewrite every row's running balances (revision 0005) from a replay of the rows as
    they now are: a forger who knows the columns the hash does not cover."""
    balances: dict[int, int] = {}
    rows = conn.execute(
        "SELECT seq, kind, debit_account_id, credit_account_id, amount FROM transfers ORDER BY seq"
    ).fetchall()
    for seq, kind, debit, credit, amount in rows:
        moved = 0 if kind in ("hold", "void", "expire") else amount  # these move nothing
        balances[debit] = balances.get(debit, 0) - moved
        balances[credit] = balances.get(credit, 0) + moved
        conn.execute(
            "UPDATE transfers SET debit_balance = ?, credit_balance = ? WHERE seq = ?",
            (balances[debit], balances[credit], seq),
        )


def rechain(conn: sqlite3.Connection) -> None:
    """Recompute every hash of both chains: a forger who knows the formats.

    Each row gets the format `chain_formats` names for it. What is left to catch is
    then only what the replay and the cross-checks find.
    """
    formats = chain_formats(conn, "transfers")
    prev = GENESIS
    columns = {str(r[1]) for r in conn.execute("PRAGMA table_info(transfers)")}
    extra = [  # what hash format 3 also covers (revisions 0005, 0006)
        c if c in columns else "NULL"
        for c in (
            "debit_balance",
            "credit_balance",
            "hold_seq",
            "expires_us",
            "link_first",
            "link_count",
        )
    ]
    rows = conn.execute(
        "SELECT seq, kind, debit_account_id, credit_account_id, amount, ts_us, key, "
        f"{', '.join(extra)} FROM transfers ORDER BY seq"
    ).fetchall()
    for seq, kind, debit, credit, amount, ts_us, key, *more in rows:
        version = version_at(formats, seq)
        digest = stored_transfer_hash(
            version, prev, seq, kind, debit, credit, amount, ts_us, key, *more
        )
        assert digest is not None, f"transfer {seq} has values of the wrong type"
        prev = digest
        conn.execute("UPDATE transfers SET hash = ? WHERE seq = ?", (prev, seq))
    formats = chain_formats(conn, "account_events")
    prev = GENESIS
    events = conn.execute(
        "SELECT seq, account_id, kind, overdraft_limit, transfer_seq, ts_us, name FROM account_events ORDER BY seq"
    ).fetchall()
    for seq, account, kind, limit, transfer_seq, ts_us, name in events:
        version = version_at(formats, seq)
        digest = stored_account_event_hash(
            version, prev, seq, account, kind, limit, transfer_seq, ts_us, name
        )
        assert digest is not None, f"event {seq} has values of the wrong type"
        prev = digest
        conn.execute("UPDATE account_events SET hash = ? WHERE seq = ?", (prev, seq))


def named(report: AuditReport) -> tuple[set[int], set[int], set[int]]:
    """(transfer seqs, accounts, event seqs) that the report's problems point at."""
    seqs = {p.seq for p in report.problems if p.seq is not None}
    accounts = {p.account for p in report.problems if p.account is not None}
    events = {p.event_seq for p in report.problems if p.event_seq is not None}
    return seqs, accounts, events


def kinds(report: AuditReport) -> set[str]:
    """The kinds of problem the report lists."""
    return {p.kind for p in report.problems}


# -- the same ledger on PostgreSQL --------------------------------------------------------

_TABLES_IN_ORDER = ("accounts", "account_events", "transfers", "chain_formats", "alembic_version")
#: Copied too when the source has them (revision 0007): the same W and postings; a source
#: without them leaves the destination's own (W = 0, no postings: every row in the tail).
_POSTINGS_TABLES = ("postings", "postings_upto")


def copy_to_postgres(source: Path, url: str) -> None:
    """Write the rows of the SQLite ledger `source` (same values, same hashes) into the empty
    PostgreSQL database at `url`, migrated to head first (its own rows then replaced)."""
    import psycopg
    from sqlalchemy import create_engine, text

    from bank.ledger.migrate import upgrade_to_head

    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    try:
        present = {name for (name,) in src.execute("SELECT name FROM sqlite_master")}
    finally:
        src.close()
    tables = _TABLES_IN_ORDER + tuple(t for t in _POSTINGS_TABLES if t in present)
    engine = create_engine(url)
    try:
        upgrade_to_head(engine)
        with engine.begin() as conn:
            for table in reversed(tables):
                conn.execute(text(f"DELETE FROM {table}"))
    finally:
        engine.dispose()
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    info = url.replace("postgresql+psycopg://", "postgresql://")
    try:
        with psycopg.connect(info) as dst, dst.cursor() as cur:
            for table in tables:
                columns = [row[1] for row in src.execute(f"PRAGMA table_info({table})")]
                names = ", ".join(columns)
                with cur.copy(f"COPY {table} ({names}) FROM STDIN") as copy:
                    for row in src.execute(f"SELECT {names} FROM {table}"):
                        copy.write_row(row)
    finally:
        src.close()
