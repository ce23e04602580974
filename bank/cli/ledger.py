"""`bank init`, `bank accounts`, `bank history`, `bank balance`: create a ledger and read it
(`bank.ledger.reader`)."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from itertools import islice
from typing import TextIO

from rich.console import JustifyMethod
from rich.table import Table

from bank.cli.common import Subcommands, backend, console, existing_ledger, int_range
from bank.engine import Bank
from bank.errors import AccountNotFound
from bank.exit_codes import EXIT_OK
from bank.ledger.reader import LedgerReader
from bank.limits import CASH_ACCOUNT_ID
from bank.money import format_minor
from bank.records import AccountInfo


def register(sub: Subcommands) -> None:
    """Add `init`, `accounts`, `history` and `balance` to the `bank` parser."""
    ini = sub.add_parser(
        "init",
        help="create a ledger, or upgrade one to the newest schema",
        description="Create a new ledger at PATH, or migrate an existing one to the newest "
        "schema; print its revision and accounts. A file that is not a ledger is refused "
        "(exit 2) and left untouched.",
    )
    ini.add_argument(
        "--db",
        metavar="PATH|URL",
        required=True,
        help="the ledger: a file path or an SQLAlchemy URL",
    )
    ini.set_defaults(run=run_init)

    acc = sub.add_parser(
        "accounts",
        help="list the accounts of a ledger with their balances",
        description="List every account (@cash included) with its balance and overdraft "
        "limit. Amounts are printed in major units; --json gives exact integer minor units.",
    )
    acc.add_argument(
        "--db",
        metavar="PATH|URL",
        required=True,
        help="an existing ledger: a file path or an SQLAlchemy URL",
    )
    acc.add_argument("--json", action="store_true", help="print JSON (amounts in minor units)")
    acc.set_defaults(run=run_accounts)

    his = sub.add_parser(
        "history",
        help="list one account's transfers",
        description="List the committed transfers (deposits, withdrawals, transfers) that "
        "touch ACCOUNT, oldest first.",
    )
    his.add_argument("account", metavar="ACCOUNT", help="account id, or account name")
    his.add_argument(
        "--db",
        metavar="PATH|URL",
        required=True,
        help="an existing ledger: a file path or an SQLAlchemy URL",
    )
    his.add_argument(
        "--limit",
        type=int_range(1, 10**9),
        metavar="N",
        help="show at most the first N transfers",
    )
    his.add_argument("--json", action="store_true", help="print JSON (amounts in minor units)")
    his.set_defaults(run=run_history)

    bal = sub.add_parser(
        "balance",
        help="one account's balance, now or as of a seq",
        description="Print ACCOUNT's committed balance, or with --at-seq N its balance right "
        "after transfer N (index look-ups, read-only: safe beside a running bank). Exit 1 if "
        "the account does not exist or N is past the last committed transfer.",
    )
    bal.add_argument("account", metavar="ACCOUNT", help="account id, or account name")
    bal.add_argument(
        "--db",
        metavar="PATH|URL",
        required=True,
        help="an existing ledger: a file path or an SQLAlchemy URL",
    )
    bal.add_argument(
        "--at-seq",
        type=int_range(0, 2**63 - 1),
        metavar="N",
        help="the balance right after transfer N (default: as of the last one)",
    )
    bal.add_argument("--json", action="store_true", help="print JSON (amounts in minor units)")
    bal.set_defaults(run=run_balance)


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


def _account_rows(bank: Bank) -> list[dict[str, int | str]]:
    """Every account with a balance from one snapshot (a consistent set)."""
    snapshot = bank.snapshot()
    accounts = [bank.account(CASH_ACCOUNT_ID), *bank.accounts()]
    return [
        {
            "id": a.id,
            "name": a.name,
            "balance": snapshot.balances.get(a.id, 0),
            "overdraft_limit": a.overdraft_limit,
        }
        for a in accounts
    ]


def _info_rows(infos: list[AccountInfo]) -> list[dict[str, int | str]]:
    return [
        {"id": a.id, "name": a.name, "balance": a.balance, "overdraft_limit": a.overdraft_limit}
        for a in infos
    ]


def _print_accounts(rows: list[dict[str, int | str]], out: TextIO) -> None:
    table = Table(title=f"{len(rows) - 1} customer account(s)", title_justify="left")
    table.add_column("id", justify="right")
    table.add_column("name")
    table.add_column("balance", justify="right")
    table.add_column("overdraft limit", justify="right")
    for row in rows:
        balance, limit = row["balance"], row["overdraft_limit"]
        assert isinstance(balance, int) and isinstance(limit, int)
        shown_limit = "none" if row["id"] == CASH_ACCOUNT_ID else format_minor(limit)
        table.add_row(str(row["id"]), str(row["name"]), format_minor(balance), shown_limit)
    console(out).print(table)


def run_accounts(args: argparse.Namespace) -> int:
    """List the accounts, read-only."""
    # Read-only: works while a bank runs on the file, never migrates or locks it.
    with LedgerReader(existing_ledger(args.db)) as reader:
        rows = _info_rows(reader.accounts())
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _print_accounts(rows, sys.stdout)
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
    """List one account's transfers, read-only."""
    with LedgerReader(existing_ledger(args.db)) as reader:
        accounts = reader.accounts()
        account_id = _resolve_account(accounts, args.account)
        # Every receipt, or the first --limit, streamed in pages (`iter_history`).
        receipts = list(islice(reader.iter_history(account_id), args.limit))
    names = {a.id: a.name for a in accounts}
    if args.json:
        print(json.dumps([r._asdict() for r in receipts], indent=2))
        return EXIT_OK
    title = f"history of {names.get(account_id, account_id)} (id {account_id}): "
    table = Table(title=title + f"{len(receipts)} transfer(s)", title_justify="left")
    columns: list[tuple[str, JustifyMethod]] = [
        ("seq", "right"),
        ("time (UTC)", "left"),
        ("kind", "left"),
        ("from", "left"),
        ("to", "left"),
        ("amount", "right"),
        ("key", "left"),
    ]
    for column, justify in columns:
        table.add_column(column, justify=justify, no_wrap=column != "key")
    for r in receipts:
        when = datetime.fromtimestamp(r.ts_us / 1_000_000, tz=UTC).replace(tzinfo=None)
        signed = -r.amount if r.debit_account == account_id else r.amount
        table.add_row(
            str(r.seq),
            when.isoformat(" ", "milliseconds"),
            r.kind,
            names.get(r.debit_account, str(r.debit_account)),
            names.get(r.credit_account, str(r.credit_account)),
            format_minor(signed),
            r.key or "",
        )
    console(sys.stdout).print(table)
    return EXIT_OK
