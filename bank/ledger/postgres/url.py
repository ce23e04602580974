"""PostgreSQL ledger URLs: which driver, how messages name the ledger, how to connect.

Imports no driver, so a missing psycopg is reported as a sentence (`require_driver`).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import URL

from bank.errors import UnsupportedLedgerUrl

#: The one driver a PostgreSQL ledger runs on (psycopg 3, the `postgres` extra).
DRIVER = "psycopg"


def require_driver() -> None:
    """Raise `UnsupportedLedgerUrl` naming the extra to install when psycopg is missing."""
    try:
        import psycopg  # noqa: F401
    except ImportError as exc:
        raise UnsupportedLedgerUrl(
            "a PostgreSQL ledger needs the psycopg 3 driver, which is not installed "
            f"({exc}): pip install 'bank[postgres]'"
        ) from None


def shown(url: URL) -> str:
    """The URL as messages show it: the password hidden."""
    return url.render_as_string(hide_password=True)


def engine_url(url: URL) -> URL:
    """`url` on the psycopg driver (`postgresql://` means psycopg here, not psycopg2).

    Raises `UnsupportedLedgerUrl` for another PostgreSQL driver or a URL without a
    database name: the ledger is one database, and it must be named.
    """
    if url.get_backend_name() != "postgresql":
        raise UnsupportedLedgerUrl(f"{shown(url)}: not a PostgreSQL URL")
    driver = url.get_driver_name()
    if "+" in url.drivername and driver != DRIVER:
        raise UnsupportedLedgerUrl(
            f"{shown(url)}: the PostgreSQL driver {driver!r} is not supported; a ledger "
            f"runs on psycopg 3: write postgresql+psycopg://... (or postgresql://...)"
        )
    if not url.database:
        raise UnsupportedLedgerUrl(
            f"{shown(url)}: name the ledger's database (postgresql+psycopg://HOST/DATABASE)"
        )
    return url.set(drivername=f"postgresql+{DRIVER}")


def connect_kwargs(url: URL) -> dict[str, Any]:
    """psycopg.connect() keyword arguments for `url`, exactly as SQLAlchemy's engine
    would connect (same host, port, database, user, query options)."""
    _args, kwargs = url.get_dialect()().create_connect_args(url)
    kwargs.pop("context", None)  # SQLAlchemy's adapters map: not for a plain connection
    return dict(kwargs)
