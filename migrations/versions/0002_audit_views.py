"""Audit views: balances recomputed from `transfers`, next to the stored ones.

An auditor with only `sqlite3` can run `SELECT * FROM balance_mismatches;` (no
rows on a sound ledger). `bank audit` checks that these views still have exactly
the text this migration creates, since a redefined view could hide a mismatch. The
text is frozen here: a change of the views ships as a new revision.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen with this revision: the audit compares a ledger's views with what the
# migrations create (bank.ledger.schema_ref), so a change of the views is a new revision. Creation order matters: account_flows first.
VIEWS: dict[str, str] = {
    "account_flows": """
CREATE VIEW account_flows AS
SELECT
    a.id AS account_id,
    a.name AS name,
    a.overdraft_limit AS overdraft_limit,
    COALESCE(c.n, 0) + COALESCE(d.n, 0) AS transfers,
    COALESCE(c.total, 0) AS credits,
    COALESCE(d.total, 0) AS debits,
    COALESCE(c.total, 0) - COALESCE(d.total, 0) AS recomputed_balance,
    a.balance AS stored_balance,
    a.balance - (COALESCE(c.total, 0) - COALESCE(d.total, 0)) AS difference
FROM accounts AS a
LEFT JOIN (
    SELECT credit_account_id AS account_id, SUM(amount) AS total, COUNT(*) AS n
    FROM transfers GROUP BY credit_account_id
) AS c ON c.account_id = a.id
LEFT JOIN (
    SELECT debit_account_id AS account_id, SUM(amount) AS total, COUNT(*) AS n
    FROM transfers GROUP BY debit_account_id
) AS d ON d.account_id = a.id
""",
    "balance_mismatches": """
CREATE VIEW balance_mismatches AS
SELECT account_id, name, recomputed_balance, stored_balance, difference
FROM account_flows
WHERE difference != 0
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


def upgrade() -> None:
    for sql in VIEWS.values():
        op.execute(sql.strip())


def downgrade() -> None:
    for name in reversed(VIEWS):
        op.execute(f"DROP VIEW IF EXISTS {name}")
