"""Reads of the ledger for holds and groups (never on the hot write path): the pending
holds at recovery, why a hold is not pending, and a committed group's receipts."""

from __future__ import annotations

from typing import NamedTuple

from sqlalchemy import Connection, and_, exists, select

from bank.ledger.models import transfers
from bank.records import Receipt

_t = transfers.c
#: A `Receipt` as selected from `transfers` (its fields' columns, in order).
RECEIPT_COLUMNS = (
    _t.seq,
    _t.kind,
    _t.key,
    _t.amount,
    _t.debit_account_id,
    _t.credit_account_id,
    _t.ts_us,
    _t.hash,
    _t.hold_seq,
    _t.expires_us,
    _t.link_first,
    _t.link_count,
)


class StoredHold(NamedTuple):
    """A hold row with no post, void or expire: pending."""

    seq: int
    source: int
    target: int
    amount: int
    expires_us: int | None


class HoldStatus(NamedTuple):
    """What the ledger says about seq `seq`: its kind (None: no row), and the row that
    settled it if it is a hold (None: not settled)."""

    kind: str | None
    settled_kind: str | None
    settled_seq: int | None


def pending_holds(conn: Connection) -> list[StoredHold]:
    """Every hold no row settles, by seq (through the partial index on hold rows and the
    unique index on `hold_seq`)."""
    settle = transfers.alias("settle")
    rows = conn.execute(
        select(_t.seq, _t.debit_account_id, _t.credit_account_id, _t.amount, _t.expires_us)
        .where(
            and_(
                _t.kind == "hold",
                ~exists().where(settle.c.hold_seq == _t.seq),
            )
        )
        .order_by(_t.seq)
    )
    return [StoredHold(*row) for row in rows]


def hold_status(conn: Connection, seq: int) -> HoldStatus:
    """The kind of row `seq` and, for a hold, the row that settled it."""
    kind = conn.execute(select(_t.kind).where(_t.seq == seq)).scalar()
    if kind != "hold":
        return HoldStatus(kind, None, None)
    row = conn.execute(select(_t.kind, _t.seq).where(_t.hold_seq == seq)).first()
    return HoldStatus(kind, None if row is None else row[0], None if row is None else row[1])


def group_receipts(conn: Connection, first: int, count: int) -> list[Receipt]:
    """The receipts of the rows `first .. first + count - 1`, by seq."""
    rows = conn.execute(
        select(*RECEIPT_COLUMNS)
        .where(and_(_t.seq >= first, _t.seq < first + count))
        .order_by(_t.seq)
    )
    return [Receipt(*row) for row in rows]


def last_ts_us(conn: Connection) -> int:
    """The last row's timestamp (0: none): the sequencer never stamps earlier."""
    value = conn.execute(select(_t.ts_us).order_by(_t.seq.desc()).limit(1)).scalar()
    return 0 if value is None else int(value)
