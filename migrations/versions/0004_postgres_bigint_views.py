"""PostgreSQL ledgers: 64-bit ids and seqs, the partial key index, and exact views.

The contract promises signed 64-bit account ids and seqs; revision 0001's
`sa.Integer` is 32-bit on PostgreSQL, so every id, seq and account reference
becomes BIGINT there. The key index becomes partial (`WHERE key IS NOT NULL`, as it
has always been on SQLite): rows without a key cost no index maintenance. The views
get PostgreSQL's own text: `SUM(bigint)` is an exact `numeric`, so flows and the
balance sum are plain sums, exact at any size, and `credits_exact`/`debits_exact`
are their decimal text, the same columns as SQLite's (revision 0003).

On SQLite this revision changes nothing: INTEGER is already 64 bits, the index is
already partial and the views of 0003 are already exact. A SQLite ledger at 0003
is only stamped 0004; no row and no hash is touched on either backend.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from bank.errors import SchemaDowngradeRefused

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: The columns revision 0001 made `sa.Integer` (32-bit on PostgreSQL), by table.
ID_COLUMNS: dict[str, tuple[str, ...]] = {
    "accounts": ("id",),
    "transfers": ("seq", "debit_account_id", "credit_account_id"),
    "account_events": ("seq", "account_id"),
}
INT32_MAX = 2**31 - 1

# Frozen with this revision (PostgreSQL's views; the audit compares a ledger's views with
# what the migrations create). Column names and order are those of revision 0003's views.
VIEWS: dict[str, str] = {
    "account_flows": """
CREATE VIEW account_flows AS
WITH
c AS (
    SELECT credit_account_id AS account_id, COUNT(*) AS n, SUM(amount) AS total
    FROM transfers GROUP BY credit_account_id
),
d AS (
    SELECT debit_account_id AS account_id, COUNT(*) AS n, SUM(amount) AS total
    FROM transfers GROUP BY debit_account_id
),
flows AS (
    SELECT a.id AS account_id, a.name AS name, a.overdraft_limit AS overdraft_limit,
        a.balance AS balance, COALESCE(c.n, 0) + COALESCE(d.n, 0) AS transfers,
        COALESCE(c.total, 0) AS credits, COALESCE(d.total, 0) AS debits
    FROM accounts AS a
    LEFT JOIN c ON c.account_id = a.id
    LEFT JOIN d ON d.account_id = a.id
)
SELECT
    account_id,
    name,
    overdraft_limit,
    transfers,
    credits,
    debits,
    credits - debits AS recomputed_balance,
    balance AS stored_balance,
    balance - (credits - debits) AS difference,
    CAST(credits AS TEXT) AS credits_exact,
    CAST(debits AS TEXT) AS debits_exact
FROM flows
""",
    "balance_mismatches": """
CREATE VIEW balance_mismatches AS
SELECT account_id, name, recomputed_balance, stored_balance, difference
FROM account_flows
WHERE stored_balance != recomputed_balance
""",
    "account_field_mismatches": """
CREATE VIEW account_field_mismatches AS
SELECT
    a.id AS account_id,
    a.name AS name,
    e.name AS event_name,
    a.overdraft_limit AS overdraft_limit,
    e.overdraft_limit AS event_overdraft_limit,
    e.seq AS event_seq
FROM accounts AS a
LEFT JOIN account_events AS e
    ON e.seq = (SELECT MAX(seq) FROM account_events WHERE account_id = a.id)
WHERE e.seq IS NULL OR a.name != e.name OR a.overdraft_limit != e.overdraft_limit
""",
    "ledger_totals": """
CREATE VIEW ledger_totals AS
SELECT
    (SELECT COUNT(*) FROM accounts) AS accounts,
    (SELECT COALESCE(SUM(balance), 0) FROM accounts) AS balance_sum,
    (SELECT COUNT(*) FROM transfers) AS transfers,
    (SELECT COALESCE(MAX(seq), 0) FROM transfers) AS last_seq,
    (SELECT COALESCE(MAX(seq), 0) FROM transfers) - (SELECT COUNT(*) FROM transfers) AS missing_seqs,
    (SELECT hash FROM transfers ORDER BY seq DESC LIMIT 1) AS head_hash,
    (SELECT COUNT(*) FROM account_events) AS account_events,
    (SELECT hash FROM account_events ORDER BY seq DESC LIMIT 1) AS accounts_head_hash
""",
}
#: The views a PostgreSQL ledger has at 0003 (those of 0002), dropped before the
#: columns they read change type.
VIEWS_0003_NAMES = (
    "account_flows",
    "balance_mismatches",
    "account_field_mismatches",
    "ledger_totals",
)


def _drop_views(names: Sequence[str]) -> None:
    for name in reversed(names):
        op.execute(f"DROP VIEW IF EXISTS {name}")


def _set_id_type(sql_type: str) -> None:
    """One ALTER TABLE per table, so PostgreSQL rewrites each table (and its indexes) once."""
    for table, columns in ID_COLUMNS.items():
        changes = ", ".join(f"ALTER COLUMN {c} TYPE {sql_type}" for c in columns)
        op.execute(f"ALTER TABLE {table} {changes}")


def _key_index(partial: bool) -> None:
    op.drop_index("uq_transfers_key", table_name="transfers")
    where = sa.text("key IS NOT NULL") if partial else None
    op.create_index("uq_transfers_key", "transfers", ["key"], unique=True, postgresql_where=where)


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        return  # already 64-bit, partial and exact (see the docstring)
    _drop_views(VIEWS_0003_NAMES)
    _set_id_type("BIGINT")
    _key_index(partial=True)
    for sql in VIEWS.values():
        op.execute(sql.strip())


def downgrade() -> None:
    """Back to 32-bit ids, only while every id and seq fits in 32 bits."""
    conn = op.get_bind()
    if conn.dialect.name == "sqlite":
        return
    for table, columns in ID_COLUMNS.items():
        for column in columns:
            over = conn.exec_driver_sql(
                f"SELECT COUNT(*) FROM {table} WHERE {column} > {INT32_MAX}"
            ).scalar()
            if over:
                raise SchemaDowngradeRefused(
                    f"{over} {table} rows hold a {column} above 2**31 - 1, which revision "
                    "0003's 32-bit columns cannot store: not downgraded"
                )
    _drop_views(list(VIEWS))
    _set_id_type("INTEGER")
    _key_index(partial=False)
    _restore_0002_views()


def _restore_0002_views() -> None:
    """Revision 0002's views (a PostgreSQL ledger's at 0003), from 0002's own module."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).with_name("0002_audit_views.py")
    spec = importlib.util.spec_from_file_location("bank_migration_0002", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for sql in module.VIEWS.values():
        op.execute(sql.strip())
