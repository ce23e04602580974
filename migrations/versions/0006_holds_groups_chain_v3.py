"""Holds and atomic groups: kinds hold/post/void/expire, their columns, hash format 3.

`transfers` gains four nullable BIGINT columns: `hold_seq` (a post's, void's or
expire's hold), `expires_us` (a hold's deadline, on the clock of `ts_us`; NULL =
never), `link_first` and `link_count` (the first seq and the size of the row's
atomic group; NULL = not in one), and `kind` also accepts 'hold', 'post', 'void' and
'expire'. A unique partial index on `hold_seq` makes "a hold is settled at most
once" a property of the schema too; a partial index on the hold rows finds the
pending ones at open without a scan. `chain_formats` accepts version 3, and
transfers use it from one past the last row (`bank.ledger.chain`: the v3 message
covers every column of the row). Old rows keep their hashes.

Views: `open_holds` (every hold no row settles), `account_holds` (per account:
pending holds, held amount, available balance).

On SQLite a CHECK cannot be altered, so `transfers` and `chain_formats` are rebuilt
from their own stored definitions (edited only where this revision changes them),
every row copied verbatim, and the views and indexes that depend on them recreated
from their stored text. On PostgreSQL the columns are added and the checks replaced.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from bank.errors import SchemaDowngradeRefused

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NEW_COLUMNS = ("hold_seq", "expires_us", "link_first", "link_count")
KINDS_BEFORE = "kind IN ('deposit', 'withdrawal', 'transfer')"
KINDS_AFTER = "kind IN ('deposit', 'withdrawal', 'transfer', 'hold', 'post', 'void', 'expire')"
VERSIONS_BEFORE = "version IN (1, 2)"
VERSIONS_AFTER = "version IN (1, 2, 3)"

# Frozen with this revision (the audit compares a ledger's views with what the
# migrations create). SQLite sums the held amounts in two halves (no SUM can overflow,
# as in revision 0003's views); PostgreSQL's SUM(bigint) is an exact numeric, and
# `available` is computed in numeric there, so it is exact at any size.
OPEN_HOLDS_VIEW = """
CREATE VIEW open_holds AS
SELECT h.seq AS hold_seq, h.debit_account_id AS source_id, h.credit_account_id AS target_id,
    h.amount AS amount, h.ts_us AS held_at_us, h.expires_us AS expires_us, h.key AS key
FROM transfers AS h
WHERE h.kind = 'hold' AND NOT EXISTS (SELECT 1 FROM transfers AS s WHERE s.hold_seq = h.seq)
"""
ACCOUNT_HOLDS_VIEW = {
    "sqlite": """
CREATE VIEW account_holds AS
WITH o AS (
    SELECT source_id, COUNT(*) AS n,
        SUM(amount / 1000000000) AS high, SUM(amount % 1000000000) AS low
    FROM open_holds GROUP BY source_id
)
SELECT a.id AS account_id, a.name AS name, a.balance AS balance,
    a.overdraft_limit AS overdraft_limit, COALESCE(o.n, 0) AS open_holds,
    COALESCE(o.high * 1000000000 + o.low, 0) AS held,
    a.balance - COALESCE(o.high * 1000000000 + o.low, 0) + a.overdraft_limit AS available
FROM accounts AS a LEFT JOIN o ON o.source_id = a.id
""",
    "postgresql": """
CREATE VIEW account_holds AS
WITH o AS (
    SELECT source_id, COUNT(*) AS n, SUM(amount) AS held FROM open_holds GROUP BY source_id
)
SELECT a.id AS account_id, a.name AS name, a.balance AS balance,
    a.overdraft_limit AS overdraft_limit, COALESCE(o.n, 0) AS open_holds,
    COALESCE(o.held, 0) AS held,
    CAST(a.balance AS NUMERIC) + a.overdraft_limit - COALESCE(o.held, 0) AS available
