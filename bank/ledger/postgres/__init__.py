"""The PostgreSQL ledger backend (psycopg 3, the `postgres` extra): everything
PostgreSQL-specific lives in this package.

- The ledger is one database (`postgresql[+psycopg]://user@host/DATABASE`), tables in
  its `current_schema()`; bank never creates the database itself.
- Durability: `full` = `synchronous_commit` on (a stronger server setting such as
  `remote_apply` is kept) on a server with `fsync=on`, else `ServerNotDurable`;
  `normal` = `synchronous_commit=off` (survives a crash of the bank; a crash of the
  server may take the last commits back, never more than a suffix).
- One writer: a session advisory lock held on a dedicated connection (`lease.py`);
  it needs a real session, so not through a transaction-pooling proxy (PgBouncer's
  transaction mode would hand the lock to whichever client gets the connection).
"""

from bank.ledger.postgres.url import require_driver

require_driver()  # a sentence naming `pip install 'bank[postgres]'`, not an ImportError

from bank.ledger.postgres.backend import PostgresBackend  # noqa: E402

__all__ = ["PostgresBackend"]
