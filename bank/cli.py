"""The `bank` command line: thin commands over the library, errors turned into exit codes.

Exit codes, for every command:
  0    success (for `simulate`, `audit` and `copy`: the audit is clean)
  1    the command ran and found a problem (audit problems, a copy whose audit
       is not clean, a refused operation, an unknown account for `history`)
  2    usage errors and anything that could not be opened or audited: a missing
       file, a file that is not a ledger, a ledger written by a newer bank, a
       ledger another process has open, a copy into a store that is not empty
  130  `simulate` was interrupted with Ctrl-C (the run still finished its
       in-flight work, closed the ledger cleanly and audited it; a failed audit
       wins and exits 1)
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from rich.console import Console, JustifyMethod
from rich.table import Table

from bank.engine import Bank
from bank.errors import (
    AccountNotFound,
    BankError,
    CannotAudit,
    CannotCopy,
    LedgerBusy,
    NotALedger,
)
from bank.ledger.backend import Backend
from bank.ledger.backends import backend_for, ledger_url
from bank.ledger.reader import LedgerReader
from bank.limits import (
    AMOUNT_MAX,
    CASH_ACCOUNT_ID,
    QUEUE_CAPACITY_DEFAULT,
    QUEUE_CAPACITY_MAX,
    WORKERS_DEFAULT,
    WORKERS_MAX,
)
from bank.money import format_minor
from bank.records import AccountInfo

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

#: Errors that mean "could not open / could not audit": exit 2, not 1.
_OPEN_ERRORS: tuple[type[BankError], ...] = (NotALedger, LedgerBusy, CannotAudit, CannotCopy)


class _UsageError(Exception):
    """A bad argument found after parsing (exit 2 with the message)."""


# -- argument types ------------------------------------------------------------------------


def _int_range(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.replace("_", ""))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low:,} to {high:,}, got {value:,}")
        return value

    parse.__name__ = "integer"
    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value <= 7 * 86400:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most a week, got {text}")
    return value


def _spec(parser: Callable[[str], object]) -> Callable[[str], str]:
    """Validate a --mix/--skew text at parse time (clear message), keep the text."""

    def check(text: str) -> str:
        try:
            parser(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text

    check.__name__ = "spec"
    return check


# -- the parser ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The `bank` argument parser with every subcommand."""
    from bank.simulate import runner, workload

    parser = argparse.ArgumentParser(
        prog="bank",
        description="A simulated banking transaction engine on a hash-chained ledger (SQLite or PostgreSQL).",
        epilog=__doc__.split("\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    sim = sub.add_parser(
        "simulate",
        help="run a load simulation (tellers, mixes, hot accounts), then audit the ledger",
        description=(
            "Run a load simulation: TELLERS teller threads, each keeping up to WINDOW operations "
            "in flight, submit a seeded mix of deposits, withdrawals and transfers; a live "
            "progress bar shows ops/s, committed, rejected and queue depth; at the end a summary "
            "(throughput, latency percentiles, rejects by reason, queue high-water) is printed "
            "and the ledger is audited. Exit 0 only if the audit is clean; 1 if it is not; 130 "
            "if Ctrl-C cut the run short (in-flight work is still finished and audited; a "
            "second Ctrl-C aborts at once)."
        ),
    )
    sim.add_argument(
        "--db",
        metavar="PATH|URL",
        help="ledger file or URL (created if missing; simulation accounts are reused if present); "
        "default: a temporary ledger, deleted afterwards",
    )
    sim.add_argument(
        "--tellers",
        type=_int_range(1, runner.TELLERS_MAX),
        default=runner.TELLERS_DEFAULT,
        metavar="N",
        help=f"teller threads (default {runner.TELLERS_DEFAULT})",
    )
    sim.add_argument(
        "--window",
        type=_int_range(1, runner.WINDOW_MAX),
        default=runner.WINDOW_DEFAULT,
        metavar="N",
        help="operations each teller keeps in flight; 1 waits for every answer "
        f"(default {runner.WINDOW_DEFAULT})",
    )
    sim.add_argument(
        "--workers",
        type=_int_range(1, WORKERS_MAX),
        default=WORKERS_DEFAULT,
        metavar="N",
        help=f"the bank's worker threads (default {WORKERS_DEFAULT})",
    )
    sim.add_argument(
        "--accounts",
        type=_int_range(1, runner.ACCOUNTS_MAX),
        default=runner.ACCOUNTS_DEFAULT,
        metavar="N",
        help=f"customer accounts (default {runner.ACCOUNTS_DEFAULT:,})",
    )
    sim.add_argument(
        "--initial-balance",
        type=_int_range(0, AMOUNT_MAX),
        default=runner.INITIAL_BALANCE_DEFAULT,
        metavar="MINOR",
        help="opening balance of each new account, in minor units (cents) "
        f"(default {runner.INITIAL_BALANCE_DEFAULT}, i.e. "
        f"{format_minor(runner.INITIAL_BALANCE_DEFAULT)})",
    )
    end = sim.add_mutually_exclusive_group()
    end.add_argument(
        "--ops",
        type=_int_range(1, 10**12),
        metavar="N",
        help=f"stop after N operations in all (default {runner.OPS_DEFAULT:,})",
    )
    end.add_argument(
        "--duration", type=_seconds, metavar="SECONDS", help="stop after this many seconds"
    )
    sim.add_argument(
        "--mix",
        type=_spec(workload.parse_mix),
        default=workload.MIX_DEFAULT,
        help=f"relative weights of the operations (default {workload.MIX_DEFAULT})",
    )
    sim.add_argument(
        "--skew",
        type=_spec(workload.parse_skew),
        default=workload.SKEW_DEFAULT,
        help="account choice: uniform, or zipf:S for hot accounts (e.g. zipf:1.1) "
        "(default uniform)",
    )
    sim.add_argument(
        "--seed",
        type=_int_range(0, 2**63 - 1),
        metavar="N",
        help="seed of the workload: the same seed gives every teller the same commands "
        "(default: random, printed in the summary)",
    )
    sim.add_argument(
        "--durability",
        choices=runner.DURABILITIES,
        default="full",
        help="full: fsync every group commit before answering; normal: survive a process "
        "crash, not a power loss (default full)",
    )
    sim.add_argument(
        "--queue-capacity",
        type=_int_range(1, QUEUE_CAPACITY_MAX),
        default=QUEUE_CAPACITY_DEFAULT,
        metavar="N",
        help=f"the bank's job queue capacity in operations (default {QUEUE_CAPACITY_DEFAULT})",
    )
    sim.add_argument("--json", metavar="FILE", help="write the result as JSON to FILE")
    sim.add_argument(
        "--plot",
        metavar="FILE",
        help="write a PNG of throughput, latency percentiles and queue depth over time",
    )
    sim.add_argument(
        "--history",
        metavar="FILE",
        help="record every operation (invoke/complete times, outcome, seq) and periodic "
        "snapshots as JSON lines in FILE, for `bank check-history`",
    )
    sim.add_argument(
        "--no-progress",
        action="store_true",
        help="no live progress (by default: a bar on a terminal, a line a second otherwise)",
    )
    sim.set_defaults(run=_cmd_simulate)

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
    aud.add_argument(
        "--db",
        metavar="PATH|URL",
        required=True,
        help="the ledger: a file path or an SQLAlchemy URL",
    )
    aud.add_argument("--json", action="store_true", help="print the report as JSON")
    aud.add_argument(
        "--expect-head",
        metavar="HEAD",
        help="also fail unless both chains end where HEAD says: HEAD is the "
        "SEQ:HASH/EVENT_SEQ:EVENT_HASH value an earlier audit printed as `head`; it detects "
        "rows deleted, appended or re-hashed at the end of transfers or account_events "
        "(a bare transfers hash is refused: it would leave account events unpinned)",
    )
    aud.set_defaults(run=_cmd_audit)

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
    chk.add_argument(
        "--db",
        metavar="PATH|URL",
        required=True,
        help="the ledger: a file path or an SQLAlchemy URL",
    )
    chk.add_argument("--json", action="store_true", help="print the result as JSON")
    chk.set_defaults(run=_cmd_check_history)

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
    cpy.set_defaults(run=_cmd_copy)

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
    ini.set_defaults(run=_cmd_init)

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
    acc.set_defaults(run=_cmd_accounts)

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
        type=_int_range(1, 10**9),
        metavar="N",
        help="show at most the first N transfers",
    )
    his.add_argument("--json", action="store_true", help="print JSON (amounts in minor units)")
    his.set_defaults(run=_cmd_history)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `bank` command line; returns the exit code (see the module docstring)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) and usage errors (2): return, don't exit
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except _UsageError as exc:
        _error(args.command, str(exc))
        return EXIT_USAGE
    except _OPEN_ERRORS as exc:
        _error(args.command, str(exc))
        return EXIT_USAGE
    except BankError as exc:
        _error(args.command, f"{type(exc).__name__}: {exc}")
        return EXIT_PROBLEM
    except KeyboardInterrupt:
        _error(args.command, "interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `bank accounts | head`: not an error worth a traceback
        # Point stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except OSError as exc:  # a file we were told to write or read: say which, no traceback
        # Could not run (exit 2), not "found a problem": 1 would read as a failed audit.
        shown = (
            f"{exc.filename}: "
            if exc.filename is not None and str(exc.filename) not in str(exc)
            else ""
        )
        _error(args.command, f"{shown}{type(exc).__name__}: {exc}")
        return EXIT_USAGE


def _console(out: TextIO) -> Console:
    """A console on `out`; when that is a pipe, wide enough that tables are not squeezed."""
    return Console(file=out, highlight=False, width=None if out.isatty() else 200)


def _error(command: str, message: str) -> None:
    print(f"bank {command}: {message}", file=sys.stderr)


def _backend(db: str) -> Backend:
    """The backend of `--db` (a path, or any URL `backend_for` accepts); nothing is opened."""
    return backend_for(ledger_url(db))


def _existing_ledger(db: str) -> str:
    """Refuse a missing path before opening (opening would create an empty ledger).

    A file URL is resolved to the file it names; a server URL is returned as it is (the
    reader says if the database is missing or not a ledger).
    """
    path = db
    if "://" in db:
        backend = _backend(db)
        if backend.path is None:
            return db
        path = str(backend.path)
    if not Path(path).exists():
        raise _UsageError(f"no ledger at {path} (create one with `bank init --db {path}`)")
    if Path(path).is_dir():
        raise _UsageError(f"{path} is a directory, not a ledger file")
    return path


# -- commands ------------------------------------------------------------------------------


def _cmd_simulate(args: argparse.Namespace) -> int:
    from bank.simulate.outputs import check_target
    from bank.simulate.plot import write_plot
    from bank.simulate.progress import progress_for
    from bank.simulate.report import print_summary, write_json
    from bank.simulate.runner import OPS_DEFAULT, SimulationConfig, run_simulation
    from bank.simulate.workload import InvalidWorkload

    for option, target in (
        ("--json", args.json),
        ("--plot", args.plot),
        ("--history", args.history),
    ):
        if target is not None and not Path(target).absolute().parent.is_dir():
            raise _UsageError(f"{option} {target}: the directory does not exist")
    if args.history is not None and args.db is None:
        raise _UsageError(
            "--history needs --db: the temporary ledger is deleted after the run, "
            "so the history could not be checked against it"
        )
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    ops = args.ops if args.ops is not None or args.duration is not None else OPS_DEFAULT
    tmpdir = None
    db = args.db
    if db is None:
        tmpdir = tempfile.mkdtemp(prefix="bank-simulate-")
        db = os.path.join(tmpdir, "ledger.db")
    try:
        try:
            config = SimulationConfig.from_specs(
                db=db,
                mix=args.mix,
                skew=args.skew,
                tellers=args.tellers,
                window=args.window,
                workers=args.workers,
                accounts=args.accounts,
                ops=ops,
                duration_s=args.duration,
                seed=seed,
                initial_balance=args.initial_balance,
                durability=args.durability,
                queue_capacity=args.queue_capacity,
            )
        except InvalidWorkload as exc:
            raise _UsageError(str(exc)) from None
        display = progress_for(
            sys.stderr,
            total_ops=config.ops,
            duration_s=config.duration_s,
            enabled=not args.no_progress,
        )
        result = run_simulation(config, progress=display, history=args.history)
        print_summary(result, sys.stdout)
        if args.json:
            write_json(result, check_target("--json", args.json))
            print(f"result written to {args.json}")
        if args.plot:
            write_plot(result, check_target("--plot", args.plot))
            print(f"plot written to {args.plot}")
        if args.history:
            print(f"history written to {args.history} (check it with `bank check-history`)")
        if tmpdir is None:
            print(f"ledger: {db} (check it again with `bank audit --db {db}`)")
        return result.exit_code()
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)


