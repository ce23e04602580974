"""Postings: each account's rows in seq order, written in sorted runs (revision 0007).

Why: history pages and balances as of a seq need an account's rows in seq order.
Revision 0005 kept them in two indexes on `transfers`, (debit_account_id, seq) and
(credit_account_id, seq); every commit then dirtied the last leaf page of every
account it touched in both (hundreds of random pages per commit: SQLite's pipelined
transfers/s fell by ~45%). Here the same order lives in `postings`, whose primary
key is (account_id, seq), and it is written rarely and in order:

- `postings` holds two rows per transfer at or below the watermark W (its debit and
  its credit account, with its seq); `postings_upto` holds W, one row.
- The batch writers (`bank.ledger.sqlite.writer`, `bank.ledger.postgres.writer`)
  keep W in memory (read when they open). Once a batch brings the head to W +
  `POSTINGS_RUN_ROWS` or more, the same transaction, before its COMMIT, adds the
  postings of every row in (W, head] as ONE `INSERT ... SELECT ... ORDER BY
  account_id, seq` (`flush_sql`: each touched leaf page written once, in key order)
  and moves W to the head (`advance_sql`, which also checks that W is what the
  writer thinks). A rollback or a crash loses both or neither.
- Readers (`bank.ledger.store`) take an account's rows up to W from a range of the
  postings key joined to `transfers` by seq, and the rows above W (the tail: about
  `POSTINGS_RUN_ROWS` plus a batch at most, whoever wrote them) from a range of
  `transfers` by seq. Every read is ONE statement, so W, the postings and the tail
  come from one snapshot on both backends (PostgreSQL's READ COMMITTED included).
  A posting whose transfer does not name the account is never followed (the join
  says so: such a page comes out one row short, a point balance steps past it); the
  audit reports postings that disagree with `transfers`.

The SQL texts here are plain SQL that both backends run. The flush's placeholders
are named by the caller (SQLite's `?1`, psycopg's `%(upto)b`); the reads are
SQLAlchemy `text()` with `:name` parameters. History pages come in two forms, both
correct anywhere, each chosen for how one planner runs it (`history_sql`).
"""

from __future__ import annotations

from typing import Final

from sqlalchemy import Connection, text

#: How many transfer rows accumulate above W before a batch writes their postings.
#: Read at flush time (`bank.ledger.postings.POSTINGS_RUN_ROWS`), so tests can lower it.
#: Measured (raw sqlite3, 200,000 rows, 1,000 accounts, 512-row commits, WAL +
#: synchronous=FULL): no indexes 82.7k rows/s, 0005's two indexes 40.0k/s, a sorted
#: run every 8,192 rows 76.4k/s; a tail of that size costs a read a few milliseconds.
POSTINGS_RUN_ROWS: Final = 8192

#: The revision that created `postings` and `postings_upto`.
POSTINGS_REVISION: Final = "0007"


def flush_sql(low: str, high: str) -> str:
    """The postings of the rows with seq in (`low`, `high`], in primary-key order
    (`low` and `high` are the backend's placeholders for W and the head)."""
    rows = f"FROM transfers WHERE seq > {low} AND seq <= {high}"
    return (
        "INSERT INTO postings (account_id, seq) SELECT account_id, seq FROM ("
        f"SELECT debit_account_id AS account_id, seq {rows} "
        f"UNION ALL SELECT credit_account_id AS account_id, seq {rows}"
        ") AS sides ORDER BY account_id, seq"
    )


def advance_sql(low: str, high: str) -> str:
    """W from `low` to `high`: changes one row only if W is `low` (what the writer read)."""
    return f"UPDATE postings_upto SET seq = {high} WHERE id = 1 AND seq = {low}"


def flush_due(upto: int, head: int) -> bool:
    """Whether a batch that brings the head to `head` writes the postings above `upto`."""
    return head - upto >= POSTINGS_RUN_ROWS


def rebuild_postings(conn: Connection, head: int) -> int:
    """Every posting of the rows up to `head` from scratch, and W = `head`, in `conn`'s
    transaction (a ledger whose rows were copied in, `bank.ledger.copy`); returns how many
    postings it wrote. One sorted INSERT, as the writers' flush."""
    conn.execute(text("DELETE FROM postings"))
    written = conn.execute(text(flush_sql(":upto", ":head")), {"upto": 0, "head": head})
    conn.execute(text("DELETE FROM postings_upto"))
    conn.execute(text("INSERT INTO postings_upto (id, seq) VALUES (1, :head)"), {"head": head})
    return int(written.rowcount)


# -- reads (SQLAlchemy text, one statement each) --------------------------------------------

#: The columns of a `Receipt`, in its field order, of the transfers row `t`.
RECEIPT_SELECT: Final = (
    "t.seq, t.kind, t.key, t.amount, t.debit_account_id, t.credit_account_id, t.ts_us, "
    "t.hash, t.hold_seq, t.expires_us, t.link_first, t.link_count"
)
_RECEIPT_NAMES: Final = (
    "seq, kind, key, amount, debit_account_id, credit_account_id, ts_us, hash, hold_seq, "
    "expires_us, link_first, link_count"
)
#: `t` names the account on one side or the other.
_NAMES = "(t.debit_account_id = :account OR t.credit_account_id = :account)"
#: W, and the smaller/larger of W and a bound (one bound per range: a planner given two
#: lower or two upper bounds may range over the weaker one and filter the rest).
_W = "(SELECT u.seq FROM postings_upto AS u)"


def _least_w(bound: str) -> str:
    return f"(SELECT CASE WHEN u.seq < {bound} THEN u.seq ELSE {bound} END FROM postings_upto AS u)"


def _greatest_w(bound: str) -> str:
    return f"(SELECT CASE WHEN u.seq > {bound} THEN u.seq ELSE {bound} END FROM postings_upto AS u)"


