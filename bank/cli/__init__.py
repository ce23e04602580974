"""The `bank` command line: thin commands over the library, errors turned into exit codes.

One module per command group (`audit`, `check_history`, `copy`, `ledger` for init/accounts/
history, `simulate`), each adding its subcommands with `register(sub)` and running them with
a `run*(args)` that calls the library; `common` holds what they share. The exit codes are
defined once, in `bank.exit_codes`, and re-exported here.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from bank import __version__
from bank.cli import audit, check_history, copy, ledger, simulate
from bank.cli.common import Subcommands, UsageError, error
from bank.errors import BankError, CannotAudit, CannotCopy, LedgerBusy, NotALedger
from bank.exit_codes import (
    EXIT_CODES_HELP,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_PROBLEM,
    EXIT_THRESHOLD,
    EXIT_USAGE,
)

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_PROBLEM",
    "EXIT_THRESHOLD",
    "EXIT_USAGE",
    "build_parser",
    "main",
]

#: The top-level modules of the `simulate` extra: without one, `bank simulate` says how to
#: install it (exit 2) and every other command still works.
SIMULATE_EXTRA_MODULES = frozenset({"rich", "numpy", "matplotlib"})
SIMULATE_EXTRA_HINT = "pip install 'bank[simulate]'"

#: Errors that mean "could not open / could not audit": exit 2, not 1.
_OPEN_ERRORS: tuple[type[BankError], ...] = (NotALedger, LedgerBusy, CannotAudit, CannotCopy)


def build_parser() -> argparse.ArgumentParser:
    """The `bank` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="bank",
        description="A simulated banking transaction engine on a hash-chained ledger (SQLite or PostgreSQL).",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"bank {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    try:
        simulate.register(sub)
    except ModuleNotFoundError as exc:
        if not _is_simulate_extra(exc):
            raise
        _register_simulate_missing(sub, exc)
    for group in (audit, check_history, copy, ledger):
        group.register(sub)
    return parser


def _is_simulate_extra(exc: ModuleNotFoundError) -> bool:
    return (exc.name or "").split(".")[0] in SIMULATE_EXTRA_MODULES


def _missing_extra_message(exc: ModuleNotFoundError) -> str:
    return f"needs the simulate extra ({exc.name} is not installed): {SIMULATE_EXTRA_HINT}"


def _register_simulate_missing(sub: Subcommands, exc: ModuleNotFoundError) -> None:
    """`simulate` without its extra: any arguments, one line saying how to install it."""
    message = _missing_extra_message(exc)
    # No option prefix: every argument (`--ops 10`, `--help`) is taken as it comes.
    placeholder = sub.add_parser(
        "simulate", help=f"run a load simulation ({message})", add_help=False, prefix_chars="\0"
    )
    placeholder.add_argument("arguments", nargs="*")

    def run(args: argparse.Namespace) -> int:
        error("simulate", message)
        return EXIT_USAGE

    placeholder.set_defaults(run=run)


#: How an error of a write to standard output names its file.
STDOUT_NAME = "standard output"


class _NamedStdout:
    """Standard output whose write errors name it (`bank accounts > /dev/full` says
    "standard output: ... No space left on device", not a bare errno); everything
    else is the stream's own."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: Any) -> int:
        try:
            return int(self._stream.write(text))
        except OSError as exc:
            raise _named(exc) from None

    @property
    def buffer(self) -> _NamedStdout:
        """The byte stream under it (`--json -` writes bytes), its errors named too."""
        return _NamedStdout(self._stream.buffer)

    def writelines(self, lines: Iterable[Any]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as exc:
            raise _named(exc) from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _named(exc: OSError) -> OSError:
    if exc.filename is None and not isinstance(exc, BrokenPipeError):
        exc.filename = STDOUT_NAME
    return exc


@contextmanager
def _stdout_named() -> Iterator[None]:
    real = sys.stdout
    sys.stdout = _NamedStdout(real)
    try:
        yield
    finally:
        sys.stdout = real


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `bank` command line; returns the exit code (`bank.exit_codes`)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) and usage errors (2): return, don't exit
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        with _stdout_named():
            return run(args)
    except UsageError as exc:
        error(args.command, str(exc))
        return EXIT_USAGE
    except _OPEN_ERRORS as exc:
        error(args.command, str(exc))
        return EXIT_USAGE
    except BankError as exc:
        error(args.command, f"{type(exc).__name__}: {exc}")
        return EXIT_PROBLEM
    except ModuleNotFoundError as exc:  # the simulator's imports, when its extra is missing
        if not _is_simulate_extra(exc):
            raise
        error(args.command, _missing_extra_message(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        error(args.command, "interrupted")
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
        if exc.filename == STDOUT_NAME:  # the interpreter's last flush would fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            error(args.command, f"cannot write to {STDOUT_NAME}: {exc.strerror or exc}")
            return EXIT_USAGE
        error(args.command, f"{shown}{type(exc).__name__}: {exc}")
        return EXIT_USAGE
