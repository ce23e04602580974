"""Reads of the ledger that the engine and the CLI share (never on the hot write path).

History pages and balances as of a seq are key look-ups (revision 0007): an account's
rows in seq order are the range of `postings`' primary key (account_id, seq) up to
the watermark W, plus the few rows above W (the tail), a range of `transfers` by seq
(`bank.ledger.postings` explains the layout). Every row carries both accounts'
balances right after it. Each read is ONE statement, so W, the postings and the tail
come from one snapshot. Nothing scans more than the tail.

A ledger read without being upgraded (`bank.ledger.reader`, revisions before 0007)
has no postings: it is read with the queries of revision 0005 (`postings=False`),
which use its two (account, seq) indexes where it has them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import cache
from typing import Any, Final

from sqlalchemy import (
    ColumnElement,
    Connection,
    Select,
    Subquery,
    TextClause,
    bindparam,
    func,
    select,
    text,
    union_all,
)

from bank.errors import AccountNotFound, InvalidCommand, SeqBeyondHead
from bank.ledger.backends import backend_module
from bank.ledger.chain import GENESIS
from bank.ledger.models import account_events, accounts, transfers
from bank.ledger.postings import BALANCE_AT_SQL, history_sql
from bank.limits import BALANCE_MAX, HISTORY_LIMIT_MAX
from bank.records import AccountInfo, AccountSummary, Receipt

#: Builds a `Receipt` from a row without the NamedTuple's Python-level `__new__`.
_new = tuple.__new__

_RECEIPT_COLUMNS = (
    transfers.c.seq,
    transfers.c.kind,
    transfers.c.key,
    transfers.c.amount,
    transfers.c.debit_account_id,
    transfers.c.credit_account_id,
    transfers.c.ts_us,
    transfers.c.hash,
    transfers.c.hold_seq,  # revision 0006
    transfers.c.expires_us,
    transfers.c.link_first,
    transfers.c.link_count,
)


def load_accounts(conn: Connection) -> list[AccountInfo]:
    """Every account, `@cash` included, ordered by id."""
    rows = conn.execute(
        select(
            accounts.c.id, accounts.c.name, accounts.c.overdraft_limit, accounts.c.balance
        ).order_by(accounts.c.id)
    )
    return [AccountInfo(*row) for row in rows]


def load_account_summaries(conn: Connection, *, holds: bool, closes: bool) -> list[AccountSummary]:
    """Every account, `@cash` first, with its pending holds' total and its closed flag.

    `holds`: the ledger has holds (revision 0006, the `open_holds` view); `closes`: it
    has 'close' events (0005). The held amounts are summed here, in Python ints, so a
    total is exact at any size on either backend."""
    held: dict[int, int] = {}
    if holds:
        for source_id, amount in conn.execute(text("SELECT source_id, amount FROM open_holds")):
            held[int(source_id)] = held.get(int(source_id), 0) + int(amount)
    closed = closed_accounts(conn) if closes else set()
    return [
        AccountSummary.of(
            a.id, a.name, a.balance, a.overdraft_limit, held.get(a.id, 0), a.id in closed
        )
        for a in load_accounts(conn)
    ]


def chain_heads(conn: Connection) -> tuple[int, str, int, str]:
    """(last transfer seq, its hash, last account event seq, its hash); GENESIS when empty."""
    t = conn.execute(
        select(transfers.c.seq, transfers.c.hash).order_by(transfers.c.seq.desc()).limit(1)
    ).first()
    e = conn.execute(
        select(account_events.c.seq, account_events.c.hash)
        .order_by(account_events.c.seq.desc())
        .limit(1)
    ).first()
    return (
        t.seq if t else 0,
        t.hash if t else GENESIS,
        e.seq if e else 0,
        e.hash if e else GENESIS,
    )


def closed_accounts(conn: Connection) -> set[int]:
    """The ids of the accounts a chained 'close' event closed (revision 0005)."""
    rows = conn.execute(select(account_events.c.account_id).where(account_events.c.kind == "close"))
    return {int(account_id) for (account_id,) in rows}


#: Built once: a `select()` made per call spent 180 of its 245 us (SQLite, 2 cores)
#: coercing its twelve columns and keys, on every keyed operation's look-up.
_RECEIPT_OF_KEY = select(*_RECEIPT_COLUMNS).where(transfers.c.key == bindparam("key"))
_RECEIPTS_OF_KEYS = select(*_RECEIPT_COLUMNS).where(
    transfers.c.key.in_(bindparam("keys", expanding=True))
)


def find_receipts(conn: Connection, keys: list[str]) -> dict[str, Receipt]:
    """The committed receipts of those `keys` that are in the ledger (one query)."""
    if not keys:
        return {}
    if len(keys) == 1:  # a blocking call's: no IN list to expand
        rows = conn.execute(_RECEIPT_OF_KEY, {"key": keys[0]})
    else:
        rows = conn.execute(_RECEIPTS_OF_KEYS, {"keys": keys})
    return {row[2]: _new(Receipt, row) for row in rows}


# -- arguments (checked before anything is read) --------------------------------------------


def check_account(value: object, what: str) -> int:
    """An account id argument: an int (not a bool), else `InvalidCommand` naming `what`."""
    if type(value) is not int:
        raise InvalidCommand(f"{what} must be an account id, an int (got {value!r})")
    return value


def check_seq(value: object, what: str) -> int:
    """A seq argument (`at_seq`, `after_seq`): an int from 0 to 2**63 - 1 (not a bool)."""
    if type(value) is not int or not 0 <= value <= BALANCE_MAX:
        raise InvalidCommand(f"{what} must be an int from 0 to 2**63 - 1, a seq (got {value!r})")
    return value


def check_limit(value: object, what: str = "limit") -> int:
    """A page size: an int from 1 to `HISTORY_LIMIT_MAX` (not a bool, not None)."""
    if type(value) is not int or not 1 <= value <= HISTORY_LIMIT_MAX:
        raise InvalidCommand(f"{what} must be an int from 1 to {HISTORY_LIMIT_MAX} (got {value!r})")
    return value


# -- history and balances as of a seq ---------------------------------------------------------


def last_seq(conn: Connection) -> int:
    """The seq of the last committed transfer in this read (0: none)."""
    value = conn.execute(select(func.max(transfers.c.seq))).scalar()
    return int(value) if value is not None else 0


def account_balance(conn: Connection, account_id: int) -> int:
    """The stored balance of an account (as of the last committed transfer); raises
    `AccountNotFound` if the ledger has no such account."""
    value = conn.execute(
        select(accounts.c.balance).where(accounts.c.id == account_id)
    ).scalar_one_or_none()
    if value is None:
        raise AccountNotFound(f"account {account_id} does not exist")
    return int(value)


def history_page(
    conn: Connection,
    account_id: int,
    after_seq: int,
    limit: int,
    *,
    descending: bool = False,
    postings: bool = True,
) -> list[Receipt]:
    """Up to `limit` of the account's committed transfers past the cursor `after_seq`: seq
    greater than it, ascending; or with `descending`, newest first, seq less than it (0: from
    the newest). Pass the last one's seq for the next page (rows are never changed or
    inserted below the head, so pages never skip or repeat a row).

    One statement (`bank.ledger.postings.history_sql`): the account's range of the
    postings key and the tail above W, ordered and cut at `limit` as a whole (SQLite
    merges the two as it reads them, PostgreSQL cuts each at `limit` first: each backend's
    `reads` module). `postings` false: a ledger before revision 0007
    (read, not upgraded), read as revision 0005 read it."""
    if not postings:
        return _indexed_history_page(conn, account_id, after_seq, limit, descending=descending)
    if descending:
        upper = after_seq - 1 if after_seq else BALANCE_MAX
        params = {"account": account_id, "upper": upper, "limit": limit}
    else:
        params = {"account": account_id, "after": after_seq, "limit": limit}
    rows = conn.execute(_history_statement(conn.dialect.name, descending), params)
    return [_new(Receipt, row) for row in rows]


@cache
def _history_statement(dialect: str, descending: bool) -> TextClause:
    """The page statement of the backend of `dialect` (its `reads` module says which)."""
    merged = bool(backend_module(dialect, "reads").MERGES_ORDERED_ARMS)
    return text(history_sql(merged=merged, descending=descending))


_BALANCE_AT = text(BALANCE_AT_SQL)


def iter_history(
    read_page: Callable[[int, int], list[Receipt]], after_seq: int, page: int
) -> Iterator[Receipt]:
    """Every receipt after `after_seq`, ascending, read `page` at a time by
    `read_page(after_seq, limit)` (one short read each: memory stays at one page)."""
    while True:
        rows = read_page(after_seq, page)
        yield from rows
        if len(rows) < page:
            return
        after_seq = rows[-1].seq


def balance_at(conn: Connection, account_id: int, seq: int, *, postings: bool = True) -> int:
    """The account's balance right after transfer `seq`: the running balance of its last
    row at or before `seq`, 0 if it has none (not yet used or not yet opened). One
    statement (`bank.ledger.postings.BALANCE_AT_SQL`: the tail above W, else one step of
    the postings key). The caller checks `seq` against the head. `postings` false: a
    ledger before revision 0007, read as revision 0005 read it."""
    if not postings:
        return _indexed_balance_at(conn, account_id, seq)
    value = conn.execute(_BALANCE_AT, {"account": account_id, "seq": seq}).scalar()
    return int(value) if value is not None else 0


def committed_balance_at(
    conn: Connection, account_id: int, seq: int, where: str, *, postings: bool = True
) -> int:
    """`balance_at` after checking, in the same read, that `seq` is committed (else
    `SeqBeyondHead`, naming the ledger `where` and its head)."""
    head = last_seq(conn)
    if seq > head:
        raise SeqBeyondHead(
            f"at_seq {seq} is beyond the last committed transfer of {where} (seq {head})"
        )
    return balance_at(conn, account_id, seq, postings=postings)


#: Every account open at seq `:seq`, with its balance right after that transfer: that of
#: its newest row at or before `:seq`, 0 if it has none. The newest row is the account's
#: newest in the tail (W, :seq] if it has one there (the tail's rows grouped by account
#: once, not searched per account), else its newest posting at or before min(:seq, W)
#: (one step of the postings key per account). W is `postings_upto.seq`. Exact on both
#: backends (stored balances, no sums). Documented in the README's schema section for
#: auditors; `balances_at` runs it.
BALANCES_AT_SQL: Final = """
SELECT a.id AS account_id, a.name AS name,
    CASE
        WHEN t.seq IS NULL THEN 0
        WHEN t.debit_account_id = a.id THEN t.debit_balance
        ELSE t.credit_balance
    END AS balance
