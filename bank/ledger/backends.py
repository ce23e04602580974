"""Which backend stores the ledger at a URL (imported lazily: PostgreSQL's driver is an extra).

The one module above the backends that names them: everything else asks it.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType
from typing import Final

from sqlalchemy.engine import URL, make_url

from bank.errors import UnsupportedLedgerUrl
from bank.ledger.backend import Backend


def ledger_url(db: str | os.PathLike[str] | URL) -> URL:
    """A path or URL as an SQLAlchemy URL (`sqlite:///path` for a bare path)."""
    if isinstance(db, URL):
        return db
    text = os.fspath(db)
    if "://" in text:
        return make_url(text)
    return URL.create("sqlite", database=str(Path(text).expanduser().absolute()))


def backend_for(url: URL) -> Backend:
    """The backend for `url`: `sqlite` (a file) or `postgresql` (a server database)."""
    name = url.get_backend_name()
    if name == "sqlite":
        from bank.ledger.sqlite import SqliteBackend

        return SqliteBackend(url)
    if name == "postgresql":
        from bank.ledger.postgres import PostgresBackend

        return PostgresBackend(url)
    raise unsupported(url)


def unsupported(url: URL) -> UnsupportedLedgerUrl:
    """The error for a URL of a database kind that holds no ledger."""
    return UnsupportedLedgerUrl(
        f"{url.render_as_string()}: a ledger is stored in SQLite (a path or sqlite:///path) "
        f"or PostgreSQL (postgresql://...); not in a database of kind {url.get_backend_name()!r}"
    )


#: Dialect name -> the package of its backend.
PACKAGES: Final = {"sqlite": "bank.ledger.sqlite", "postgresql": "bank.ledger.postgres"}
#: The top-level package of a DB-API driver -> its dialect (for a bare cursor).
_DRIVERS: Final = {"sqlite3": "sqlite", "psycopg": "postgresql"}


def backend_module(dialect: str, part: str) -> ModuleType:
    """The module `part` (e.g. "schema") of the backend of `dialect`, imported on first use."""
    package = PACKAGES.get(dialect)
    if package is None:
        raise UnsupportedLedgerUrl(f"no ledger backend for databases of kind {dialect!r}")
    return importlib.import_module(f"{package}.{part}")


def backend_module_names(part: str) -> tuple[str, ...]:
    """Every backend's module `part`, by name (to preload them in a fork server)."""
    return tuple(f"{package}.{part}" for package in PACKAGES.values())


def dialect_of_driver(source: object) -> str:
    """The dialect of a DB-API connection or cursor, by its driver's package."""
    package = type(source).__module__.partition(".")[0]
    dialect = _DRIVERS.get(package)
    if dialect is None:
        raise TypeError(f"cannot tell which database a {type(source).__name__} reads")
    return dialect
