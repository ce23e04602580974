"""`bank copy`: a ledger copied verbatim to another store, then audited (`bank.ledger.copy`)."""

from __future__ import annotations

import argparse
import json
import sys

from bank.cli.common import Subcommands
from bank.exit_codes import EXIT_OK, EXIT_PROBLEM


def register(sub: Subcommands) -> None:
    """Add `copy` to the `bank` parser."""
    cpy = sub.add_parser(
        "copy",
        help="copy a ledger verbatim to another store, e.g. SQLite to PostgreSQL "
        "(exit 0 copied and clean, 1 problems, 2 could not copy)",
        description=(
            "Copy the ledger at SRC into the empty store at DST (a new file, or an empty "
            "PostgreSQL database made with createdb), row for row: same seqs, same hashes, "
            "same chain formats, in one transaction. SRC is read through one consistent "
            "snapshot, so a bank may keep writing it (the copy is then that snapshot). DST "
            "is locked for the whole copy; a failed or interrupted copy leaves it empty. The "
            "copy is then audited with --expect-head set to the source's head. "
            "Exit 0 when the copy audits clean with the source's head, 1 when the audit "
            "found problems (a damaged source shows up there: audit it too), 2 when the copy "
            "could not run (SRC missing, not a ledger or not at the newest schema revision: "
            "`bank init --db SRC` upgrades it; DST not empty, busy or unreachable)."
        ),
    )
    cpy.add_argument(
        "--from",
        dest="source",
        metavar="SRC",
        required=True,
        help="the ledger to copy: a file path or an SQLAlchemy URL",
    )
    cpy.add_argument(
        "--to",
        dest="destination",
        metavar="DST",
        required=True,
        help="where to copy it: a new file path, or the URL of an empty database "
        "(postgresql://user@host/db)",
    )
    cpy.add_argument("--json", action="store_true", help="print the report as JSON")
    cpy.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Copy, then print the copy's figures and its audit."""
    from bank.ledger.audit_report import print_report
    from bank.ledger.copy import copy_ledger

    report = copy_ledger(args.source, args.destination)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return EXIT_OK if report.ok else EXIT_PROBLEM
    counts = ", ".join(f"{n:,} {table}" for table, n in report.rows.items())
    print(
        f"copied {report.source} -> {report.destination}: {report.rows_total:,} rows ({counts}) "
        f"in {report.copy_s:.2f} s ({report.rows_per_s:,.0f} rows/s)"
    )
    print(f"source head      {report.source_head}")
    verdict = "(the same)" if report.heads_match else "(DIFFERENT)"
    print(f"destination head {report.destination_head} {verdict}")
    print_report(report.audit, sys.stdout)
    if not report.ok:
        print(
            "the copy holds the source's rows as they are, so the source is damaged too: "
            f"`bank audit --db {report.source}` tells; do not open the copy",
            file=sys.stderr,
        )
        return EXIT_PROBLEM
    print(f"open the copy with Bank.open({report.destination!r})")
    return EXIT_OK