FROM accounts AS a
JOIN (
    SELECT account_id, MIN(transfer_seq) AS opened FROM account_events
    WHERE kind = 'open' GROUP BY account_id
) AS o ON o.account_id = a.id AND o.opened <= :seq
LEFT JOIN (
    SELECT account_id, MAX(seq) AS seq FROM (
        SELECT debit_account_id AS account_id, seq FROM transfers
        WHERE seq > (SELECT seq FROM postings_upto) AND seq <= :seq
        UNION ALL
        SELECT credit_account_id AS account_id, seq FROM transfers
        WHERE seq > (SELECT seq FROM postings_upto) AND seq <= :seq
    ) AS tail_sides GROUP BY account_id
) AS tail ON tail.account_id = a.id
LEFT JOIN transfers AS t ON t.seq = COALESCE(
    tail.seq,
    (
        SELECT p.seq FROM postings AS p JOIN transfers AS n ON n.seq = p.seq
        WHERE p.account_id = a.id AND p.seq <= (
            SELECT CASE WHEN u.seq < :seq THEN u.seq ELSE :seq END FROM postings_upto AS u
        ) AND (n.debit_account_id = a.id OR n.credit_account_id = a.id)
        ORDER BY p.seq DESC LIMIT 1
    )
) AND (t.debit_account_id = a.id OR t.credit_account_id = a.id)
ORDER BY a.id
"""


def balances_at(conn: Connection, seq: int, *, postings: bool = True) -> dict[int, int]:
    """Every account open at `seq` -> its balance right after that transfer
    (`BALANCES_AT_SQL`; the caller checks `seq` against the head). `postings` false: a
    ledger before revision 0007, read with revision 0005's query."""
    sql = BALANCES_AT_SQL if postings else INDEXED_BALANCES_AT_SQL
    rows = conn.execute(text(sql), {"seq": seq})
    return {int(account): int(balance) for account, _name, balance in rows}


