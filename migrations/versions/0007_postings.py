"""Postings: each account's rows in seq order, written in sorted runs, not per commit.

- `postings (account_id, seq)`, primary key `pk_postings` on both columns (SQLite:
  `WITHOUT ROWID, STRICT`): two rows per transfer at or below the watermark, its
  debit account's and its credit account's. Derived data, so no foreign keys (the
  audit checks that it agrees with `transfers`).
- `postings_upto (id, seq)`: one row (id 1), the watermark W. Every transfer with
  seq <= W has its two postings, none above W has any. The batch writers add the
  rows above W as ONE sorted `INSERT ... SELECT` once `POSTINGS_RUN_ROWS` of them
  have accumulated, in the same transaction as the batch that moves W
  (`bank.ledger.postings`).
- The two account indexes of revision 0005 (`ix_transfers_debit_account_id_seq`,
  `ix_transfers_credit_account_id_seq`) are dropped: each commit dirtied the last
  leaf page of every touched account in both (SQLite's pipelined transfers/s: -45%).
  Readers take an account's rows up to W from `postings` and the few above W (the
  tail) from a range of `transfers` by seq.

The upgrade backfills postings from every existing row and sets W to the head;
the downgrade recreates the two indexes and drops both tables (postings are
derived from the rows, so nothing is lost and nothing is refused). No hash or
view changes; no table is rebuilt.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: Revision 0005's indexes (frozen here: name -> columns), dropped and, on downgrade, recreated.
ACCOUNT_INDEXES: dict[str, list[str]] = {
    "ix_transfers_debit_account_id_seq": ["debit_account_id", "seq"],
    "ix_transfers_credit_account_id_seq": ["credit_account_id", "seq"],
}

#: Every row's two postings in the primary key's order (one sorted run: each leaf page of
#: the index is written once). Frozen with this revision, not imported from the engine.
BACKFILL_SQL = """
INSERT INTO postings (account_id, seq)
SELECT account_id, seq FROM (
    SELECT debit_account_id AS account_id, seq FROM transfers
    UNION ALL
    SELECT credit_account_id AS account_id, seq FROM transfers
) AS sides
ORDER BY account_id, seq
"""


def _views_of(module_file: str) -> dict[str, str]:
    """The views an earlier revision froze, from its own module (its text, not today's)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).with_name(module_file)
    spec = importlib.util.spec_from_file_location(f"bank_migration_{module_file[:4]}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    views: dict[str, str] = module.VIEWS
    return views


#: The views a SQLite ledger has at this revision: 0006's, unchanged (none reads an index
#: this revision drops: `open_holds` finds settlements through `uq_transfers_hold_seq`).
VIEWS: dict[str, str] = _views_of("0006_holds_groups_chain_v3.py")


def _int64() -> sa.types.TypeEngine[int]:
    """BIGINT, or INTEGER on SQLite (STRICT knows no BIGINT)."""
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "postings",
        sa.Column("account_id", _int64(), autoincrement=False, nullable=False),
        sa.Column("seq", _int64(), autoincrement=False, nullable=False),
        sa.PrimaryKeyConstraint("account_id", "seq", name=op.f("pk_postings")),
        sqlite_with_rowid=False,
        sqlite_strict=True,
    )
    op.create_table(
        "postings_upto",
        sa.Column("id", _int64(), autoincrement=False, nullable=False),
        sa.Column("seq", _int64(), nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_postings_upto_single_row")),
        sa.CheckConstraint("seq >= 0", name=op.f("ck_postings_upto_seq_non_negative")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_postings_upto")),
        sqlite_strict=True,
    )
    for name in ACCOUNT_INDEXES:
        op.drop_index(name, table_name="transfers")
    op.execute(BACKFILL_SQL.strip())
    op.execute("INSERT INTO postings_upto (id, seq) SELECT 1, COALESCE(MAX(seq), 0) FROM transfers")


def downgrade() -> None:
    for name, columns in ACCOUNT_INDEXES.items():
        op.create_index(name, "transfers", columns)
    op.drop_table("postings_upto")
    op.drop_table("postings")
