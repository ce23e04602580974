"""Reads of the ledger that the engine and the CLI share (never on the hot write path)."""

from __future__ import annotations

from collections.abc import Iterator

from sqlalchemy import Connection, Select, or_, select, union_all

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


def _side_page(
    account_id: int, after_seq: int, limit: int, *, debit: bool, descending: bool
) -> Select[tuple[int]]:
    """The first `limit` rows past the cursor with the account on one side (an index range)."""
    column = transfers.c.debit_account_id if debit else transfers.c.credit_account_id
    stmt = select(*_RECEIPT_COLUMNS).where(column == account_id)
    if descending:
        if after_seq:
            stmt = stmt.where(transfers.c.seq < after_seq)
        return stmt.order_by(transfers.c.seq.desc()).limit(limit)
    return stmt.where(transfers.c.seq > after_seq).order_by(transfers.c.seq).limit(limit)


def history_page(
    conn: Connection, account_id: int, after_seq: int, limit: int, *, descending: bool = False
) -> list[Receipt]:
    """Up to `limit` of the account's committed transfers past the cursor `after_seq`: seq
    greater than it, ascending; or with `descending`, newest first, seq less than it (0: from
    the newest). Pass the last one's seq for the next page (rows are never changed or
    inserted below the head, so pages never skip or repeat a row)."""
    debits = _side_page(account_id, after_seq, limit, debit=True, descending=descending)
    credits = _side_page(account_id, after_seq, limit, debit=False, descending=descending)
    both = union_all(select(debits.subquery()), select(credits.subquery())).subquery()
    order = both.c.seq.desc() if descending else both.c.seq
    stmt = select(*both.c).order_by(order).limit(limit)
    return [Receipt(*row) for row in conn.execute(stmt)]