# -- ledgers before revision 0007 (read by `bank.ledger.reader` without an upgrade) ---------


def _side_rows(
    account_id: int, after_seq: int, *, debit: bool, descending: bool
) -> Select[tuple[int]]:
    """The rows past the cursor with the account on one side (a range of its index)."""
    column = transfers.c.debit_account_id if debit else transfers.c.credit_account_id
    stmt = select(*_RECEIPT_COLUMNS).where(column == account_id)
    if descending:
        return stmt.where(transfers.c.seq < after_seq) if after_seq else stmt
    return stmt.where(transfers.c.seq > after_seq)


def _side_first(
    stmt: Select[Any], column: ColumnElement[int], limit: int, *, descending: bool
) -> Subquery:
    """A side's first `limit` rows in the account's own index order, as a subquery
    (ordered by (account, seq), so that PostgreSQL walks the (account, seq) index)."""
    order = (column.desc(), transfers.c.seq.desc()) if descending else (column, transfers.c.seq)
    return stmt.order_by(*order).limit(limit).subquery()


def _indexed_history_page(
    conn: Connection, account_id: int, after_seq: int, limit: int, *, descending: bool
) -> list[Receipt]:
    """`history_page` of revisions 0005-0006: one compound SELECT of the two sides."""
    both = union_all(
        _side_rows(account_id, after_seq, debit=True, descending=descending),
        _side_rows(account_id, after_seq, debit=False, descending=descending),
    )
    seq = both.selected_columns.seq
    stmt = both.order_by(seq.desc() if descending else seq).limit(limit)
    return [_new(Receipt, row) for row in conn.execute(stmt)]


