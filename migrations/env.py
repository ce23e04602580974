"""Alembic environment: `Bank.open` passes its own connection; the CLI uses the ini URL.

`alembic -x url=...` points the command line at any ledger: `sqlite:///path` or
`postgresql+psycopg://user@host/db` (a bare `postgresql://` means psycopg 3, the
driver of `bank[postgres]`, not SQLAlchemy's default psycopg2).
"""

from alembic import context
from sqlalchemy import Connection, create_engine, make_url
from sqlalchemy.engine import URL
from sqlalchemy.pool import NullPool

from bank.ledger.models import Base

config = context.config
target_metadata = Base.metadata


def _url() -> URL:
    given = context.get_x_argument(as_dictionary=True).get("url")
    url = make_url(given or config.get_main_option("sqlalchemy.url") or "sqlite://")
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    return url


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,  # SQLite can only ALTER through table copies
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_engine(_url(), poolclass=NullPool)
    with engine.connect() as conn:
        _run(conn)
    engine.dispose()


if context.is_offline_mode():
    context.configure(url=_url(), target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