#: Ascending page: rows with seq > :after. The postings arm is first a range of the key
#: (account, (after, W]) in order, cut at :limit (a subquery with its own LIMIT: neither
#: planner merges it into the join, so neither can trade the early stop for a hash join
#: over `transfers`, which PostgreSQL did for a busy account when the join's filter made
#: it expect fewer than :limit rows), then joined to `transfers` by seq. The tail arm is a
#: range of `transfers` by seq above max(W, :after). A forged posting (its transfer does
#: not name the account) is dropped by the join after the cut, so its page comes out one
#: row short and the tail arm may fill it past real rows below W (attack finding 2; the
#: audit reports the posting). SQLite's merged form below filters before its LIMIT.
HISTORY_ASC_SQL: Final = f"""
SELECT {_RECEIPT_NAMES} FROM (
    SELECT * FROM (
        SELECT {RECEIPT_SELECT} FROM (
            SELECT p.seq FROM postings AS p
            WHERE p.account_id = :account AND p.seq > :after AND p.seq <= {_W}
            ORDER BY p.seq LIMIT :limit
        ) AS picked JOIN transfers AS t ON t.seq = picked.seq
        WHERE {_NAMES}
    ) AS posted
    UNION ALL
    SELECT * FROM (
        SELECT {RECEIPT_SELECT} FROM transfers AS t
        WHERE t.seq > {_greatest_w(":after")} AND {_NAMES}
        ORDER BY t.seq LIMIT :limit
    ) AS tail
) AS page
ORDER BY seq LIMIT :limit
"""

#: Descending page: rows with seq <= :upper (the cursor minus one), newest first.
HISTORY_DESC_SQL: Final = f"""
SELECT {_RECEIPT_NAMES} FROM (
    SELECT * FROM (
        SELECT {RECEIPT_SELECT} FROM (
            SELECT p.seq FROM postings AS p
            WHERE p.account_id = :account AND p.seq <= {_least_w(":upper")}
            ORDER BY p.seq DESC LIMIT :limit
        ) AS picked JOIN transfers AS t ON t.seq = picked.seq
        WHERE {_NAMES}
    ) AS posted
    UNION ALL
    SELECT * FROM (
        SELECT {RECEIPT_SELECT} FROM transfers AS t
        WHERE t.seq > {_W} AND t.seq <= :upper AND {_NAMES}
        ORDER BY t.seq DESC LIMIT :limit
    ) AS tail
) AS page
ORDER BY seq DESC LIMIT :limit
"""

#: The same pages as one plain compound (SQLite's: `bank.ledger.sqlite.reads`): each
#: arm is delivered in seq order (the postings arm selects `p.seq`, in the key's order
#: for one account; the tail arm is a range of the rowid), so SQLite merges them as it reads (`MERGE (UNION ALL)`) and
#: stops after :limit rows, with no sort and without reading the rest of the tail
#: (measured on 1,000,000 rows, a 1,000-row page of an account with 100,000: 4.0 ms
#: against 11.9 ms for the form above, on a loaded machine). PostgreSQL must not get
#: this form: it expects the filtered join to yield fewer than :limit rows and sorts
#: the account's whole range (225 ms).
MERGED_HISTORY_ASC_SQL: Final = f"""
SELECT p.seq AS seq, {RECEIPT_SELECT.removeprefix("t.seq, ")}
FROM postings AS p JOIN transfers AS t ON t.seq = p.seq
WHERE p.account_id = :account AND p.seq > :after AND p.seq <= {_W} AND {_NAMES}
UNION ALL
SELECT {RECEIPT_SELECT} FROM transfers AS t
WHERE t.seq > {_greatest_w(":after")} AND {_NAMES}
ORDER BY seq LIMIT :limit
"""
MERGED_HISTORY_DESC_SQL: Final = f"""
SELECT p.seq AS seq, {RECEIPT_SELECT.removeprefix("t.seq, ")}
FROM postings AS p JOIN transfers AS t ON t.seq = p.seq
WHERE p.account_id = :account AND p.seq <= {_least_w(":upper")} AND {_NAMES}
UNION ALL
SELECT {RECEIPT_SELECT} FROM transfers AS t
WHERE t.seq > {_W} AND t.seq <= :upper AND {_NAMES}
ORDER BY seq DESC LIMIT :limit
"""


def history_sql(*, merged: bool, descending: bool) -> str:
    """The page statement: the MERGED_ form for a planner that merges a compound's ordered
    arms as it reads (each backend's `reads.MERGES_ORDERED_ARMS`), else the cut form."""
    if merged:
        return MERGED_HISTORY_DESC_SQL if descending else MERGED_HISTORY_ASC_SQL
    return HISTORY_DESC_SQL if descending else HISTORY_ASC_SQL


#: The account's balance right after transfer :seq: the running balance, on the account's
#: side, of its newest row at or before :seq: from the tail if it has one in (W, :seq],
#: else its newest posting at or before min(:seq, W) (one backward step of the key). No
#: row: no result (the caller's 0). COALESCE stops at its first non-NULL argument.
BALANCE_AT_SQL: Final = f"""
SELECT CASE WHEN t.debit_account_id = :account THEN t.debit_balance ELSE t.credit_balance END
FROM transfers AS t
WHERE t.seq = COALESCE(
    (SELECT MAX(t.seq) FROM transfers AS t
        WHERE t.seq > {_W} AND t.seq <= :seq AND {_NAMES}),
    (SELECT p.seq FROM postings AS p JOIN transfers AS t ON t.seq = p.seq
        WHERE p.account_id = :account AND p.seq <= {_least_w(":seq")} AND {_NAMES}
        ORDER BY p.seq DESC LIMIT 1)
)
"""
