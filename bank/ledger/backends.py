"""Which backend stores the ledger at a URL (imported lazily: PostgreSQL's driver is an extra)."""

from __future__ import annotations

import os
from pathlib import Path

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
    raise UnsupportedLedgerUrl(
        f"{url.render_as_string()}: a ledger is stored in SQLite (a path or sqlite:///path) "
        f"or PostgreSQL (postgresql://...); not in a database of kind {name!r}"
    )