FROM accounts AS a LEFT JOIN o ON o.source_id = a.id
""",
}
NEW_VIEWS = ("open_holds", "account_holds")


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


#: `account_flows` sums what moves: a hold, void or expire moves no money.
FLOWS_BEFORE = (
    "FROM transfers GROUP BY credit_account_id",
    "FROM transfers GROUP BY debit_account_id",
)
MOVING = "FROM transfers WHERE kind NOT IN ('hold', 'void', 'expire') GROUP BY"


def moving_flows(sql: str) -> str:
    """`account_flows` of an earlier revision, summing only the rows that move money."""
    for text in FLOWS_BEFORE:
        sql = _edit(sql, text, text.replace("FROM transfers GROUP BY", MOVING))
    return sql


def _edit(sql: str, old: str, new: str) -> str:
    assert sql.count(old) == 1, f"expected one {old!r} in {sql!r}"
    return sql.replace(old, new)


_SQLITE_BEFORE = _views_of("0005_running_balances_account_close.py")  # 0003's texts
_POSTGRES_BEFORE = _views_of("0004_postgres_bigint_views.py")

#: The views a SQLite ledger has at this revision (0005's, flows of money only, then
#: this revision's own).
VIEWS: dict[str, str] = {
    **_SQLITE_BEFORE,
    "account_flows": moving_flows(_SQLITE_BEFORE["account_flows"]),
    "open_holds": OPEN_HOLDS_VIEW,
    "account_holds": ACCOUNT_HOLDS_VIEW["sqlite"],
}


def _stored(kind: str, table: str) -> list[tuple[str, str]]:
    """(name, sql) of SQLite's stored objects of `kind` on `table` (all views: '*')."""
    conn = op.get_bind()
    if table == "*":
        rows = conn.exec_driver_sql(
            "SELECT name, sql FROM sqlite_master WHERE type = ? AND sql IS NOT NULL ORDER BY rowid",
            (kind,),
        )
    else:
        rows = conn.exec_driver_sql(
            "SELECT name, sql FROM sqlite_master WHERE type = ? AND tbl_name = ? "
            "AND sql IS NOT NULL ORDER BY rowid",
            (kind, table),
        )
    return [(str(name), str(sql)) for name, sql in rows]


def _table_sql(table: str) -> str:
    row = (
        op.get_bind()
        .exec_driver_sql(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
        )
        .first()
    )
    assert row is not None, f"no table {table}"
    return str(row[0])


def _sqlite_rebuild(table: str, new_sql: str, columns: Sequence[str]) -> None:
    """Recreate `table` as `new_sql` (its final name), copying `columns` of every row."""
    indexes = _stored("index", table)
    for name, _ in indexes:
        op.execute(f"DROP INDEX {name}")
    op.execute(f"ALTER TABLE {table} RENAME TO _old_{table}")
    op.execute(new_sql)
    listed = ", ".join(columns)
    op.execute(f"INSERT INTO {table} ({listed}) SELECT {listed} FROM _old_{table}")
    op.execute(f"DROP TABLE _old_{table}")
    for _, sql in indexes:
        op.execute(sql)


def _columns(table: str) -> list[str]:
    rows = op.get_bind().exec_driver_sql(f"PRAGMA table_xinfo({table})")
    return [str(r[1]) for r in rows]


def _sqlite_upgrade() -> None:
    views = _stored("view", "*")
    for name, _ in reversed(views):
        op.execute(f"DROP VIEW {name}")
    transfers = _table_sql("transfers")
    old_columns = _columns("transfers")
    transfers = _edit(transfers, KINDS_BEFORE, KINDS_AFTER)
    # The new columns go after the last column, before the first table constraint.
    cut = transfers.index("CONSTRAINT")
    head = transfers[:cut].rstrip()
    assert head.endswith(","), head
    added = "".join(f"\n\t{name} INTEGER, " for name in NEW_COLUMNS)
    transfers = f"{head}{added}\n\t{transfers[cut:]}"
    _sqlite_rebuild("transfers", transfers, old_columns)
    formats = _edit(_table_sql("chain_formats"), VERSIONS_BEFORE, VERSIONS_AFTER)
    _sqlite_rebuild("chain_formats", formats, _columns("chain_formats"))
    for name, sql in views:
        op.execute(moving_flows(sql) if name == "account_flows" else sql)


