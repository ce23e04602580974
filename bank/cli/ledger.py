"""`bank init`, `bank accounts`, `bank history`, `bank balance`: create a ledger and read it
(`bank.ledger.reader`).

`accounts` and `history` read without owning the ledger (they work while a bank runs on
it) and print with `bank.cli.output`: a table on a terminal, JSON into a pipe, or what
`--format` says. `history` reads one page at a time and prints it before reading the next,
so memory stays at one page whatever the account's length.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from itertools import islice
from typing import Final, TextIO

from bank.cli.common import (
    DB_HELP,
    EXISTING_DB_HELP,
    Subcommands,
    backend,
    existing_ledger,
    int_range,
)
from bank.cli.output import (
    FORMATS,
    WRITERS,
    Column,
    choose_format,
    terminal_width,
    write_table,
)
from bank.engine import Bank
from bank.errors import AccountNotFound
from bank.exit_codes import EXIT_OK
from bank.ledger import store
from bank.ledger.reader import LedgerReader
from bank.limits import CASH_ACCOUNT_ID
from bank.money import format_minor
from bank.records import AccountInfo, AccountSummary, Receipt

#: Receipts `history` reads per page (one short read each; memory is about one page).
HISTORY_PAGE: Final = 10_000
#: The largest `--limit` (and `--after-seq`: a seq is a signed 64-bit integer).
LIMIT_MAX: Final = 2**63 - 1

ACCOUNT_FIELDS: Final = AccountSummary._fields
RECEIPT_FIELDS: Final = Receipt._fields

_FORMAT_HELP = (
    "table (aligned, amounts in major units, fitted to the terminal), json (an array of "
    "objects, one per line), csv (a header, then one row each) or nl (one JSON object per "
    "line); the machine formats give amounts as integer minor units. Default: table on a "
    "terminal, json otherwise (as sqlite-utils)"
)


def register(sub: Subcommands) -> None:
    """Add `init`, `accounts` and `history` to the `bank` parser."""
    ini = sub.add_parser(
        "init",
        help="create a ledger, or upgrade one to the newest schema",
        description="Create a new ledger at PATH, or migrate an existing one to the newest "
        "schema; print its revision and accounts. A file that is not a ledger is refused "
        "(exit 2) and left untouched.",
    )
    ini.add_argument("--db", metavar="PATH|URL", required=True, help=DB_HELP)
    ini.set_defaults(run=run_init)

    acc = sub.add_parser(
        "accounts",
        help="list the accounts of a ledger with their balances",
        description="List every account (@cash included) with its balance and overdraft "
        "limit, read-only (a bank may be running on the ledger).",
    )
    acc.add_argument("--db", metavar="PATH|URL", required=True, help=EXISTING_DB_HELP)
    _add_format(acc)
    acc.set_defaults(run=run_accounts)

    his = sub.add_parser(
        "history",
        help="list one account's transfers (paged, streamed)",
        description="List the committed transfers (deposits, withdrawals, transfers) that "
        "touch ACCOUNT, oldest first (--reverse: newest first), read-only. Rows are read "
        "and printed a page at a time, so any length streams in flat memory. To page: "
        "pass the last seq printed as --after-seq, with the same --reverse.",
    )
    his.add_argument("account", metavar="ACCOUNT", help="account id, or account name")
    his.add_argument("--db", metavar="PATH|URL", required=True, help=EXISTING_DB_HELP)
    his.add_argument(
        "--after-seq",
        type=int_range(0, LIMIT_MAX),
        default=0,
        metavar="SEQ",
        help="start after this seq in the listing's order: transfers with a greater seq, "
        "or with --reverse a smaller one (default: from the start)",
    )
    his.add_argument(
        "--limit",
        type=int_range(1, LIMIT_MAX),
        metavar="N",
        help="show at most N transfers (default: all)",
    )
    his.add_argument(
        "--reverse", action="store_true", help="newest first (e.g. --reverse --limit 20)"
    )
    _add_format(his)
    his.set_defaults(run=run_history)

    bal = sub.add_parser(
        "balance",
        help="one account's balance, now or as of a seq",
        description="Print ACCOUNT's committed balance, or with --at-seq N its balance right "
        "after transfer N (key look-ups, read-only: safe beside a running bank). Exit 1 if "
        "the account does not exist or N is past the last committed transfer.",
    )
    bal.add_argument("account", metavar="ACCOUNT", help="account id, or account name")
    bal.add_argument("--db", metavar="PATH|URL", required=True, help=EXISTING_DB_HELP)
    bal.add_argument(
        "--at-seq",
        type=int_range(0, 2**63 - 1),
        metavar="N",
        help="the balance right after transfer N (default: as of the last one)",
    )
    bal.add_argument("--json", action="store_true", help="print JSON (amounts in minor units)")
    bal.set_defaults(run=run_balance)


def _add_format(parser: argparse.ArgumentParser) -> None:
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument("--format", choices=FORMATS, help=_FORMAT_HELP)
    shown.add_argument(
        "--json",
        dest="format",
        action="store_const",
        const="json",
        help="the same as --format json",
    )


def run_init(args: argparse.Namespace) -> int:
    """Create or upgrade the ledger, then list its accounts."""
    found = backend(args.db)
    path = found.path
    existed = path is None or (path.exists() and path.stat().st_size > 0)
    with Bank.open(args.db) as bank:
        revision = bank.revision
        rows = _account_rows(bank)
    verb = "opened existing" if existed else "created"
    shown = args.db if path is not None else found.where  # a URL's password stays hidden
    print(f"{verb} ledger {shown}: schema revision {revision} (the newest)")
    _print_accounts(rows, sys.stdout)
    return EXIT_OK


def _account_rows(bank: Bank) -> list[AccountSummary]:
    """Every account with a balance from one snapshot (a consistent set of balances)."""
    snapshot = bank.snapshot()
    accounts = [bank.account(CASH_ACCOUNT_ID), *bank.accounts()]
    return [
        AccountSummary.of(
            a.id, a.name, snapshot.balances.get(a.id, 0), a.overdraft_limit, a.held, a.closed
        )
        for a in accounts
    ]


def _print_accounts(rows: list[AccountSummary], out: TextIO) -> None:
    columns = [
        Column("id", right=True),
        Column("name", flexible=True),
        Column("balance", right=True),
        Column("held", right=True),
        Column("available", right=True),
        Column("overdraft limit", right=True),
        Column("status"),
    ]
    cells = (
        (
            str(a.id),
            a.name,
            format_minor(a.balance),
            format_minor(a.held),
            "-" if a.available is None else format_minor(a.available),
            "none" if a.id == CASH_ACCOUNT_ID else format_minor(a.overdraft_limit),
            "closed" if a.closed else "open",
        )
        for a in rows
    )
    write_table(columns, cells, out, width=terminal_width(out))
    closed = sum(a.closed for a in rows)
    out.write(
        f"{len(rows) - 1} customer account(s)" + (f", {closed} closed" if closed else "") + "\n"
    )


def run_accounts(args: argparse.Namespace) -> int:
    """List the accounts, read-only."""
    with LedgerReader(existing_ledger(args.db)) as reader:
        rows = reader.account_summaries()
    shown = choose_format(args.format, sys.stdout)
    if shown == "table":
        _print_accounts(rows, sys.stdout)
    else:
        WRITERS[shown](ACCOUNT_FIELDS, rows, sys.stdout)
    return EXIT_OK


def _resolve_account(accounts: list[AccountInfo], text: str) -> int:
    """An account id from an id or a name (`@cash` is id 0)."""
    if text.strip().isdigit():
        account_id = int(text)
        if all(a.id != account_id for a in accounts):
            raise AccountNotFound(f"account {account_id} does not exist")
        return account_id
    for account in accounts:
        if account.name == text:
            return account.id
    raise AccountNotFound(f"no account named {text!r}")


def _receipts(
    reader: LedgerReader, account_id: int, after_seq: int, *, reverse: bool, limit: int | None
) -> Iterator[Receipt]:
    """The account's receipts past `after_seq` in the listing's order, one read per page
    (each its own snapshot: rows are only ever appended at the head, so pages never skip or
    repeat one; no read stays open while the output is written)."""
    size = HISTORY_PAGE if limit is None else min(HISTORY_PAGE, limit)

    def page_after(after: int) -> list[Receipt]:
        return reader.read(
            lambda conn: store.history_page(
                conn, account_id, after, size, descending=reverse, postings=reader.postings
            )
        )

    while True:
        page = page_after(after_seq)
        yield from page
        if len(page) < size:
            return
        after_seq = page[-1].seq


def run_balance(args: argparse.Namespace) -> int:
    """Print one account's balance (as of `--at-seq`), read-only."""
    with LedgerReader(existing_ledger(args.db)) as reader:
        accounts = reader.accounts()
        account_id = _resolve_account(accounts, args.account)
        balance = reader.balance(account_id, at_seq=args.at_seq)
    name = next(a.name for a in accounts if a.id == account_id)
    if args.json:
        shown = {"account": account_id, "name": name, "balance": balance, "at_seq": args.at_seq}
        print(json.dumps(shown))
        return EXIT_OK
    when = "now" if args.at_seq is None else f"after seq {args.at_seq}"
    print(f"{name} (id {account_id}): {format_minor(balance)} {when}")
    return EXIT_OK


