"""The SQLite backend: a ledger in one file (see `bank.ledger.backend` for the seam).

Modules: `url` (which file a URL names, what is refused), `lock` (the flock and this
process's registry of owned files), `preflight` (checks before a bank writes the file),
`engine` (connections, pragmas, durability, errors at open), `writer` (the batch writer)
and `backend` (`SqliteBackend`). The names other code imports are re-exported here.
"""

from __future__ import annotations

from bank.ledger.backend import Durability
from bank.ledger.backends import ledger_url
from bank.ledger.sqlite.backend import SqliteBackend
from bank.ledger.sqlite.engine import (
    BEGIN_SQL,
    check_writable,
    create_ledger_engine,
    create_readonly_engine,
    is_driver_error,
    open_error,
)
from bank.ledger.sqlite.lock import (
    SIDE_FILES,
    FileLock,
    at_rest,
    fingerprint,
    owned_here,
    side_file_size,
)
from bank.ledger.sqlite.preflight import (
    SQLITE_MAGIC,
    check_not_read_only,
    check_sqlite_header,
    roll_back_hot_journal,
    sniff_sqlite_file,
)
from bank.ledger.sqlite.url import SqliteTarget, resolve_sqlite_target, sqlite_path
from bank.ledger.sqlite.writer import SqliteBatchWriter, bound_variables_max

__all__ = [
    "BEGIN_SQL",
    "SIDE_FILES",
    "SQLITE_MAGIC",
    "Durability",
    "FileLock",
    "SqliteBackend",
    "SqliteBatchWriter",
    "SqliteTarget",
    "at_rest",
    "bound_variables_max",
    "check_not_read_only",
    "check_sqlite_header",
    "check_writable",
    "create_ledger_engine",
    "create_readonly_engine",
    "fingerprint",
    "is_driver_error",
    "ledger_url",
    "open_error",
    "owned_here",
    "resolve_sqlite_target",
    "roll_back_hot_journal",
    "side_file_size",
    "sniff_sqlite_file",
    "sqlite_path",
]
