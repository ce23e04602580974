"""STRICT tables, hash format 2 for new rows, and views that cannot overflow.

Rebuilds `accounts`, `transfers` and `account_events` as SQLite STRICT tables (a
column holds only values of its type), copying every row verbatim: no hash is ever
rewritten. A ledger holding a value of the wrong type is refused, not coerced. Adds
`chain_formats`, which records from which seq each chain's rows use hash format 2
(see `bank.ledger.chain`), and redefines the audit views so that no sum overflows.
The table rebuild and the views are SQLite's; on PostgreSQL this revision only adds
`chain_formats` (revision 0004 does the rest there).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

from bank.errors import LedgerCorrupt, SchemaDowngradeRefused

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: Columns and the storage classes they may hold ("null" where NULL is allowed), in table order.
COLUMN_TYPES: dict[str, dict[str, tuple[str, ...]]] = {
    "accounts": {
        "id": ("integer",),
        "name": ("text",),
        "overdraft_limit": ("integer",),
        "balance": ("integer",),
    },
    "transfers": {
        "seq": ("integer",),
        "key": ("text", "null"),
        "kind": ("text",),
        "debit_account_id": ("integer",),
        "credit_account_id": ("integer",),
        "amount": ("integer",),
        "ts_us": ("integer",),
        "hash": ("text",),
    },
    "account_events": {
        "seq": ("integer",),
        "account_id": ("integer",),
        "kind": ("text",),
        "name": ("text",),
        "overdraft_limit": ("integer",),
        "transfer_seq": ("integer",),
        "ts_us": ("integer",),
        "hash": ("text",),
    },
}
#: Each table's key column, to name a row of the wrong type.
KEY_COLUMNS = {"accounts": "id", "transfers": "seq", "account_events": "seq"}

# Frozen with this revision: the audit compares a ledger's views with what the
# migrations create (bank.ledger.schema_ref), so a change of the views is a new revision. Creation order matters.
VIEWS: dict[str, str] = {
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
#: The views of revision 0002, restored by `downgrade` (its frozen copy, not an import:
#: a migration never changes when another file does).
VIEWS_0002_NAMES = (
    "account_flows",
    "balance_mismatches",
    "account_field_mismatches",
    "ledger_totals",
)


def _integer(strict: bool) -> Any:
    """INTEGER (STRICT) or the BIGINT of revisions 0001-0002 (SQLite: INTEGER affinity)."""
    return sa.Integer() if strict else sa.BigInteger()


def _text(length: int, strict: bool) -> Any:
    return sa.Text() if strict else sa.String(length)


def _create_tables(strict: bool) -> None:
    """The three ledger tables, with the names, checks, keys and index of revision 0001."""
    options: dict[str, Any] = {"sqlite_strict": True} if strict else {}
    op.create_table(
        "accounts",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("name", _text(64, strict), nullable=False),
        sa.Column("overdraft_limit", _integer(strict), nullable=False),
        sa.Column("balance", _integer(strict), nullable=False),
        sa.CheckConstraint(
            "overdraft_limit >= 0", name=op.f("ck_accounts_overdraft_limit_non_negative")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_accounts")),
        sa.UniqueConstraint("name", name=op.f("uq_accounts_name")),
        **options,
    )
    op.create_table(
        "transfers",
        sa.Column("seq", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("key", _text(128, strict), nullable=True),
        sa.Column("kind", _text(16, strict), nullable=False),
        sa.Column("debit_account_id", sa.Integer(), nullable=False),
        sa.Column("credit_account_id", sa.Integer(), nullable=False),
        sa.Column("amount", _integer(strict), nullable=False),
        sa.Column("ts_us", _integer(strict), nullable=False),
        sa.Column("hash", _text(64, strict), nullable=False),
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
        **options,
    )
    op.create_index(
        "uq_transfers_key",
        "transfers",
        ["key"],
        unique=True,
        sqlite_where=sa.text("key IS NOT NULL"),
    )
    op.create_table(
        "account_events",
        sa.Column("seq", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("kind", _text(16, strict), nullable=False),
        sa.Column("name", _text(64, strict), nullable=False),
        sa.Column("overdraft_limit", _integer(strict), nullable=False),
        sa.Column("transfer_seq", _integer(strict), nullable=False),
        sa.Column("ts_us", _integer(strict), nullable=False),
        sa.Column("hash", _text(64, strict), nullable=False),
        sa.CheckConstraint("kind IN ('open', 'limit')", name=op.f("ck_account_events_kind_known")),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_account_events_account_id_accounts")
        ),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_account_events")),
        **options,
    )


def _refuse_wrong_types() -> None:
    """Raise `LedgerCorrupt` if any value has the wrong storage class.

    STRICT would coerce some (the text '5' into the integer 5), which rewrites a row;
    others fail with a bare IntegrityError. Either way the ledger was edited: refuse,
    and leave it at 0002 for `bank audit` to locate the damage.
    """
    conn = op.get_bind()
    for table, columns in COLUMN_TYPES.items():
        wrong = " OR ".join(
            f"typeof({column}) NOT IN ({', '.join(repr(t) for t in allowed)})"
            for column, allowed in columns.items()
        )
        row = conn.exec_driver_sql(
            f"SELECT {KEY_COLUMNS[table]}, {', '.join(f'typeof({c})' for c in columns)} "
            f"FROM {table} WHERE {wrong} LIMIT 1"
        ).first()
        if row is not None:
            found = {c: t for c, t in zip(columns, row[1:], strict=True) if t not in columns[c]}
            column, stored = next(iter(found.items()))
            raise LedgerCorrupt(
                f"{table} row {KEY_COLUMNS[table]}={row[0]} holds a {stored} in column {column}: "
                "the ledger was edited; not upgraded (run `bank audit`)"
            )


def _rebuild(strict: bool) -> None:
    """Recreate the three tables (STRICT or not), copying every row as it is."""
    for name in reversed(VIEWS_0002_NAMES):
        op.execute(f"DROP VIEW IF EXISTS {name}")
    op.drop_index("uq_transfers_key", table_name="transfers")
    # Old tables step aside under another name (SQLite points their foreign keys at the
    # new name), so the new tables are created with their final names and texts.
    for table in ("accounts", "transfers", "account_events"):
        op.execute(f"ALTER TABLE {table} RENAME TO _old_{table}")
    _create_tables(strict)
    for table, columns in COLUMN_TYPES.items():
        listed = ", ".join(columns)
        op.execute(
            f"INSERT INTO {table} ({listed}) SELECT {listed} FROM _old_{table} "
            f"ORDER BY {KEY_COLUMNS[table]}"
        )
    # Children first: dropping a parent with foreign keys on deletes its rows first.
    for table in ("account_events", "transfers", "accounts"):
        op.execute(f"DROP TABLE _old_{table}")


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        _refuse_wrong_types()
        _rebuild(strict=True)
    chain_formats = op.create_table(
        "chain_formats",
        sa.Column("chain", sa.String(16).with_variant(sa.Text(), "sqlite"), nullable=False),
        sa.Column(
            "first_seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("version", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.CheckConstraint(
            "chain IN ('transfers', 'account_events')", name=op.f("ck_chain_formats_chain_known")
        ),
        sa.CheckConstraint("first_seq >= 1", name=op.f("ck_chain_formats_first_seq_positive")),
        sa.CheckConstraint("version IN (1, 2)", name=op.f("ck_chain_formats_version_known")),
        sa.PrimaryKeyConstraint("chain", "first_seq", name=op.f("pk_chain_formats")),
        sqlite_strict=True,
    )
    # Rows that exist keep format 1 (their hashes are never rewritten); format 2 starts
    # one past the last row. A new ledger has no transfers yet and only the @cash event.
    formats: list[dict[str, object]] = []
    for chain in ("transfers", "account_events"):
        last = op.get_bind().exec_driver_sql(f"SELECT COALESCE(MAX(seq), 0) FROM {chain}").scalar()
        assert isinstance(last, int)
        if last > 0:
            formats.append({"chain": chain, "first_seq": 1, "version": 1})
        formats.append({"chain": chain, "first_seq": last + 1, "version": 2})
    op.bulk_insert(chain_formats, formats)
    if op.get_bind().dialect.name == "sqlite":
        # SQLite-only text (printf, INTEGER overflow); other backends keep 0002's views
        # until revision 0004 gives them their own exact ones.
        for sql in VIEWS.values():
            op.execute(sql.strip())


def downgrade() -> None:
    """Back to 0002, only while no row uses format 2 (0002's code could not verify it)."""
    conn = op.get_bind()
    for chain in ("transfers", "account_events"):
        newer = conn.exec_driver_sql(
            f"SELECT COUNT(*) FROM {chain} WHERE seq >= (SELECT MIN(first_seq) "
            f"FROM chain_formats WHERE chain = '{chain}' AND version = 2)"
        ).scalar()
        if newer:
            raise SchemaDowngradeRefused(
                f"{newer} {chain} rows use hash format 2, which revision 0002 cannot verify: "
                "not downgraded"
            )
    if conn.dialect.name == "sqlite":
        for name in reversed(VIEWS):
            op.execute(f"DROP VIEW IF EXISTS {name}")
    op.drop_table("chain_formats")
    if conn.dialect.name == "sqlite":
        _rebuild(strict=False)
        _restore_0002_views()


def _restore_0002_views() -> None:
    """Revision 0002's views, from its own migration module (the frozen text)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).with_name("0002_audit_views.py")
    spec = importlib.util.spec_from_file_location("bank_migration_0002", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for sql in module.VIEWS.values():
        op.execute(sql.strip())
