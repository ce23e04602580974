"""Running balances on every transfer, each account's rows in seq order, and closed accounts.

- `transfers.debit_balance` and `transfers.credit_balance` (BIGINT NOT NULL): the
  debit and the credit account's balance right after the row. Existing rows are
  backfilled exactly, in SQL, by a running sum of each account's moves in seq order
  (a window `SUM`: SQLite's integer sum is exact or fails, PostgreSQL's `SUM(bigint)`
  is an exact `numeric`; every partial sum is a balance the engine kept within
  signed 64 bits). A balance as of any seq is then one index look-up.
- `ix_transfers_debit_account_id_seq` and `ix_transfers_credit_account_id_seq`: an
  account's rows in seq order on either side (history pages, point balances).
- `account_events.kind` also accepts 'close' (chained like 'open' and 'limit'; the v2
  event hash covers the kind already).

No hash changes (the transfers hash does not cover the new columns). SQLite cannot
add a NOT NULL column without a default nor change a CHECK in place, so there the two
tables are rebuilt as revision 0003 rebuilt them (STRICT, every row copied verbatim,
the views dropped and recreated with 0003's frozen text); PostgreSQL alters in place.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from bank.errors import LedgerCorrupt, SchemaDowngradeRefused

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: Columns copied verbatim by a rebuild, in table order (revision 0003's tables).
TRANSFER_COLUMNS = (
    "seq",
    "key",
    "kind",
    "debit_account_id",
    "credit_account_id",
    "amount",
    "ts_us",
    "hash",
)
EVENT_COLUMNS = (
    "seq",
    "account_id",
    "kind",
    "name",
    "overdraft_limit",
    "transfer_seq",
    "ts_us",
    "hash",
)
#: The views of revisions 0003 (SQLite) and 0004 (PostgreSQL) read these tables; on
#: SQLite they are dropped for the rebuild and recreated from 0003's frozen text.
VIEW_NAMES = ("account_flows", "balance_mismatches", "account_field_mismatches", "ledger_totals")
INDEXES: dict[str, list[str]] = {
    "ix_transfers_debit_account_id_seq": ["debit_account_id", "seq"],
    "ix_transfers_credit_account_id_seq": ["credit_account_id", "seq"],
}
KINDS_0004 = "kind IN ('open', 'limit')"
KINDS_0005 = "kind IN ('open', 'limit', 'close')"


def _frozen_views(module_file: str) -> list[str]:
    """The views a revision's own module froze (its text, not an import of today's code)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).with_name(module_file)
    spec = importlib.util.spec_from_file_location(f"bank_migration_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [str(sql).strip() for sql in module.VIEWS.values()]


#: The views a SQLite ledger has at this revision: 0003's, recreated after the rebuild
#: (PostgreSQL keeps 0004's, untouched). By name, in creation order.
VIEWS: dict[str, str] = dict(
    zip(VIEW_NAMES, _frozen_views("0003_strict_tables_chain_v2.py"), strict=True)
)


def running_balances_sql(table: str) -> str:
    """`(seq, debit_balance, credit_balance)` of every row of `table`: each account's
    running sum of its moves in seq order, debit side and credit side of each row."""
    return f"""
SELECT seq,
    CAST(MAX(CASE WHEN side = 0 THEN balance END) AS BIGINT) AS debit_balance,
    CAST(MAX(CASE WHEN side = 1 THEN balance END) AS BIGINT) AS credit_balance
FROM (
    SELECT seq, side,
        SUM(delta) OVER (PARTITION BY account_id ORDER BY seq ROWS UNBOUNDED PRECEDING)
            AS balance
    FROM (
        SELECT seq, 0 AS side, debit_account_id AS account_id, -amount AS delta FROM {table}
        UNION ALL
        SELECT seq, 1 AS side, credit_account_id AS account_id, amount AS delta FROM {table}
    ) AS moves
) AS running
GROUP BY seq
"""


def _create_transfers(running: bool) -> None:
    """`transfers` as revision 0003 made it (STRICT), with the running balances if `running`."""
    extra = (
        [
            sa.Column("debit_balance", sa.Integer(), nullable=False),
            sa.Column("credit_balance", sa.Integer(), nullable=False),
        ]
        if running
        else []
    )
    op.create_table(
        "transfers",
        sa.Column("seq", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("key", sa.Text(), nullable=True),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("debit_account_id", sa.Integer(), nullable=False),
        sa.Column("credit_account_id", sa.Integer(), nullable=False),
        sa.Column("amount", sa.Integer(), nullable=False),
        sa.Column("ts_us", sa.Integer(), nullable=False),
        sa.Column("hash", sa.Text(), nullable=False),
        *extra,
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
        sqlite_strict=True,
    )


def _create_account_events(kinds: str) -> None:
    """`account_events` as revision 0003 made it (STRICT), accepting `kinds`."""
    op.create_table(
        "account_events",
        sa.Column("seq", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("overdraft_limit", sa.Integer(), nullable=False),
        sa.Column("transfer_seq", sa.Integer(), nullable=False),
        sa.Column("ts_us", sa.Integer(), nullable=False),
        sa.Column("hash", sa.Text(), nullable=False),
        sa.CheckConstraint(kinds, name=op.f("ck_account_events_kind_known")),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name=op.f("fk_account_events_account_id_accounts")
        ),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_account_events")),
        sqlite_strict=True,
    )


def _key_index() -> None:
    op.create_index(
        "uq_transfers_key",
        "transfers",
        ["key"],
        unique=True,
        sqlite_where=sa.text("key IS NOT NULL"),
        postgresql_where=sa.text("key IS NOT NULL"),
    )


def _account_indexes() -> None:
    for name, columns in INDEXES.items():
        op.create_index(name, "transfers", columns)


def _rebuild_sqlite(running: bool) -> None:
    """Recreate `transfers` (with or without running balances) and `account_events`
    (accepting 'close' or not), copying every row as it is; backfill when `running`."""
    for name in reversed(VIEW_NAMES):
        op.execute(f"DROP VIEW IF EXISTS {name}")
    op.execute("DROP INDEX IF EXISTS uq_transfers_key")
    for name in INDEXES:
        op.execute(f"DROP INDEX IF EXISTS {name}")
    # Old tables step aside under another name, so the new ones get their final texts.
    op.execute("ALTER TABLE transfers RENAME TO _old_transfers")
    op.execute("ALTER TABLE account_events RENAME TO _old_account_events")
    _create_transfers(running)
    _create_account_events(KINDS_0005 if running else KINDS_0004)
    listed = ", ".join(TRANSFER_COLUMNS)
    if running:
        old = ", ".join(f"t.{c}" for c in TRANSFER_COLUMNS)
        _backfill(
            f"INSERT INTO transfers ({listed}, debit_balance, credit_balance) "
            f"SELECT {old}, r.debit_balance, r.credit_balance FROM _old_transfers AS t "
            f"JOIN ({running_balances_sql('_old_transfers')}) AS r ON r.seq = t.seq "
            "ORDER BY t.seq"
        )
    else:
        op.execute(
            f"INSERT INTO transfers ({listed}) SELECT {listed} FROM _old_transfers ORDER BY seq"
        )
    events = ", ".join(EVENT_COLUMNS)
    op.execute(
        f"INSERT INTO account_events ({events}) SELECT {events} FROM _old_account_events "
        "ORDER BY seq"
    )
    op.execute("DROP TABLE _old_account_events")
    op.execute("DROP TABLE _old_transfers")
    _key_index()
    if running:
        _account_indexes()
    for sql in VIEWS.values():
        op.execute(sql)


def _backfill(sql: str) -> None:
    """Run the backfill; a sum that leaves signed 64 bits means an edited ledger."""
    try:
        op.execute(sql)
    except sa.exc.DBAPIError as exc:
        if "overflow" not in str(exc).lower():
            raise
        raise LedgerCorrupt(
            "a running balance of the transfers leaves signed 64 bits: the ledger was "
            "edited; not upgraded (run `bank audit`)"
        ) from None


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        _rebuild_sqlite(running=True)
        return
    op.execute(
        "ALTER TABLE transfers ADD COLUMN debit_balance BIGINT, ADD COLUMN credit_balance BIGINT"
    )
    _backfill(
        "UPDATE transfers SET debit_balance = r.debit_balance, "
        f"credit_balance = r.credit_balance FROM ({running_balances_sql('transfers')}) AS r "
        "WHERE transfers.seq = r.seq"
    )
    op.execute(
        "ALTER TABLE transfers ALTER COLUMN debit_balance SET NOT NULL, "
        "ALTER COLUMN credit_balance SET NOT NULL"
    )
    _account_indexes()
    _set_event_kinds(KINDS_0005)


def _set_event_kinds(kinds: str) -> None:
    op.execute(
        "ALTER TABLE account_events DROP CONSTRAINT ck_account_events_kind_known, "
        f"ADD CONSTRAINT ck_account_events_kind_known CHECK ({kinds})"
    )


def downgrade() -> None:
    """Back to 0004, only while no account was closed (0004 has no 'close' kind)."""
    conn = op.get_bind()
    closes = conn.exec_driver_sql("SELECT COUNT(*) FROM account_events WHERE kind = 'close'")
    closed = closes.scalar()
    if closed:
        raise SchemaDowngradeRefused(
            f"{closed} account_events rows close an account, which revision 0004 cannot "
            "record: not downgraded"
        )
    if conn.dialect.name == "sqlite":
        _rebuild_sqlite(running=False)
        return
    _set_event_kinds(KINDS_0004)
    for name in INDEXES:
        op.drop_index(name, table_name="transfers")
    op.execute("ALTER TABLE transfers DROP COLUMN debit_balance, DROP COLUMN credit_balance")
