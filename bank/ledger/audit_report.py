"""How an audit is shown: a short human table (rich) or JSON, and the exit code.

`run_audit_command` is the whole of `bank audit`: the CLI only parses arguments
and calls it, so scripts and tests get the same output and exit codes. rich is the
`simulate` extra's: without it the same report is printed as plain text.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Final, TextIO

from bank.errors import CannotAudit
from bank.exit_codes import EXIT_OK, EXIT_PROBLEM, EXIT_USAGE

if TYPE_CHECKING:
    from rich.console import Console
from bank.ledger.audit import AuditReport, audit_ledger

EXIT_CLEAN: Final = EXIT_OK
EXIT_PROBLEMS: Final = EXIT_PROBLEM
EXIT_CANNOT_AUDIT: Final = EXIT_USAGE

#: Problems listed in the human table; the rest are counted (use --json for all kept).
TABLE_ROWS_MAX: Final = 50
_VALUE_CHARS_MAX: Final = 20


def exit_code(report: AuditReport) -> int:
    """0 for a clean ledger, 1 when the audit found problems."""
    return EXIT_CLEAN if report.ok else EXIT_PROBLEMS


def _short(value: object) -> str:
    text = "" if value is None else str(value)
    if len(text) > _VALUE_CHARS_MAX:
        return text[: _VALUE_CHARS_MAX - 1] + "…"
    return text


def render_report(report: AuditReport, console: Console) -> None:
    """Print the verdict, what was audited, and a table of the first problems."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    verdict = (
        Text("CLEAN", style="bold green")
        if report.ok
        else Text(f"{report.problems_total} PROBLEM(S)", style="bold red")
    )
    console.print(Text.assemble("audit of ", (report.path, "bold"), ": ", verdict))
    console.print(
        f"revision {report.revision}; transfers 1..{report.seq} "
        f"({report.transfers_checked:,} rows), {report.accounts_checked:,} accounts, "
        f"{report.account_events_checked:,} account events; "
        f"{report.duration_s:.2f} s",
        highlight=False,
    )
    # One value pins both chains: record it and pass it back as --expect-head.
    console.print(f"head {report.head}", highlight=False, soft_wrap=True)
    if report.expect_head is not None:
        pinned = "matches" if "head_mismatch" not in report.problem_counts else "DIFFERS from"
        console.print(f"     {pinned} the expected head", highlight=False)
    if report.ok:
        return
    counts = ", ".join(f"{kind} {n}" for kind, n in sorted(report.problem_counts.items()))
    console.print(f"by kind: {counts}", highlight=False)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for column, justify in (
        ("kind", "left"),
        ("seq", "right"),
        ("account", "right"),
        ("expected", "left"),
        ("found", "left"),
        ("what", "left"),
    ):
        table.add_column(column, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for p in report.problems[:TABLE_ROWS_MAX]:
        seq = "" if p.seq is None else str(p.seq)
        if p.event_seq is not None:
            seq = f"{seq} event {p.event_seq}".strip()
        table.add_row(
            p.kind,
            seq,
            "" if p.account is None else str(p.account),
            _short(p.expected),
            _short(p.found),
            p.message,
        )
    console.print(table)
    hidden = report.problems_total - min(len(report.problems), TABLE_ROWS_MAX)
    if hidden:
        console.print(f"... and {hidden:,} more (--json lists the first {len(report.problems):,})")


def run_audit_command(
    db: str, *, as_json: bool, expect_head: str | None, out: TextIO, err: TextIO | None = None
) -> int:
    """`bank audit --db PATH [--json] [--expect-head HEAD]`: print the audit, return the exit code.

    0 clean, 1 problems found, 2 could not audit (with a one-line reason on `err`,
    stderr by default; in JSON mode an object `{"ok": false, "error": ...}` on `out`);
    an `expect_head` that is not a `SEQ:HASH/EVENT_SEQ:EVENT_HASH` head is exit 2 too.
    """
    try:
        report = audit_ledger(db, expect_head=expect_head)
    except CannotAudit as exc:
        if as_json:
            out.write(
                json.dumps({"ok": False, "error": str(exc), "exit_code": EXIT_CANNOT_AUDIT}) + "\n"
            )
        else:
            print(f"bank audit: cannot audit: {exc}", file=sys.stderr if err is None else err)
        return EXIT_CANNOT_AUDIT
    if as_json:
        out.write(report.to_json() + "\n")
    else:
        print_report(report, out)
    return exit_code(report)


def print_report(report: AuditReport, out: TextIO) -> None:
    """`render_report` on `out`: rich when installed, else `render_plain`."""
    try:
        from rich.console import Console
    except ImportError:
        render_plain(report, out)
        return
    # A terminal keeps its width; a pipe or file gets lines long enough not to wrap.
    width = None if out.isatty() else 160
    render_report(report, Console(file=out, width=width, highlight=False))


def render_plain(report: AuditReport, out: TextIO) -> None:
    """The report of `render_report` as plain lines (no rich): one line per problem."""
    verdict = "CLEAN" if report.ok else f"{report.problems_total} PROBLEM(S)"
    lines = [
        f"audit of {report.path}: {verdict}",
        f"revision {report.revision}; transfers 1..{report.seq} "
        f"({report.transfers_checked:,} rows), {report.accounts_checked:,} accounts, "
        f"{report.account_events_checked:,} account events; {report.duration_s:.2f} s",
        f"head {report.head}",
    ]
    if report.expect_head is not None:
        pinned = "matches" if "head_mismatch" not in report.problem_counts else "DIFFERS from"
        lines.append(f"     {pinned} the expected head")
    if not report.ok:
        counts = ", ".join(f"{kind} {n}" for kind, n in sorted(report.problem_counts.items()))
        lines.append(f"by kind: {counts}")
        for p in report.problems[:TABLE_ROWS_MAX]:
            where = "" if p.seq is None else f" seq {p.seq}"
            where += "" if p.event_seq is None else f" event {p.event_seq}"
            where += "" if p.account is None else f" account {p.account}"
            lines.append(
                f"{p.kind}{where}: {p.message} "
                f"(expected {_short(p.expected)}, found {_short(p.found)})"
            )
        hidden = report.problems_total - min(len(report.problems), TABLE_ROWS_MAX)
        if hidden:
            lines.append(
                f"... and {hidden:,} more (--json lists the first {len(report.problems):,})"
            )
    out.write("\n".join(lines) + "\n")
