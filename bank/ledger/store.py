"""Reads of the ledger that the engine and the CLI share (never on the hot write path)."""

from __future__ import annotations

from collections.abc import Iterator

from sqlalchemy import Connection, or_, select

from bank.ledger.chain import GENESIS
from bank.ledger.models import account_events, accounts, transfers
from bank.records import AccountInfo, Receipt

_RECEIPT_COLUMNS = (
    transfers.c.seq,
    transfers.c.kind,
    transfers.c.key,
    transfers.c.amount,
    transfers.c.debit_account_id,
    transfers.c.credit_account_id,
    transfers.c.ts_us,
    transfers.c.hash,
    transfers.c.hold_seq,  # revision 0006
    transfers.c.expires_us,
    transfers.c.link_first,
    transfers.c.link_count,
)


def load_accounts(conn: Connection) -> list[AccountInfo]:
    """Every account, `@cash` included, ordered by id."""
    rows = conn.execute(
        select(
            accounts.c.id, accounts.c.name, accounts.c.overdraft_limit, accounts.c.balance
        ).order_by(accounts.c.id)
    )
    return [AccountInfo(*row) for row in rows]


def chain_heads(conn: Connection) -> tuple[int, str, int, str]:
    """(last transfer seq, its hash, last account event seq, its hash); GENESIS when empty."""
    t = conn.execute(
        select(transfers.c.seq, transfers.c.hash).order_by(transfers.c.seq.desc()).limit(1)
    ).first()
    e = conn.execute(
        select(account_events.c.seq, account_events.c.hash)
        .order_by(account_events.c.seq.desc())
        .limit(1)
    ).first()
    return (
        t.seq if t else 0,
        t.hash if t else GENESIS,
        e.seq if e else 0,
        e.hash if e else GENESIS,
    )


def find_receipts(conn: Connection, keys: list[str]) -> dict[str, Receipt]:
    """The committed receipts of those `keys` that are in the ledger (one query)."""
    if not keys:
        return {}
    rows = conn.execute(select(*_RECEIPT_COLUMNS).where(transfers.c.key.in_(keys)))
    return {row.key: Receipt(*row) for row in rows}


def history(conn: Connection, account_id: int, *, limit: int | None = None) -> Iterator[Receipt]:
    """One account's transfers, oldest first."""
    stmt = (
        select(*_RECEIPT_COLUMNS)
        .where(
            or_(
                transfers.c.debit_account_id == account_id,
                transfers.c.credit_account_id == account_id,
            )
        )
        .order_by(transfers.c.seq)
    )
    if limit is not None:
        stmt = stmt.limit(limit)
    for row in conn.execute(stmt):
        yield Receipt(*row)
