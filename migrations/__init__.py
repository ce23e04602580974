"""Alembic environment of the ledger; installed as `bank._migrations`."""
