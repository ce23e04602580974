"""Helpers of the PostgreSQL backend's own tests: throwaway clusters with special settings
(fsync off, a synchronous standby that never comes) and ledger tables made from the
models. Fresh databases come from the shared server (`tests/postgres.py`, the
`postgres_server` fixture)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy.engine import URL

psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (the postgres extra)")

from tests import postgres  # noqa: E402


def _bindir() -> Path:
    found = postgres.find_bindir()
    if found is None:
        reason = "no PostgreSQL server binaries (initdb, pg_ctl) on this machine"
        if postgres.required():
            pytest.fail(f"{reason} ({postgres.ENV_REQUIRE}=1 requires them)", pytrace=False)
        pytest.skip(reason)
    return found


def _as_postgres(*argv: str) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else list(argv)


@contextmanager
def throwaway_cluster(*settings: str) -> Iterator[URL]:
    """A private PostgreSQL cluster (initdb + pg_ctl, unix socket only) started with
    `-c` settings, stopped and removed afterwards; skips when the binaries are absent."""
    bindir = _bindir()
    root = postgres.scratch_dir("pg_cluster_")
    data = root / "data"
    try:
        if os.geteuid() == 0:
            shutil.chown(root, "postgres")
        subprocess.run(
            _as_postgres(
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ),
            check=True,
            capture_output=True,
        )
        options = " ".join(
            ["-c listen_addresses=''", f"-k {root}", "-p 5439", *(f"-c {s}" for s in settings)]
        )
        subprocess.run(
            _as_postgres(
                str(bindir / "pg_ctl"),
                "-D",
                str(data),
                "-o",
                options,
                "-l",
                str(root / "log"),
                "-w",
                "start",
            ),
            check=True,
            capture_output=True,
        )
        try:
            yield URL.create(
                "postgresql+psycopg",
                username="postgres",
                database="postgres",
                query={"host": str(root), "port": "5439"},
            )
        finally:
            subprocess.run(
                _as_postgres(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"),
                check=False,
                capture_output=True,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


def make_ledger_tables(url: URL, accounts: int = 2) -> None:
    """A ledger migrated to head, with `@cash` and accounts 1..accounts-1 at balance 0 and
    no account events (the backend tests write their own, from seq 1)."""
    from sqlalchemy import create_engine

    from bank.ledger.migrate import upgrade_to_head

    engine = create_engine(url)
    try:
        upgrade_to_head(engine)
        with engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM account_events")
            conn.exec_driver_sql(
                "INSERT INTO accounts SELECT i, 'a' || i, 0, 0 "
                f"FROM generate_series(1, {accounts - 1}) i"
            )
    finally:
        engine.dispose()
