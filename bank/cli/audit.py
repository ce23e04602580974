"""`bank audit`: verify a ledger read-only (the library's `bank.ledger.audit_report`)."""

from __future__ import annotations

import argparse
import sys

from bank.cli.common import DB_HELP, Subcommands
from bank.errors import CannotAudit


def register(sub: Subcommands) -> None:
    """Add `audit` to the `bank` parser."""
    aud = sub.add_parser(
        "audit",
        help="verify a ledger read-only (exit 0 clean, 1 problems, 2 could not audit)",
        description=(
            "Verify every invariant of a ledger without writing to it: its whole schema "
            "against the migrations, both hash chains, conservation, overdraft limits "
            "replayed in seq order, stored balances. "
            "Exit 0 clean, 1 problems found, 2 could not audit (missing file, not a ledger, ...)."
        ),
    )
    aud.add_argument("--db", metavar="PATH|URL", required=True, help=DB_HELP)
    aud.add_argument("--json", action="store_true", help="print the report as JSON")
    aud.add_argument(
        "--expect-head",
        metavar="HEAD",
        help="also fail unless both chains end where HEAD says: HEAD is the "
        "SEQ:HASH/EVENT_SEQ:EVENT_HASH value an earlier audit printed as `head`; it detects "
        "rows deleted, appended or re-hashed at the end of transfers or account_events "
        "(a bare transfers hash is refused: it would leave account events unpinned)",
    )
    aud.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Audit `--db` and print the report (a table, or JSON)."""
    try:
        from bank.ledger.audit_report import run_audit_command
    except ImportError:
        raise CannotAudit("the audit is not available in this build of bank") from None
    code: int = run_audit_command(
        args.db, as_json=args.json, expect_head=args.expect_head, out=sys.stdout
    )
    return code
