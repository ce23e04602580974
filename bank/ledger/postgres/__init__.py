"""The PostgreSQL ledger backend (psycopg 3, the `postgres` extra): everything
PostgreSQL-specific lives in this package."""

from bank.ledger.postgres.url import require_driver

require_driver()  # a sentence naming `pip install 'bank[postgres]'`, not an ImportError

from bank.ledger.postgres.backend import PostgresBackend  # noqa: E402

__all__ = ["PostgresBackend"]
