"""Typed SQLAlchemy models of the ledger schema (the migrations are the source of truth;
CI's `alembic check` keeps these in step with them).

On SQLite every table is STRICT (revision 0003): a column holds only values of its
type, so no edit can store a text where the chain encodes an integer. STRICT allows
only the type names INTEGER and TEXT, hence the SQLite variants below; other
backends get the plain types (BIGINT, VARCHAR(n)) and no SQLite option. Every id,
seq and account reference is 64-bit on both (PostgreSQL since revision 0004).
"""

from __future__ import annotations

from typing import Annotated, Any, Final, cast

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from bank.limits import KEY_LENGTH_MAX, NAME_LENGTH_MAX

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: Signed 64-bit integers: INTEGER on SQLite (STRICT knows no BIGINT), BIGINT elsewhere.
BIGINT = BigInteger().with_variant(Integer(), "sqlite")


def text_type(length: int) -> String:
    """VARCHAR(length), or TEXT on SQLite (STRICT knows no VARCHAR; the audit checks lengths)."""
    return String(length).with_variant(Text(), "sqlite")


#: Options of every ledger table: STRICT on SQLite (revision 0003), nothing elsewhere.
TABLE_OPTIONS: Final[dict[str, Any]] = {"sqlite_strict": True}

Int64 = Annotated[int, mapped_column(BIGINT)]
AccountRef = Annotated[int, mapped_column(BIGINT, ForeignKey("accounts.id"))]
Hash = Annotated[str, mapped_column(text_type(64))]

