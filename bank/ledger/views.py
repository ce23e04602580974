"""The SQL views shipped for auditors (schema revisions 0002 and 0003), documented in one place.

Migrations 0002 and 0003 each carry their own frozen copy of this text, and
`tests/test_audit.py` keeps the three equal. Nothing in the package reads this module:
the audit compares every stored view (like every other object) with what the
migrations themselves create up to the ledger's revision (`bank.ledger.schema_ref`),
because an auditor running plain `sqlite3` trusts these views and a redefined view
could hide a mismatch.
"""

from __future__ import annotations

import re
from typing import Final


def normalize_sql(sql: str) -> str:
    """Whitespace- and case-insensitive form of a statement, for comparing definitions."""
    return re.sub(r"\s+", " ", sql).strip().rstrip(";").strip().lower()


#: The documented views at the head revision (0003), in creation order (`account_flows`
#: first: `balance_mismatches` reads it). No intermediate value can overflow 64 bits.
#: `account_flows` sums each amount as three base-10^5 digits (amount = d0 + d1 * 10^5 +
#: d2 * 10^10, every digit at most 10^5 since an amount is at most 10^15): a digit sum stays
#: below 2^63 for more rows than an SQLite file can hold (2^44), where SUM(amount) itself
#: overflowed after 9,224 amounts of 10^15. The carries are then propagated, so that
#:   credits_exact, debits_exact  are the exact totals as decimal text (they may pass 2^63);
#:   credits, debits              are the same totals as integers, exact below 2^63 (beyond,
#:                                SQLite's arithmetic turns them into an approximate REAL);
#:   recomputed_balance           (credits - debits) is an exact integer whenever it fits in
#:                                64 bits, which it does on every ledger the engine writes;
#:   difference                   (stored_balance - recomputed_balance) is exact whenever it
#:                                fits in 64 bits (a REAL beyond: an edit by more than 2^63).
#: `balance_mismatches` compares stored and recomputed balances exactly. `ledger_totals`
#: sums the balances as four 16-bit parts (balance_sum: exact whenever it fits in 64 bits).
AUDIT_VIEWS: Final[dict[str, str]] = {
    "account_flows": """
CREATE VIEW account_flows AS
WITH
c AS (
    SELECT credit_account_id AS account_id, COUNT(*) AS n,
        SUM(amount % 100000) AS s0,
        SUM(amount / 100000 % 100000) AS s1,
        SUM(amount / 10000000000) AS s2
    FROM transfers GROUP BY credit_account_id
),
d AS (
    SELECT debit_account_id AS account_id, COUNT(*) AS n,
        SUM(amount % 100000) AS s0,
        SUM(amount / 100000 % 100000) AS s1,
        SUM(amount / 10000000000) AS s2
    FROM transfers GROUP BY debit_account_id
),
sums AS (
    SELECT a.id AS account_id, a.name AS name, a.overdraft_limit AS overdraft_limit,
        a.balance AS balance, COALESCE(c.n, 0) + COALESCE(d.n, 0) AS transfers,
        COALESCE(c.s0, 0) AS c0, COALESCE(c.s1, 0) + COALESCE(c.s0, 0) / 100000 AS c1,
        COALESCE(c.s2, 0) AS c2,
        COALESCE(d.s0, 0) AS d0, COALESCE(d.s1, 0) + COALESCE(d.s0, 0) / 100000 AS d1,
        COALESCE(d.s2, 0) AS d2
    FROM accounts AS a
    LEFT JOIN c ON c.account_id = a.id
    LEFT JOIN d ON d.account_id = a.id
),
digits AS (
    SELECT account_id, name, overdraft_limit, balance, transfers,
        c2 + c1 / 100000 AS c2, c1 % 100000 AS c1, c0 % 100000 AS c0,
        d2 + d1 / 100000 AS d2, d1 % 100000 AS d1, d0 % 100000 AS d0
    FROM sums
),
net AS (
    SELECT *, c2 - d2 AS t, (c1 - d1) * 100000 + (c0 - d0) AS m FROM digits
),
flows AS (
    SELECT *,
        CASE
            WHEN t > 0 AND m < 0 THEN (t - 1) * 10000000000 + (m + 10000000000)
            WHEN t < 0 AND m > 0 THEN (t + 1) * 10000000000 + (m - 10000000000)
            ELSE t * 10000000000 + m
        END AS recomputed
    FROM net
)
SELECT
    account_id,
    name,
    overdraft_limit,
    transfers,
    c2 * 10000000000 + (c1 * 100000 + c0) AS credits,
    d2 * 10000000000 + (d1 * 100000 + d0) AS debits,
    recomputed AS recomputed_balance,
    balance AS stored_balance,
    balance - recomputed AS difference,
    CASE
        WHEN c2 > 0 THEN c2 || printf('%05d%05d', c1, c0)
        WHEN c1 > 0 THEN c1 || printf('%05d', c0)
        ELSE CAST(c0 AS TEXT)
    END AS credits_exact,
    CASE
        WHEN d2 > 0 THEN d2 || printf('%05d%05d', d1, d0)
        WHEN d1 > 0 THEN d1 || printf('%05d', d0)
        ELSE CAST(d0 AS TEXT)
    END AS debits_exact
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
WITH
parts AS (
    SELECT
        COALESCE(SUM(balance & 65535), 0) AS s0,
        COALESCE(SUM((balance >> 16) & 65535), 0) AS s1,
        COALESCE(SUM((balance >> 32) & 65535), 0) AS s2,
        COALESCE(SUM(balance >> 48), 0) AS s3
    FROM accounts
),
carry1 AS (SELECT s0 & 65535 AS r0, s1 + (s0 >> 16) AS u1, s2, s3 FROM parts),
carry2 AS (SELECT r0, u1 & 65535 AS r1, s2 + (u1 >> 16) AS u2, s3 FROM carry1),
total AS (
    SELECT s3 + (u2 >> 16) AS t, (u2 & 65535) * 4294967296 + r1 * 65536 + r0 AS m FROM carry2
)
SELECT
    (SELECT COUNT(*) FROM accounts) AS accounts,
    (SELECT t * 281474976710656 + m FROM total) AS balance_sum,
    (SELECT COUNT(*) FROM transfers) AS transfers,
    (SELECT COALESCE(MAX(seq), 0) FROM transfers) AS last_seq,
    (SELECT COALESCE(MAX(seq), 0) FROM transfers) - (SELECT COUNT(*) FROM transfers) AS missing_seqs,
    (SELECT hash FROM transfers ORDER BY seq DESC LIMIT 1) AS head_hash,
    (SELECT COUNT(*) FROM account_events) AS account_events,
    (SELECT hash FROM account_events ORDER BY seq DESC LIMIT 1) AS accounts_head_hash
""",
}
#: The views of revision 0002 (frozen in its migration), which overflow on large flows.
AUDIT_VIEWS_0002: Final[dict[str, str]] = {
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
#: The views each revision ships (0001 ships none), for the audit's comparison.
AUDIT_VIEWS_BY_REVISION: Final[dict[str, dict[str, str]]] = {
    "0001": {},
    "0002": AUDIT_VIEWS_0002,
    "0003": AUDIT_VIEWS,
}