def _indexed_balance_at(conn: Connection, account_id: int, seq: int) -> int:
    """`balance_at` of revisions 0005-0006: the newer of one look-up in each index."""
    sides = [
        _side_first(
            select(transfers.c.seq, balance.label("balance")).where(
                column == account_id, transfers.c.seq <= seq
            ),
            column,
            1,
            descending=True,
        )
        for column, balance in (
            (transfers.c.debit_account_id, transfers.c.debit_balance),
            (transfers.c.credit_account_id, transfers.c.credit_balance),
        )
    ]
    both = union_all(*(select(*side.c) for side in sides)).subquery()
    stmt = select(both.c.seq, both.c.balance).order_by(both.c.seq.desc()).limit(1)
    row = conn.execute(stmt).first()
    return int(row[1]) if row is not None else 0


#: `BALANCES_AT_SQL` of revisions 0005-0006 (no postings): the newer of each account's last
#: debit and last credit row at or before `:seq`.
INDEXED_BALANCES_AT_SQL: Final = """
SELECT a.id AS account_id, a.name AS name,
    CASE
        WHEN d.seq IS NULL AND c.seq IS NULL THEN 0
        WHEN c.seq IS NULL OR d.seq > c.seq THEN d.debit_balance
        ELSE c.credit_balance
    END AS balance
FROM accounts AS a
JOIN (
    SELECT account_id, MIN(transfer_seq) AS opened FROM account_events
    WHERE kind = 'open' GROUP BY account_id
) AS o ON o.account_id = a.id AND o.opened <= :seq
LEFT JOIN transfers AS d ON d.seq = (
    SELECT MAX(seq) FROM transfers WHERE debit_account_id = a.id AND seq <= :seq
)
LEFT JOIN transfers AS c ON c.seq = (
    SELECT MAX(seq) FROM transfers WHERE credit_account_id = a.id AND seq <= :seq
)
ORDER BY a.id
"""
