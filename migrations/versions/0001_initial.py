"""The ledger: accounts, hash-chained transfers and account events, and `@cash`.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from bank.ledger.chain import GENESIS, account_event_hash_v1

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CASH_ID = 0
CASH_NAME = "@cash"
CASH_LIMIT = 2**63 - 1  # @cash may go as negative as signed 64 bits allow


def upgrade() -> None:
    accounts = op.create_table(
        "accounts",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("overdraft_limit", sa.BigInteger(), nullable=False),
        sa.Column("balance", sa.BigInteger(), nullable=False),
        sa.CheckConstraint(
            "overdraft_limit >= 0", name=op.f("ck_accounts_overdraft_limit_non_negative")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_accounts")),
        sa.UniqueConstraint("name", name=op.f("uq_accounts_name")),
    )
    op.create_table(
        "transfers",
        sa.Column("seq", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("key", sa.String(128), nullable=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("debit_account_id", sa.Integer(), nullable=False),
        sa.Column("credit_account_id", sa.Integer(), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("ts_us", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.CheckConstraint("amount > 0", name=op.f("ck_transfers_amount_positive")),
        sa.CheckConstraint(
            "debit_account_id != credit_account_id", name=op.f("ck_transfers_accounts_differ")
        ),
        sa.CheckConstraint(
            "kind IN ('deposit', 'withdrawal', 'transfer')", name=op.f("ck_transfers_kind_known")
        ),
        sa.ForeignKeyConstraint(
            ["debit_account_id"],
            ["accounts.id"],
            name=op.f("fk_transfers_debit_account_id_accounts"),
        ),
        sa.ForeignKeyConstraint(
            ["credit_account_id"],
            ["accounts.id"],
            name=op.f("fk_transfers_credit_account_id_accounts"),
        ),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_transfers")),
    )
    op.create_index(
        "uq_transfers_key",
        "transfers",
        ["key"],
        unique=True,
        sqlite_where=sa.text("key IS NOT NULL"),
    )
    account_events = op.create_table(
        "account_events",
        sa.Column("seq", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("overdraft_limit", sa.BigInteger(), nullable=False),
        sa.Column("transfer_seq", sa.BigInteger(), nullable=False),
        sa.Column("ts_us", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.CheckConstraint("kind IN ('open', 'limit')", name=op.f("ck_account_events_kind_known")),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_account_events_account_id_accounts")
        ),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_account_events")),
    )
    # The system account and its chained opening event, at the start of time.
    op.bulk_insert(
        accounts, [{"id": CASH_ID, "name": CASH_NAME, "overdraft_limit": CASH_LIMIT, "balance": 0}]
    )
    op.bulk_insert(
        account_events,
        [
            {
                "seq": 1,
                "account_id": CASH_ID,
                "kind": "open",
                "name": CASH_NAME,
                "overdraft_limit": CASH_LIMIT,
                "transfer_seq": 0,
                "ts_us": 0,
                "hash": account_event_hash_v1(
                    GENESIS, 1, CASH_ID, "open", CASH_LIMIT, 0, 0, CASH_NAME
                ),
            }
        ],
    )


def downgrade() -> None:
    op.drop_table("account_events")
    op.drop_index("uq_transfers_key", table_name="transfers")
    op.drop_table("transfers")
    op.drop_table("accounts")
