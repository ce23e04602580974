"""The bank's pooled PostgreSQL connections: their durability settings, their TCP
keepalives (the lease's), their registration with the writer lease (cut if the server
stops answering), and what the server must offer before a ledger is written
(writable, durable, privileges)."""

from __future__ import annotations

import os
import weakref
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import Engine, event
from sqlalchemy.engine import URL

from bank.errors import CannotOpenLedger, ServerNotDurable
from bank.ledger.backend import Durability
from bank.ledger.models import account_events, accounts, transfers
from bank.ledger.postgres.lease import KEEPALIVES
from bank.ledger.postgres.url import connect_kwargs

if TYPE_CHECKING:
    from bank.ledger.postgres.lease import Lease

#: `synchronous_commit` levels that flush the commit to this server's disk first.
DURABLE_COMMIT_LEVELS = frozenset({"on", "local", "remote_write", "remote_apply"})
#: (table, privilege) the writer needs; checked at open so a grant missing fails there.
PRIVILEGES = (
    (accounts.name, "INSERT"),
    (accounts.name, "UPDATE"),
    (account_events.name, "INSERT"),
    (transfers.name, "INSERT"),
)

#: Engines of this process: a forked child drops their connections unclosed (closing
#: one would end the parent's session, on the socket they share).
_engines: weakref.WeakSet[Engine] = weakref.WeakSet()


def _after_fork() -> None:
    for engine in list(_engines):
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_after_fork)


def configure_session(dbapi_connection: Any, durability: Durability) -> None:
    """Set a new connection's `synchronous_commit` for `durability`.

    FULL keeps a server's stronger setting (`remote_apply` for a synchronous replica)
    and raises `off` to `on`; NORMAL sets `off` (a server crash may lose the last
    commits, never a prefix).
    """
    autocommit = dbapi_connection.autocommit
    dbapi_connection.autocommit = True  # a SET inside a transaction would roll back
    try:
        cursor = dbapi_connection.cursor()
        try:
            if durability is Durability.NORMAL:
                cursor.execute("SET synchronous_commit = off")
            else:
                cursor.execute("SHOW synchronous_commit")
                row = cursor.fetchone()
                if row is None or row[0] not in DURABLE_COMMIT_LEVELS:
                    cursor.execute("SET synchronous_commit = on")
        finally:
            cursor.close()
    finally:
        dbapi_connection.autocommit = autocommit


def create_ledger_engine(url: URL, durability: Durability, lease: Lease | None = None) -> Engine:
    """A pooled engine on psycopg whose every connection carries `durability` and the
    lease's TCP keepalives and `tcp_user_timeout` (a dead or cut-off server ends a wait;
    the URL's own settings win), and is registered with `lease`: if the server stops
    answering, the lease cuts them all, and the engine connects no more."""
    given = connect_kwargs(url)
    keepalives = {k: v for k, v in KEEPALIVES.items() if k not in given}
    engine = sa.create_engine(url, pool_size=8, max_overflow=32, connect_args=keepalives)

    if lease is not None:
        watched = lease

        @event.listens_for(engine, "do_connect")
        def _before_connect(_dialect: Any, _record: Any, _args: Any, _kwargs: Any) -> None:
            watched.check_answering()  # a frozen server: fail now, not after connect_timeout

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        if lease is not None:
            lease.register(dbapi_connection)  # first: the set-up below talks to the server
        configure_session(dbapi_connection, durability)

    _engines.add(engine)
    return engine


_CHECK_SQL = (
    "SELECT pg_is_in_recovery(), current_setting('transaction_read_only'), "
    "current_setting('fsync'), current_setting('synchronous_commit'), current_user, "
    "current_setting('synchronous_standby_names'), "
    "(SELECT count(*) FROM pg_stat_replication WHERE sync_state IN ('sync', 'quorum'))"
)
#: Levels at which a commit also waits for a synchronous standby, if one is configured.
_WAITS_FOR_STANDBY = frozenset({"on", "remote_write", "remote_apply"})


def check_writable(engine: Engine, where: str, durability: Durability) -> None:
    """Refuse a server that cannot take this ledger's commits as promised.

    A hot standby or a read-only session (`default_transaction_read_only`), a missing
    privilege, and for FULL a server without `fsync` (a commit it acknowledges may be
    lost with the machine), a session whose `synchronous_commit` stayed off, or
    synchronous replication configured with no synchronous standby connected (every
    commit would hang). Safe before the migrations: grants of absent tables are skipped.
    """
    with engine.connect() as conn:
        row = conn.exec_driver_sql(_CHECK_SQL).one()
        recovery, read_only, fsync, sync_commit, user, standby_names, standbys = row
        if recovery:
            raise CannotOpenLedger(
                f"{where}: the server is a hot standby (in recovery): it cannot be "
                "written; open the primary"
            )
        if read_only == "on":
            raise CannotOpenLedger(
                f"{where}: transactions are read-only on this connection "
                "(default_transaction_read_only is on for this user, database or server)"
            )
        if durability is Durability.FULL and fsync != "on":
            raise ServerNotDurable(
                f"{where}: the server runs with fsync={fsync}, so a commit it acknowledges "
                "may be lost if the machine fails; durability 'full' needs fsync=on "
                "(or open with durability='normal')"
            )
        if durability is Durability.FULL and sync_commit not in DURABLE_COMMIT_LEVELS:
            raise ServerNotDurable(
                f"{where}: synchronous_commit stays {sync_commit!r} on the bank's "
                "connections; durability 'full' needs it on"
            )
        if (
            durability is Durability.FULL
            and sync_commit in _WAITS_FOR_STANDBY
            and standby_names
            and not standbys
        ):
            raise CannotOpenLedger(
                f"{where}: synchronous_standby_names is {standby_names!r} but no synchronous "
                "standby is connected, so every commit would wait for one forever; start "
                "the standby (or open with durability='normal')"
            )
        missing = [
            f"{privilege} on {table}"
            for table, privilege in PRIVILEGES
            if conn.execute(
                sa.text("SELECT to_regclass(:t) IS NOT NULL AND NOT has_table_privilege(:t, :p)"),
                {"t": table, "p": privilege},
            ).scalar_one()
        ]
        if missing:
            raise CannotOpenLedger(
                f"{where}: the user {user!r} lacks {', '.join(missing)}; grant them first"
            )
