"""The SQL views shipped for auditors (schema revision 0002), as the audit expects them.

Migration 0002 carries its own frozen copy of this text; a test keeps the two equal.
The audit does not read this module: it compares every stored view (like every
other object) with what the migrations themselves create up to the ledger's
revision (`bank.ledger.schema_ref`), because an auditor running plain `sqlite3`
trusts these views and a redefined view could hide a mismatch.
"""

from __future__ import annotations

import re
from typing import Final


def normalize_sql(sql: str) -> str:
    """Whitespace- and case-insensitive form of a statement, for comparing definitions."""
    return re.sub(r"\s+", " ", sql).strip().rstrip(";").strip().lower()


#: The documented views, in creation order (`account_flows` first: the others read it).
AUDIT_VIEWS: Final[dict[str, str]] = {
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