TRANSFER_KINDS = ("deposit", "withdrawal", "transfer", "hold", "post", "void", "expire")
#: The kinds that settle a hold (their `hold_seq` names it).
SETTLE_KINDS = ("post", "void", "expire")
ACCOUNT_EVENT_KINDS = ("open", "limit", "close")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class AccountRow(Base):
    """One account; `balance` is as of the last committed transfer."""

    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(BIGINT, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(text_type(NAME_LENGTH_MAX), unique=True)
    overdraft_limit: Mapped[Int64]
    balance: Mapped[Int64]

    __table_args__ = (
        CheckConstraint("overdraft_limit >= 0", name="overdraft_limit_non_negative"),
        TABLE_OPTIONS,
    )


class TransferRow(Base):
    """One accepted operation: `amount` moves from the debit to the credit account.

    `debit_balance` and `credit_balance` (revision 0005) are the two accounts' balances
    right after the row: a balance as of any seq is one look-up of the account's last
    row at or before it (`postings`, revision 0007), never a scan. The chain hash does not cover them; the
    audit checks every one by replay.
    """

    __tablename__ = "transfers"

    seq: Mapped[int] = mapped_column(BIGINT, primary_key=True, autoincrement=False)
    key: Mapped[str | None] = mapped_column(text_type(KEY_LENGTH_MAX))
    kind: Mapped[str] = mapped_column(text_type(16))
    debit_account_id: Mapped[AccountRef]
    credit_account_id: Mapped[AccountRef]
    amount: Mapped[Int64]
    ts_us: Mapped[Int64]
    hash: Mapped[Hash]
    debit_balance: Mapped[Int64]
    credit_balance: Mapped[Int64]
    # Revision 0006: a post's, void's or expire's hold; a hold's deadline (the clock of
    # `ts_us`, NULL: never); the first seq and size of the row's atomic group.
    hold_seq: Mapped[int | None] = mapped_column(BIGINT)
    expires_us: Mapped[int | None] = mapped_column(BIGINT)
    link_first: Mapped[int | None] = mapped_column(BIGINT)
    link_count: Mapped[int | None] = mapped_column(BIGINT)

    __table_args__ = (
        # A hold is settled at most once (revision 0006), by the schema too.
        Index(
            "uq_transfers_hold_seq",
            "hold_seq",
            unique=True,
            sqlite_where=text("hold_seq IS NOT NULL"),
            postgresql_where=text("hold_seq IS NOT NULL"),
        ),
        # The hold rows, to find the pending ones at open without a scan (0006).
        Index(
            "ix_transfers_holds",
            "seq",
            sqlite_where=text("kind = 'hold'"),
            postgresql_where=text("kind = 'hold'"),
        ),
        # Partial: rows without a key (most of them) cost no index maintenance.
        Index(
            "uq_transfers_key",
            "key",
            unique=True,
            sqlite_where=text("key IS NOT NULL"),
            postgresql_where=text("key IS NOT NULL"),
        ),
        # (An account's rows in seq order are in `postings` since revision 0007: revision
        # 0005's two (account, seq) indexes cost every commit a random page per account.)
        CheckConstraint("amount > 0", name="amount_positive"),
        CheckConstraint("debit_account_id != credit_account_id", name="accounts_differ"),
        CheckConstraint(
            "kind IN ('deposit', 'withdrawal', 'transfer', 'hold', 'post', 'void', 'expire')",
            name="kind_known",
        ),
        TABLE_OPTIONS,
    )


class AccountEventRow(Base):
    """A chained change to an account: its opening, a new overdraft limit, or its closing
    ('close', revision 0005: nothing touches the account after it).

    `transfer_seq` is the last transfer committed before the event, so the audit
    replays each limit from the moment it took effect.
    """

    __tablename__ = "account_events"

    seq: Mapped[int] = mapped_column(BIGINT, primary_key=True, autoincrement=False)
    account_id: Mapped[AccountRef]
    kind: Mapped[str] = mapped_column(text_type(16))
    name: Mapped[str] = mapped_column(text_type(NAME_LENGTH_MAX))
    overdraft_limit: Mapped[Int64]
    transfer_seq: Mapped[Int64]
    ts_us: Mapped[Int64]
    hash: Mapped[Hash]

    __table_args__ = (
        CheckConstraint("kind IN ('open', 'limit', 'close')", name="kind_known"),
        TABLE_OPTIONS,
    )


class ChainFormatRow(Base):
    """From which seq on a chain's rows use a hash format version (see `bank.ledger.chain`).

    Written by migration 0003 (version 1 for the rows that existed, 2 after them);
    the engine never writes it. Moving a boundary breaks the hashes it moves over.
    """

    __tablename__ = "chain_formats"

    chain: Mapped[str] = mapped_column(text_type(16))
    first_seq: Mapped[Int64]
    version: Mapped[Int64]

    __table_args__ = (
        PrimaryKeyConstraint("chain", "first_seq"),
        CheckConstraint("chain IN ('transfers', 'account_events')", name="chain_known"),
        CheckConstraint("first_seq >= 1", name="first_seq_positive"),
        CheckConstraint("version IN (1, 2, 3)", name="version_known"),
        TABLE_OPTIONS,
    )


class PostingRow(Base):
    """One side of a transfer at or below the watermark: the account it names, and its seq
    (revision 0007). Two per transfer row; the primary key is an account's rows in seq
    order, so a history page or a balance as of a seq is one range of it.

    Derived from `transfers`, written in sorted runs by the batch writers
    (`bank.ledger.postings`): no foreign keys (the audit checks that the two agree).
    WITHOUT ROWID on SQLite: the key is the row, stored once.
    """

    __tablename__ = "postings"

    account_id: Mapped[int] = mapped_column(BIGINT, primary_key=True, autoincrement=False)
    seq: Mapped[int] = mapped_column(BIGINT, primary_key=True, autoincrement=False)

    __table_args__ = ({"sqlite_strict": True, "sqlite_with_rowid": False},)


class PostingsUptoRow(Base):
    """The watermark W, one row (id 1; revision 0007): every transfer with seq <= W has
    its two postings, none above W has any."""

    __tablename__ = "postings_upto"

    id: Mapped[int] = mapped_column(BIGINT, primary_key=True, autoincrement=False)
    seq: Mapped[Int64]

    __table_args__ = (
        CheckConstraint("id = 1", name="single_row"),
        CheckConstraint("seq >= 0", name="seq_non_negative"),
        TABLE_OPTIONS,
    )


accounts = cast(Table, AccountRow.__table__)
transfers = cast(Table, TransferRow.__table__)
account_events = cast(Table, AccountEventRow.__table__)
chain_formats = cast(Table, ChainFormatRow.__table__)
postings = cast(Table, PostingRow.__table__)
postings_upto = cast(Table, PostingsUptoRow.__table__)
