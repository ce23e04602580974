"""A small, local way to get a fresh PostgreSQL database per test (until the shared
fixture of tests/postgres.py lands): `BANK_TEST_POSTGRES_URL` names a server the tests
may create databases on; unset or unreachable, the tests skip with a one-line reason."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy.engine import URL, make_url

psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (the postgres extra)")

from bank.ledger.postgres.url import connect_kwargs, engine_url  # noqa: E402

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def server_url() -> URL:
    """The test server's admin URL, or skip."""
    text = os.environ.get("BANK_TEST_POSTGRES_URL")
    if not text:
        pytest.skip("BANK_TEST_POSTGRES_URL is not set (no PostgreSQL server for these tests)")
    url = engine_url(make_url(text))
    try:
        psycopg.connect(**connect_kwargs(url), connect_timeout=5).close()
    except psycopg.Error as exc:
        pytest.skip(f"no PostgreSQL server at {url.render_as_string()}: {exc}".splitlines()[0])
    return url


@contextmanager
def fresh_database(prefix: str = "pg") -> Iterator[URL]:
    """A new empty database on the test server, dropped (forcibly) afterwards."""
    admin = server_url()
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(**connect_kwargs(admin), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield admin.set(database=name)
    finally:
        with psycopg.connect(**connect_kwargs(admin), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def _as_postgres(*argv: str) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else list(argv)


@contextmanager
def throwaway_cluster(*settings: str) -> Iterator[URL]:
    """A private PostgreSQL cluster (initdb + pg_ctl, unix socket only) started with
    `-c` settings, stopped and removed afterwards; skips when the binaries are absent."""
    if not (PG_BIN / "initdb").exists():
        pytest.skip(f"no PostgreSQL server binaries in {PG_BIN}")
    root = Path(tempfile.mkdtemp(prefix="pg_cluster_"))
    data = root / "data"
    try:
        if os.geteuid() == 0:
            shutil.chown(root, "postgres")
        subprocess.run(
            _as_postgres(str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"),
            check=True,
            capture_output=True,
        )
        options = " ".join(
            ["-c listen_addresses=''", f"-k {root}", "-p 5439", *(f"-c {s}" for s in settings)]
        )
        subprocess.run(
            _as_postgres(
                str(PG_BIN / "pg_ctl"),
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
                _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"),
                check=False,
                capture_output=True,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


def make_ledger_tables(url: URL, accounts: int = 2) -> None:
    """The ledger's tables from the models (until the migrations run on PostgreSQL), with
    `@cash` and accounts 1..accounts-1 at balance 0."""
    from sqlalchemy import create_engine

    from bank.ledger.models import Base

    engine = create_engine(url)
    try:
        Base.metadata.create_all(engine)
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO accounts SELECT i, CASE WHEN i = 0 THEN '@cash' ELSE 'a' || i END, "
                f"CASE WHEN i = 0 THEN 9223372036854775807 ELSE 0 END, 0 "
                f"FROM generate_series(0, {accounts - 1}) i"
            )
    finally:
        engine.dispose()