def run_history(args: argparse.Namespace) -> int:
    """List one account's transfers, read-only, streamed page by page."""
    out = sys.stdout
    with LedgerReader(existing_ledger(args.db)) as reader:
        accounts = reader.accounts()
        account_id = _resolve_account(accounts, args.account)
        receipts = islice(
            _receipts(reader, account_id, args.after_seq, reverse=args.reverse, limit=args.limit),
            args.limit,
        )
        shown = choose_format(args.format, out)
        if shown != "table":
            WRITERS[shown](RECEIPT_FIELDS, receipts, out)
            return EXIT_OK
        names = {a.id: a.name for a in accounts}
        out.write(f"history of {names[account_id]} (id {account_id})\n")
        count = write_table(
            _HISTORY_COLUMNS,
            (_history_cells(r, account_id, names) for r in receipts),
            out,
            width=terminal_width(out),
        )
    out.write(f"{count:,} transfer(s)\n")
    return EXIT_OK


_HISTORY_COLUMNS: Final = (
    Column("seq", right=True),
    Column("time (UTC)"),
    Column("kind"),
    Column("from", flexible=True),
    Column("to", flexible=True),
    Column("amount", right=True),
    Column("key", flexible=True),
)


def _history_cells(r: Receipt, account_id: int, names: dict[int, str]) -> tuple[str, ...]:
    when = datetime.fromtimestamp(r.ts_us / 1_000_000, tz=UTC).replace(tzinfo=None)
    signed = -r.amount if r.debit_account == account_id else r.amount
    return (
        str(r.seq),
        when.isoformat(" ", "milliseconds"),
        r.kind,
        names.get(r.debit_account, str(r.debit_account)),
        names.get(r.credit_account, str(r.credit_account)),
        format_minor(signed),
        r.key or "",
    )
