"""What `Bank.open` checks before it trusts a ledger's stored balances and limits.

The engine restores its accounts from the `accounts` table and goes on from the
chain heads; if either was edited, every answer built on top of them is wrong
(an overdraft acknowledged against a raised limit, money created by a raised
balance). The full proof is `bank audit`; this is the part of it that is cheap
enough to run on every open and that covers what the engine relies on:

- each stored balance equals the account's credits minus its debits in
  `transfers` (two aggregate queries; amounts are summed as high and low 32-bit
  halves and added in Python, so no SQLite sum overflows on any ledger the
  engine can write), lies within signed 64 bits, sums to 0 with the others,
  and is not below `-overdraft_limit` for a customer;
- each stored name and limit equals the account's latest chained event; every
  `accounts` row has an opening event and every event an `accounts` row;
- every table, index, view and trigger is the newest revision's, token by token
  (no trigger the migrations did not make can swallow or rewrite the writer's rows);
- the postings watermark (revision 0007) is one row within 0..the last seq, and
  postings hold two rows per transfer up to it (a count; the audit proves which);
- both chains are contiguous (count, first and last seq) and the newest row of
  each hashes, with `bank.ledger.chain`, to its stored hash from its
  predecessor's: an edit of the rows the writer chains onto is caught here;
  edits further back are the audit's to find.

Everything is read in one transaction and nothing is written. The result is a
list of one-line problems (capped, with a total), empty for a sound ledger.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from sqlalchemy import Connection, inspect, select

from bank.ledger.chain import (
    FORMAT_V1,
    GENESIS,
    stored_account_event_hash,
    stored_transfer_hash,
    version_at,
)
from bank.ledger.models import chain_formats
from bank.ledger.schema_ref import compare_schema, read_schema, reference_schemas
from bank.limits import (
    AMOUNT_MAX,
    BALANCE_MAX,
    BALANCE_MIN,
    CASH_ACCOUNT_ID,
    CASH_ACCOUNT_NAME,
)

#: Problems kept for the message; the rest are only counted.
PROBLEMS_KEPT_MAX: Final = 20

_LOW_BITS: Final = 32
_LOW_MASK: Final = (1 << _LOW_BITS) - 1

# Per-account flows. `amount >> 32` and `amount & mask` are each far below 2**63
# for any amount (the high half of a legal amount is below 2**18), so neither SUM
# can overflow where SUM(amount) would (total flows past 2**63); the halves cost
# no more than one SUM (the GROUP BY's sort is what costs). The debit side also
# counts amounts that are not integers from 1 to AMOUNT_MAX (a REAL or TEXT put
# there where a column's type allows it); both sides see the same rows, so once is
# enough. Portable SQL: a CASE rather than SUM(boolean), CAST to BIGINT (INTEGER
# affinity in SQLite, a no-op on a BIGINT column); a server's SUM(bigint) may come
# back as an exact decimal, hence `int()` on the sums.
# Holds, voids and expiries move no money (revision 0006): their amounts count 0.
_MOVED: Final = "CASE WHEN kind IN ('hold', 'void', 'expire') THEN 0 ELSE amount END"
_FLOWS_SQL: Final = (
    f"SELECT {{side}}, SUM(({_MOVED}) >> 32), SUM(({_MOVED}) & 4294967295), COUNT(*){{bad}} "
    "FROM transfers GROUP BY {side}"
)
_BAD_AMOUNTS_SQL: Final = (
    ", SUM(CASE WHEN amount <> CAST(amount AS BIGINT) OR amount < 1 "
    f"OR amount > {AMOUNT_MAX} THEN 1 ELSE 0 END)"
)


@dataclass(slots=True)
class OpenReport:
    """What the open-time verification found: the first problems and how many in all."""

    problems: list[str] = field(default_factory=list)
    total: int = 0

    @property
    def ok(self) -> bool:
        """True when nothing was found: the ledger may be opened."""
        return self.total == 0

    def add(self, message: str) -> None:
        self.total += 1
        if len(self.problems) < PROBLEMS_KEPT_MAX:
            self.problems.append(message)


@dataclass(slots=True)
class _Latest:
    """An account as its chained events describe it."""

    name: object
    limit: object


def _is_int(value: object) -> bool:
    return type(value) is int


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def _flows(conn: Connection, side: str, report: OpenReport) -> tuple[dict[Any, int], int]:
    """Total amount per account on one side of `transfers`, and the number of rows."""
    debit = side == "debit_account_id"
    sql = _FLOWS_SQL.format(side=side, bad=_BAD_AMOUNTS_SQL if debit else "")
    totals: dict[Any, int] = {}
    count = 0
    bad = 0
    for account, high, low, n, *bad_n in conn.exec_driver_sql(sql):
        totals[account] = (int(high or 0) << _LOW_BITS) + int(low or 0)  # NULL only if forged
        count += n
        if bad_n:
            bad += int(bad_n[0] or 0)
    if bad:
        report.add(
            f"transfers: {bad} row(s) with an amount that is not an integer from 1 to {AMOUNT_MAX}"
        )
    return totals, count


def _events(conn: Connection, report: OpenReport) -> tuple[dict[Any, _Latest], int, int, int, int]:
    """Replay `account_events`: latest name and limit per account, count, seq range,
    and the largest transfer_seq."""
    latest: dict[Any, _Latest] = {}
    count = 0
    first = last = 0
    transfer_seq_max = 0
    rows = conn.exec_driver_sql(
        "SELECT seq, account_id, kind, name, overdraft_limit, transfer_seq "
        "FROM account_events ORDER BY seq"
    )
    for seq, account, kind, name, limit, transfer_seq in rows:
        count += 1
        if count == 1:
            first = seq
        last = seq
        if _is_int(transfer_seq) and transfer_seq > transfer_seq_max:
            transfer_seq_max = transfer_seq
        known = latest.get(account)
        if kind == "open":
            if known is not None:
                report.add(f"account_events seq {seq}: account {account!r} opened a second time")
            else:
                latest[account] = _Latest(name, limit)
        elif known is None:
            report.add(f"account_events seq {seq}: {kind!r} event for an account not yet opened")
        else:
            known.name = name
            known.limit = limit
    return latest, count, first, last, transfer_seq_max


def _contiguous(report: OpenReport, table: str, count: int, first: int, last: int) -> None:
    if count and (first != 1 or last != count):
        report.add(
            f"{table}: {count} row(s) for seq {first!r}..{last!r}: not numbered 1..{count} "
            "(rows deleted or inserted)"
        )


def _transfer_row_hash(version: int, prev: str, row: Sequence[Any]) -> str | None:
    """The chain hash of one `transfers` row (seq, kind, debit, credit, amount, ts_us, key,
    then the columns only format 3 covers)."""
    seq, kind, debit, credit, amount, ts_us, key, *extra = row
    return stored_transfer_hash(version, prev, seq, kind, debit, credit, amount, ts_us, key, *extra)


def _event_row_hash(version: int, prev: str, row: Sequence[Any]) -> str | None:
    """The chain hash of one `account_events` row (seq, account, kind, limit, transfer_seq,
    ts_us, name)."""
    seq, account, kind, limit, transfer_seq, ts_us, name = row
    return stored_account_event_hash(
        version, prev, seq, account, kind, limit, transfer_seq, ts_us, name
    )


def _format_of(conn: Connection, table: str, seq: int) -> int:
    """The hash format of row `seq` of chain `table` (`chain_formats`; format 1 without it)."""
    if not inspect(conn).has_table(chain_formats.name):
        return FORMAT_V1
    entries = conn.execute(
        select(chain_formats.c.first_seq, chain_formats.c.version)
        .where(chain_formats.c.chain == table)
        .order_by(chain_formats.c.first_seq)
    ).all()
    return version_at([(int(a), int(b)) for a, b in entries], seq)


_NoneType = type(None)

#: The columns of each chain that its hash covers, in the chain function's order, with
#: the Python types SQLite must hand back for them.
_CHAINED: Final[dict[str, tuple[tuple[str, tuple[type, ...]], ...]]] = {
    "transfers": (
        ("seq", (int,)),
        ("kind", (str,)),
        ("debit_account_id", (int,)),
        ("credit_account_id", (int,)),
        ("amount", (int,)),
        ("ts_us", (int,)),
        ("key", (str, _NoneType)),
        # Covered by format 3 only (revisions 0005 and 0006); the older formats ignore them.
        ("debit_balance", (int,)),
        ("credit_balance", (int,)),
        ("hold_seq", (int, _NoneType)),
        ("expires_us", (int, _NoneType)),
        ("link_first", (int, _NoneType)),
        ("link_count", (int, _NoneType)),
    ),
    "account_events": (
        ("seq", (int,)),
        ("account_id", (int,)),
        ("kind", (str,)),
        ("overdraft_limit", (int,)),
        ("transfer_seq", (int,)),
        ("ts_us", (int,)),
        ("name", (str,)),
    ),
}


def _check_tail(conn: Connection, report: OpenReport, table: str) -> None:
    """Recompute the newest row's hash from its predecessor's stored hash."""
    chained = _CHAINED[table]
    columns = ", ".join(name for name, _ in chained)
    tail = conn.exec_driver_sql(
        f"SELECT {columns}, hash FROM {table} ORDER BY seq DESC LIMIT 2"
    ).all()
    if not tail:
        return
    newest, *before = tail
    fields, stored = tuple(newest[:-1]), newest[-1]
    seq = fields[0]
    # Types first: a chain encoding may format ints and texts strictly.
    for (name, types), value in zip(chained, fields, strict=True):
        if type(value) not in types:
            report.add(
                f"{table} seq {seq!r} (the newest row): {name} holds {_shown(value)}, "
                f"not {' or '.join(t.__name__ for t in types)}"
            )
            return
    if before:
        if before[0][0] != seq - 1:
            return  # reported by the contiguity check
        prev = before[0][-1]
    else:
        prev = GENESIS
    hasher = _transfer_row_hash if table == "transfers" else _event_row_hash
    version = _format_of(conn, table, seq)
    if type(prev) is not str or hasher(version, prev, fields) != stored:
        report.add(
            f"{table} seq {seq} (the newest row) does not hash to its stored hash from the "
            "row before it: it or its predecessor was edited"
        )


def _check_schema(conn: Connection, report: OpenReport) -> None:
    """Every schema object must be the newest revision's, as the migrations make it.

    The engine writes through the schema: a trigger it did not make could swallow
    its INSERTs (`RAISE(IGNORE)`) or rewrite rows after they are chained, so that
    acknowledged operations never reach the ledger. Compared like the audit does
    (`bank.ledger.schema_ref`; the reference is built once per process).
    """
    schemas = reference_schemas(conn.dialect.name, conn.engine)
    revision, expected = list(schemas.items())[-1]  # oldest first: the newest is last
    found = read_schema(conn)  # in this transaction
    for difference in compare_schema(expected, found, revision):
        report.add(f"schema: {difference.message}")


def verify_ledger(conn: Connection) -> OpenReport:
    """Check what the engine restores from (see the module docstring); reads only.

    Run inside one transaction (the caller's connection), so every query sees the
    same commit.
    """
    report = OpenReport()
    _check_schema(conn, report)
    accounts = conn.exec_driver_sql(
        "SELECT id, name, overdraft_limit, balance FROM accounts ORDER BY id"
    ).all()
    latest, events, first_event, last_event, transfer_seq_max = _events(conn, report)
    debits, transfers = _flows(conn, "debit_account_id", report)
    credits, _ = _flows(conn, "credit_account_id", report)
    first_seq, last_seq = conn.exec_driver_sql(
        "SELECT COALESCE(MIN(seq), 0), COALESCE(MAX(seq), 0) FROM transfers"
    ).one()

    seen: set[Any] = set()
    total = 0
    for account, name, limit, balance in accounts:
        seen.add(account)
        label = f"account {account!r} ({_shown(name)})"
        if not _is_int(account) or account < 0:
            report.add(f"{label}: id is not a non-negative integer")
        known = latest.get(account)
        if known is None:
            report.add(f"{label}: has no opening event in account_events")
        else:
            if name != known.name or type(name) is not type(known.name):
                report.add(f"{label}: name differs from its latest event ({_shown(known.name)})")
            if limit != known.limit or type(limit) is not type(known.limit):
                report.add(
                    f"{label}: overdraft_limit {_shown(limit)} differs from its latest event "
                    f"({_shown(known.limit)})"
                )
        replayed = credits.get(account, 0) - debits.get(account, 0)
        if not _is_int(balance) or not BALANCE_MIN <= balance <= BALANCE_MAX:
            report.add(f"{label}: balance {_shown(balance)} is not a signed 64-bit integer")
            continue
        total += balance
        if balance != replayed:
            report.add(f"{label}: stored balance {balance} but its transfers give {replayed}")
        if account != CASH_ACCOUNT_ID and _is_int(limit) and balance < -limit:
            report.add(f"{label}: balance {balance} is below -overdraft_limit ({-limit})")
    if CASH_ACCOUNT_ID not in seen:
        report.add(f"the {CASH_ACCOUNT_NAME} account (id {CASH_ACCOUNT_ID}) is missing")
    if total != 0:
        report.add(f"stored balances sum to {total}, not 0")
    for account in sorted(latest.keys() - seen, key=repr):
        report.add(f"account {account!r}: has chained events but no accounts row (deleted?)")
    for account in sorted((debits.keys() | credits.keys()) - seen, key=repr):
        report.add(f"transfers name account {account!r}, which has no accounts row")

    _contiguous(report, "transfers", transfers, first_seq, last_seq)
    _contiguous(report, "account_events", events, first_event, last_event)
    if transfer_seq_max > last_seq:
        report.add(
            f"account_events refer to transfer seq {transfer_seq_max}, beyond the last "
            f"transfer ({last_seq})"
        )
    _check_tail(conn, report, "transfers")
    _check_tail(conn, report, "account_events")
    _check_postings_watermark(conn, report, transfers, last_seq)
    return report


def _check_postings_watermark(
    conn: Connection, report: OpenReport, transfers: int, last_seq: int
) -> None:
    """The watermark the writer goes on from (revision 0007): one row, 0 <= W <= the last
    seq, and two postings per transfer up to W by count.

    The writer adds the rows above W at its next flush: a W set beyond the head would
    leave every row up to it out of the history index for good, a W set back would
    add postings twice (refused by the primary key: no write would succeed). The count
    is one walk of the postings b-tree (SQLite) or scan (PostgreSQL); which postings
    they are is the audit's to prove.
    """
    if not inspect(conn).has_table("postings_upto"):
        return  # the schema check reports a missing table
    rows = conn.exec_driver_sql("SELECT id, seq FROM postings_upto").all()
    if len(rows) != 1:
        report.add(f"postings_upto holds {len(rows)} rows, not one: the postings watermark is lost")
        return
    row_id, watermark = rows[0]
    if row_id != 1:  # the writer moves W by `WHERE id = 1`: it would fail at its first flush
        report.add(f"postings_upto's one row has id {_shown(row_id)}, not 1")
        return
    if not _is_int(watermark) or not 0 <= watermark <= last_seq:
        report.add(
            f"postings_upto.seq (the postings watermark) is {_shown(watermark)}, not a seq "
            f"from 0 to the last transfer ({last_seq})"
        )
        return
    if transfers != last_seq:
        return  # rows deleted or inserted: reported by the contiguity check
    (postings,) = conn.exec_driver_sql("SELECT COUNT(*) FROM postings").one()
    if postings != 2 * watermark:
        report.add(
            f"postings holds {postings} rows, but the {watermark} transfers up to the "
            f"watermark need {2 * watermark}: postings were deleted or added"
        )


def describe(report: OpenReport, where: str, shown_max: int) -> str:
    """The `LedgerCorrupt` message: a headline with the count, then one line per problem."""
    count = f"{report.total} problem" + ("s" if report.total != 1 else "")
    lines = [
        f"{where}: the ledger disagrees with itself ({count}); it was not opened. "
        f"Run `bank audit --db {where}` to locate the damage:"
    ]
    lines += [f"  - {p}" for p in report.problems[:shown_max]]
    if report.total > shown_max:
        lines.append(f"  ... and {report.total - shown_max} more")
    return "\n".join(lines)
