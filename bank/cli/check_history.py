"""`bank check-history`: a `simulate --history` file against its ledger (`bank.check_history`)."""

from __future__ import annotations

import argparse
import sys

from bank.cli.common import DB_HELP, Subcommands, error
from bank.exit_codes import EXIT_USAGE


def register(sub: Subcommands) -> None:
    """Add `check-history` to the `bank` parser."""
    chk = sub.add_parser(
        "check-history",
        help="check a `simulate --history` file against its ledger (exit 0/1/2 like audit)",
        description=(
            "Check a history recorded by `bank simulate --history` against the ledger, "
            "read-only: every acknowledged operation is in the ledger once at its seq, no "
            "refused one is, each unknown one at most once; snapshots sum to 0, respect the "
            "limits and equal the replay; real-time order; every refusal justified by the "
            "replayed balances; exactly-once per key. Exit 0 consistent, 1 violations found, "
            "2 could not check (missing or malformed history, not a ledger, another ledger)."
        ),
    )
    chk.add_argument("file", metavar="FILE", help="the history file (JSON lines)")
    chk.add_argument("--db", metavar="PATH|URL", required=True, help=DB_HELP)
    chk.add_argument("--json", action="store_true", help="print the result as JSON")
    chk.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Check the history and print the verdict."""
    from bank.check_history import run_check_history_command
    from bank.errors import CannotCheckHistory

    try:
        return run_check_history_command(args.file, args.db, as_json=args.json, out=sys.stdout)
    except CannotCheckHistory as exc:
        error(args.command, str(exc))
        return EXIT_USAGE