def _postgres_upgrade() -> None:
    for name in NEW_COLUMNS:
        op.add_column("transfers", sa.Column(name, sa.BigInteger(), nullable=True))
    op.drop_constraint(op.f("ck_transfers_kind_known"), "transfers", type_="check")
    op.create_check_constraint(op.f("ck_transfers_kind_known"), "transfers", KINDS_AFTER)
    op.drop_constraint(op.f("ck_chain_formats_version_known"), "chain_formats", type_="check")
    op.create_check_constraint(
        op.f("ck_chain_formats_version_known"), "chain_formats", VERSIONS_AFTER
    )
    flows = _POSTGRES_BEFORE["account_flows"].strip()
    op.execute(moving_flows(flows).replace("CREATE VIEW", "CREATE OR REPLACE VIEW", 1))


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        _sqlite_upgrade()
    else:
        _postgres_upgrade()
    op.create_index(
        "uq_transfers_hold_seq",
        "transfers",
        ["hold_seq"],
        unique=True,
        sqlite_where=sa.text("hold_seq IS NOT NULL"),
        postgresql_where=sa.text("hold_seq IS NOT NULL"),
    )
    op.create_index(
        "ix_transfers_holds",
        "transfers",
        ["seq"],
        sqlite_where=sa.text("kind = 'hold'"),
        postgresql_where=sa.text("kind = 'hold'"),
    )
    conn = op.get_bind()
    last = conn.exec_driver_sql("SELECT COALESCE(MAX(seq), 0) FROM transfers").scalar()
    assert isinstance(last, int)
    # Format 3 from one past the last row. An entry there already (a ledger with no
    # transfers: format 2 from seq 1) covers no row yet: it becomes format 3.
    taken = conn.exec_driver_sql(
        f"SELECT COUNT(*) FROM chain_formats WHERE chain = 'transfers' AND first_seq = {last + 1}"
    ).scalar()
    if taken:
        op.execute(
            "UPDATE chain_formats SET version = 3 "
            f"WHERE chain = 'transfers' AND first_seq = {last + 1}"
        )
    else:
        op.execute(
            "INSERT INTO chain_formats (chain, first_seq, version) "
            f"VALUES ('transfers', {last + 1}, 3)"
        )
    op.execute(OPEN_HOLDS_VIEW.strip())
    op.execute(ACCOUNT_HOLDS_VIEW["sqlite" if dialect == "sqlite" else "postgresql"].strip())


def downgrade() -> None:
    """Back to 0005, only while no transfer uses hash format 3 (0005 cannot verify it)."""
    conn = op.get_bind()
    newer = conn.exec_driver_sql(
        "SELECT COUNT(*) FROM transfers WHERE seq >= (SELECT MIN(first_seq) "
        "FROM chain_formats WHERE chain = 'transfers' AND version = 3)"
    ).scalar()
    if newer:
        raise SchemaDowngradeRefused(
            f"{newer} transfers rows use hash format 3, which revision 0005 cannot verify: "
            "not downgraded"
        )
    for name in reversed(NEW_VIEWS):
        op.execute(f"DROP VIEW {name}")
    # Back to format 2 from where 3 began (an entry there was format 2 or new: see upgrade).
    first = conn.exec_driver_sql(
        "SELECT first_seq FROM chain_formats WHERE chain = 'transfers' AND version = 3"
    ).scalar()
    previous = conn.exec_driver_sql(
        "SELECT version FROM chain_formats WHERE chain = 'transfers' AND version < 3 "
        "ORDER BY first_seq DESC LIMIT 1"
    ).scalar()
    if previous == 2 or first is None:
        op.execute("DELETE FROM chain_formats WHERE chain = 'transfers' AND version = 3")
    else:
        op.execute("UPDATE chain_formats SET version = 2 WHERE chain = 'transfers' AND version = 3")
    op.drop_index("ix_transfers_holds", table_name="transfers")
    op.drop_index("uq_transfers_hold_seq", table_name="transfers")
    if conn.dialect.name != "sqlite":
        op.drop_constraint(op.f("ck_chain_formats_version_known"), "chain_formats", type_="check")
        op.create_check_constraint(
            op.f("ck_chain_formats_version_known"), "chain_formats", VERSIONS_BEFORE
        )
        op.drop_constraint(op.f("ck_transfers_kind_known"), "transfers", type_="check")
        op.create_check_constraint(op.f("ck_transfers_kind_known"), "transfers", KINDS_BEFORE)
        flows = _POSTGRES_BEFORE["account_flows"].strip()
        op.execute(flows.replace("CREATE VIEW", "CREATE OR REPLACE VIEW", 1))
        for name in reversed(NEW_COLUMNS):
            op.drop_column("transfers", name)
        return
    views = _stored("view", "*")
    for name, _ in reversed(views):
        op.execute(f"DROP VIEW {name}")
    transfers = _edit(_table_sql("transfers"), KINDS_AFTER, KINDS_BEFORE)
    for name in NEW_COLUMNS:
        transfers = _edit(transfers, f"\n\t{name} INTEGER, ", "")
    kept = [c for c in _columns("transfers") if c not in NEW_COLUMNS]
    _sqlite_rebuild("transfers", transfers, kept)
    formats = _edit(_table_sql("chain_formats"), VERSIONS_AFTER, VERSIONS_BEFORE)
    _sqlite_rebuild("chain_formats", formats, _columns("chain_formats"))
    for name, sql in views:
        op.execute(_SQLITE_BEFORE["account_flows"].strip() if name == "account_flows" else sql)
