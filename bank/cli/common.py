"""What every `bank` subcommand shares: argument types, the usage error, messages, `--db`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeAlias

from bank.ledger.backend import Backend
from bank.ledger.backends import backend_for, ledger_url

#: What `register` functions receive: the `bank` parser's subcommand table.
Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

DB_HELP = "the ledger: a file path or an SQLAlchemy URL"
EXISTING_DB_HELP = "an existing ledger: a file path or an SQLAlchemy URL"


class UsageError(Exception):
    """A bad argument found after parsing (exit 2 with the message)."""


def int_range(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer (underscores allowed) from `low` to `high`."""

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


def error(command: str, message: str) -> None:
    """One line on stderr, prefixed with the command that failed."""
    print(f"bank {command}: {message}", file=sys.stderr)


def backend(db: str) -> Backend:
    """The backend of `--db` (a path, or any URL `backend_for` accepts); nothing is opened."""
    return backend_for(ledger_url(db))


def existing_ledger(db: str) -> str:
    """Refuse a missing path before opening (opening would create an empty ledger).

    A file URL is resolved to the file it names; a server URL is returned as it is (the
    reader says if the database is missing or not a ledger).
    """
    path = db
    if "://" in db:
        found = backend(db)
        if found.path is None:
            return db
        path = str(found.path)
    if not Path(path).exists():
        raise UsageError(f"no ledger at {path} (create one with `bank init --db {path}`)")
    if Path(path).is_dir():
        raise UsageError(f"{path} is a directory, not a ledger file")
    return path
