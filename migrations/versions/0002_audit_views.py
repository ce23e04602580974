"""Audit views: balances recomputed from `transfers`, next to the stored ones.

An auditor with only `sqlite3` can run `SELECT * FROM balance_mismatches;` (no
rows on a sound ledger). `bank audit` checks that these views still have exactly
this text, since a redefined view could hide a mismatch. If the views ever change,
freeze the old text here and ship the new one in a new revision.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from collections.abc import Sequence

from alembic import op

from bank.ledger.audit import AUDIT_VIEWS

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Dict order: account_flows first, the views that read it after.
    for sql in AUDIT_VIEWS.values():
        op.execute(sql.strip())


def downgrade() -> None:
    for name in reversed(AUDIT_VIEWS):
        op.execute(f"DROP VIEW IF EXISTS {name}")