def _cmd_audit(args: argparse.Namespace) -> int:
    try:
        from bank.ledger.audit_report import run_audit_command
    except ImportError:
        raise CannotAudit("the audit is not available in this build of bank") from None
    code: int = run_audit_command(
        args.db, as_json=args.json, expect_head=args.expect_head, out=sys.stdout
    )
    return code


def _cmd_check_history(args: argparse.Namespace) -> int:
    from bank.check_history import run_check_history_command
    from bank.errors import CannotCheckHistory

    try:
        return run_check_history_command(args.file, args.db, as_json=args.json, out=sys.stdout)
    except CannotCheckHistory as exc:
        _error(args.command, str(exc))
        return EXIT_USAGE


def _cmd_copy(args: argparse.Namespace) -> int:
    from bank.ledger.audit_report import render_report
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
    render_report(report.audit, _console(sys.stdout))
    if not report.ok:
        print(
            "the copy holds the source's rows as they are, so the source is damaged too: "
            f"`bank audit --db {report.source}` tells; do not open the copy",
            file=sys.stderr,
        )
        return EXIT_PROBLEM
    print(f"open the copy with Bank.open({report.destination!r})")
    return EXIT_OK


def _cmd_init(args: argparse.Namespace) -> int:
    backend = _backend(args.db)
    path = backend.path
    existed = path is None or (path.exists() and path.stat().st_size > 0)
    with Bank.open(args.db) as bank:
        revision = bank.revision
        rows = _account_rows(bank)
    verb = "opened existing" if existed else "created"
    shown = args.db if path is not None else backend.where  # a URL's password stays hidden
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
    _console(out).print(table)


def _cmd_accounts(args: argparse.Namespace) -> int:
    # Read-only: works while a bank runs on the file, never migrates or locks it.
    with LedgerReader(_existing_ledger(args.db)) as reader:
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


def _cmd_history(args: argparse.Namespace) -> int:
    with LedgerReader(_existing_ledger(args.db)) as reader:
        accounts = reader.accounts()
        account_id = _resolve_account(accounts, args.account)
        receipts = reader.history(account_id, limit=args.limit)
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
    _console(sys.stdout).print(table)
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
