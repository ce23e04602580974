"""How long a waiting standby needs to take the PostgreSQL writer lease after the holder
is SIGKILLed (from the kill to the standby's `acquire` returning), over several rounds.

    .venv/bin/python scripts/pg_lease_takeover.py --rounds 10
    .venv/bin/python scripts/pg_lease_takeover.py --url postgresql+psycopg://postgres@127.0.0.1:55432/postgres

It creates (and drops) a database `pg_takeover_<pid>` on that server.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import statistics
import subprocess
import sys
import time

import psycopg
from sqlalchemy import make_url

from bank.ledger.postgres.url import connect_kwargs, engine_url

#: Takes the lease (waiting up to argv[2] s), prints the wall clock, holds it.
HOLDER = """
import sys, time
from sqlalchemy import make_url
from bank.ledger.postgres import PostgresBackend
backend = PostgresBackend(make_url(sys.argv[1]))
print("ready", flush=True)
lock = backend.acquire(create=True, wait_s=float(sys.argv[2]))
print("held", time.time(), flush=True)
time.sleep(600)
"""


def _line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise TimeoutError("no answer from the child")
    return proc.stdout.readline()


def _start(url: str, wait_s: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, url, str(wait_s)], stdout=subprocess.PIPE, text=True
    )
    assert _line(proc, 60) == "ready\n"
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--url",
        default=os.environ.get(
            "BANK_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:55432/postgres"
        ),
    )
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    admin = engine_url(make_url(args.url))
    name = f"pg_takeover_{os.getpid()}"
    with psycopg.connect(**connect_kwargs(admin), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    url = admin.set(database=name).render_as_string(hide_password=False)
    took: list[float] = []
    try:
        holder = _start(url, 0)
        assert _line(holder, 60).startswith("held")
        for _ in range(args.rounds):
            standby = _start(url, 60)
            time.sleep(0.3)  # the standby is polling
            killed = time.time()
            holder.send_signal(signal.SIGKILL)
            holder.wait()
            took.append(float(_line(standby, 60).split()[1]) - killed)
            holder = standby  # the next round kills this one
        holder.kill()
        holder.wait()
    finally:
        with psycopg.connect(**connect_kwargs(admin), autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    ms = sorted(t * 1000 for t in took)
    print(
        f"takeover after SIGKILL over {len(ms)} rounds: min {ms[0]:.0f} ms, "
        f"median {statistics.median(ms):.0f} ms, max {ms[-1]:.0f} ms"
    )


if __name__ == "__main__":
    main()
