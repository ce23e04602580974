"""The PostgreSQL side of `scripts/bench.py`: the server, scratch databases, the raw
psycopg ceiling's candidate writers, and pgbench TPC-B.

Kept apart from bench.py so that the SQLite variants read as before; bench.py owns
the clock (`run_threads`) and the report, this module only prepares work and checks it.

The server is the URL given (`--pg-url`, else `BANK_BENCH_POSTGRES_URL`), else a
throwaway cluster started from the PostgreSQL binaries on the machine (initdb +
pg_ctl in a temporary directory, on a private port; through `runuser -u postgres`
when run as root), else none: bench.py then skips the PostgreSQL variants with a
one-line note. Every database this module creates is named `bench_...` and dropped
at the end.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine
from sqlalchemy.engine import URL, make_url

from bank.ledger import postings
from bank.ledger.chain import GENESIS, transfer_hash

Move = tuple[int, int, int]  # (source, target, amount), as in bench.py

#: The raw ceiling's candidate writers (see `prepare_writer`).
RAW_METHODS = ("unnest", "unnest-text", "values", "copy", "pipeline")
#: Rows per batch the ceiling may be measured at.
RAW_BATCH_DEFAULT = 1_000
#: The columns a keyless transfer row writes (the engine leaves `key` out; it is NULL).
TRANSFER_COLUMNS = (
    "seq",
    "kind",
    "debit_account_id",
    "credit_account_id",
    "amount",
    "ts_us",
    "hash",
    "debit_balance",  # the running balances after the row (revision 0005)
    "credit_balance",
)
CASH_ACCOUNT_ID = 0


def postgres_bin(name: str) -> Path | None:
    """A PostgreSQL server program: on PATH, else in Debian's /usr/lib/postgresql/*/bin
    (the newest version first)."""
    found = shutil.which(name)
    if found:
        return Path(found)
    for version in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (version / name).exists():
            return version / name
    return None


def _as_postgres(argv: Sequence[str]) -> list[str]:
    """`argv` run as the `postgres` user when we are root (the server refuses root)."""
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else list(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def throwaway_cluster() -> Iterator[str]:
    """A fresh cluster on 127.0.0.1:<free port> (trust auth, fsync on); yields its URL and
    stops and deletes it at the end."""
    initdb, pg_ctl = postgres_bin("initdb"), postgres_bin("pg_ctl")
    assert initdb is not None and pg_ctl is not None
    # pg_ctl of Debian's package lives with initdb; prefer the one beside initdb.
    if (initdb.parent / "pg_ctl").exists():
        pg_ctl = initdb.parent / "pg_ctl"
    top = Path(tempfile.mkdtemp(prefix="bank-bench-pg-"))
    data, port = top / "data", _free_port()
    if os.geteuid() == 0:
        shutil.chown(top, "postgres", "postgres")
    try:
        subprocess.run(
            _as_postgres(
                [str(initdb), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"]
            ),
            check=True,
            capture_output=True,
        )
        options = f"-p {port} -k {top} -c listen_addresses=127.0.0.1"
        subprocess.run(
            _as_postgres(
                [str(pg_ctl), "-D", str(data), "-o", options, "-l", str(top / "log"), "-w", "start"]
            ),
            check=True,
            capture_output=True,
        )
        try:
            yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
        finally:
            subprocess.run(
                _as_postgres([str(pg_ctl), "-D", str(data), "-m", "fast", "-w", "stop"]),
                check=False,
                capture_output=True,
            )
    finally:
        shutil.rmtree(top, ignore_errors=True)


def conninfo(url: URL | str) -> str:
    """The libpq connection string of an SQLAlchemy `postgresql+psycopg://` URL."""
    from psycopg.conninfo import make_conninfo

    u = make_url(url) if isinstance(url, str) else url
    params: dict[str, Any] = {
        "host": u.host,
        "port": u.port,
        "user": u.username,
        "password": u.password,
        "dbname": u.database,
    }
    params.update({k: v for k, v in u.query.items() if isinstance(v, str)})
    return make_conninfo(**{k: v for k, v in params.items() if v is not None})


def libpq_env(url: URL | str) -> dict[str, str]:
    """PGHOST/PGPORT/... for the command-line programs (pgbench), from an SQLAlchemy URL."""
    u = make_url(url) if isinstance(url, str) else url
    env = dict(os.environ)
    for name, value in (
        ("PGHOST", u.query.get("host") or u.host),
        ("PGPORT", u.port),
        ("PGUSER", u.username),
        ("PGPASSWORD", u.password),
        ("PGDATABASE", u.database),
    ):
        if value is not None:
            env[name] = str(value)
    return env


@dataclass
class Server:
    """A PostgreSQL server the benchmark may create `bench_...` databases on."""

    url: URL  # its maintenance database
    where: str  # how it was found, for the report
    version: str = ""
    fsync: str = ""
    created: list[str] = field(default_factory=list)

    def database_url(self, name: str) -> URL:
        """The URL of database `name` on this server."""
        return self.url.set(database=name)

    def admin(self, sql: str) -> list[tuple[Any, ...]]:
        """Run one statement on the maintenance database, outside a transaction."""
        import psycopg

        with psycopg.connect(conninfo(self.url), autocommit=True) as conn:
            cur = conn.execute(sql)
            return cur.fetchall() if cur.description else []

    def fresh_database(self, name: str) -> URL:
        """Drop (if present) and create database `name`; it is dropped by `drop_created`."""
        self.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.admin(f'CREATE DATABASE "{name}"')
        if name not in self.created:
            self.created.append(name)
        return self.database_url(name)

    def drop_created(self) -> None:
        """Drop every database this run created."""
        for name in self.created:
            with contextlib.suppress(Exception):
                self.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.created.clear()


@contextlib.contextmanager
def find_server(url: str | None) -> Iterator[tuple[Server | None, str]]:
    """The server to measure on and a one-line note: the URL given, else a throwaway
    cluster, else (None, why not)."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        yield None, "psycopg is not installed (pip install 'bank[postgres]')"
        return
    with contextlib.ExitStack() as stack:
        if url:
            where = "the server at --pg-url / BANK_BENCH_POSTGRES_URL"
        elif postgres_bin("initdb") and postgres_bin("pg_ctl"):
            try:
                url = stack.enter_context(throwaway_cluster())
            except (subprocess.CalledProcessError, OSError) as exc:
                yield None, f"could not start a throwaway cluster ({exc})"
                return
            where = "a throwaway cluster started for this run"
        else:
            yield None, "no --pg-url, no BANK_BENCH_POSTGRES_URL and no PostgreSQL binaries"
            return
        server = Server(make_url(url), where)
        try:
            server.version = str(server.admin("SHOW server_version")[0][0])
            server.fsync = str(server.admin("SHOW fsync")[0][0])
        except Exception as exc:
            yield None, f"cannot reach {server.url.render_as_string()} ({exc})"
            return
        try:
            yield server, f"{where}: PostgreSQL {server.version}, fsync={server.fsync}"
        finally:
            server.drop_created()


# -- the raw ceiling ------------------------------------------------------------------------


@dataclass
class RawBatches:
    """The ceiling's pre-built work: rows with their chain hashes, per batch, and each
    batch's final balances of the accounts it touched (what the engine writes)."""

    rows: list[list[tuple[Any, ...]]]
    balances: list[list[tuple[int, int]]]
    head: str
    final: dict[int, int]


def build_batches(moves: Sequence[Move], accounts: int, opening: int, batch: int) -> RawBatches:
    """Chain `moves` from GENESIS (seq 1 on) and cut them into batches of `batch` rows."""
    balances = dict.fromkeys(range(1, accounts + 1), opening)
    head, seq, ts_us = GENESIS, 0, time.time_ns() // 1000
    rows: list[list[tuple[Any, ...]]] = []
    finals: list[list[tuple[int, int]]] = []
    for start in range(0, len(moves), batch):
        page: list[tuple[Any, ...]] = []
        touched: set[int] = set()
        for source, target, amount in moves[start : start + batch]:
            seq += 1
            ts_us += 1
            balances[source] -= amount
            balances[target] += amount
            after = (balances[source], balances[target])
            head = transfer_hash(head, seq, "transfer", source, target, amount, ts_us, None, *after)
            page.append((seq, "transfer", source, target, amount, ts_us, head, *after))
            touched.update((source, target))
        rows.append(page)
        finals.append(sorted((i, balances[i]) for i in touched))
    return RawBatches(rows, finals, head, balances)


def create_ledger_tables(url: URL, accounts: int, opening: int) -> None:
    """The ledger's tables as the migrations make them (both foreign keys of `transfers`,
    the partial key index) and the funded accounts 0..accounts (0 is the cash account)."""
    import psycopg

    from bank.ledger.migrate import upgrade_to_head

    engine = create_engine(url)
    try:
        upgrade_to_head(engine)
        with engine.begin() as emptied:
            for table in ("postings", "transfers", "account_events", "accounts"):
                emptied.exec_driver_sql(f"DELETE FROM {table}")
            emptied.exec_driver_sql("UPDATE postings_upto SET seq = 0")
    finally:
        engine.dispose()
    with psycopg.connect(conninfo(url)) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO accounts (id, name, overdraft_limit, balance) VALUES (%s, %s, %s, %s)",
            [(CASH_ACCOUNT_ID, "@cash", 0, -accounts * opening)]
            + [(i, f"acct-{i:04d}", 0, opening) for i in range(1, accounts + 1)],
        )


_COLS = ", ".join(TRANSFER_COLUMNS)
_UNNEST_SQL = (
    f"WITH ins AS (INSERT INTO transfers ({_COLS}) SELECT * FROM unnest("
    "%s::int8[], %s::text[], %s::int8[], %s::int8[], %s::int8[], %s::int8[], %s::text[], "
    "%s::int8[], %s::int8[])) "
    "UPDATE accounts SET balance = v.balance FROM unnest(%s::int8[], %s::int8[]) "
    "AS v(id, balance) WHERE accounts.id = v.id"
)
#: "unnest" with each array sent as one text literal ('{1,2,3}'), cast on the server: the
#: client joins strings in C instead of dumping every element in Python. Only for values
#: that need no quoting (integers, hex hashes, kind words): no key column.
_UNNEST_TEXT_SQL = (
    f"WITH ins AS (INSERT INTO transfers ({_COLS}) SELECT * FROM unnest("
    "%s::text::int8[], %s::text::text[], %s::text::int8[], %s::text::int8[], %s::text::int8[],"
    " %s::text::int8[], %s::text::text[], %s::text::int8[], %s::text::int8[])) "
    "UPDATE accounts SET balance = v.balance FROM unnest(%s::text::int8[], %s::text::int8[]) "
    "AS v(id, balance) WHERE accounts.id = v.id"
)
_UPDATE_UNNEST_SQL = (
    "UPDATE accounts SET balance = v.balance FROM unnest(%s::int8[], %s::int8[]) "
    "AS v(id, balance) WHERE accounts.id = v.id"
)
_INSERT_ONE_SQL = f"INSERT INTO transfers ({_COLS}) VALUES ({', '.join(['%s'] * 9)})"
_UPDATE_ONE_SQL = "UPDATE accounts SET balance = %s WHERE id = %s"
_ROW_VALUES = "(" + ", ".join(["%s"] * 9) + ")"


def _values_sql(rows: int) -> str:
    return f"INSERT INTO transfers ({_COLS}) VALUES " + ", ".join([_ROW_VALUES] * rows)


def _update_values_sql(rows: int) -> str:
    return (
        "UPDATE accounts SET balance = v.balance FROM (VALUES "
        + ", ".join(["(%s::int8, %s::int8)"] * rows)
        + ") AS v(id, balance) WHERE accounts.id = v.id"
    )


def connect_durable(url: URL) -> Any:
    """A psycopg connection with `synchronous_commit=on` (each commit waits for its WAL
    flush), ints dumped as int8 (the arrays' element type)."""
    import psycopg
    from psycopg.types.numeric import Int8BinaryDumper, Int8Dumper

    conn = psycopg.connect(conninfo(url), options="-c synchronous_commit=on")
    conn.adapters.register_dumper(int, Int8BinaryDumper)
    conn.adapters.register_dumper(int, Int8Dumper)
    return conn


class PostingsRuns:
    """A ceiling writes the ledger the engine writes: every `POSTINGS_RUN_ROWS` rows, the
    batch's transaction also adds their postings in one sorted INSERT and moves the
    watermark (`bank.ledger.postings`), before its COMMIT. `advance(upto, head)` runs the
    backend's statements and returns how many watermark rows moved (1, or W was not upto)."""

    def __init__(self, upto: int, advance: Callable[[int, int], int]) -> None:
        self.upto = upto
        self._advance = advance

    def flush(self, head: int) -> None:
        """Before the COMMIT of a batch whose last seq is `head`."""
        if postings.flush_due(self.upto, head):
            if self._advance(self.upto, head) != 1:
                raise RuntimeError(f"postings_upto was not {self.upto}")
            self.upto = head


def prepare_writer(method: str, conn: Any, work: RawBatches) -> Callable[[], None]:
    """The timed body of one candidate: every batch in its own transaction, committed.

    - unnest: one statement per batch, `WITH ins AS (INSERT ... SELECT * FROM
      unnest(arrays)) UPDATE accounts ... FROM unnest(arrays)`, binary parameters
      (one statement text for every batch size, so it stays prepared);
    - unnest-text: the same statement, each array sent as one text literal built
      with `str.join` (psycopg dumps a list element by element in Python);
    - values: one multi-row `INSERT ... VALUES` page per batch, then `UPDATE ... FROM
      (VALUES ...)` (texts vary with the row count);
    - copy: binary `COPY transfers FROM STDIN`, then the unnest UPDATE;
    - pipeline: `executemany` of one-row INSERTs and UPDATEs in pipeline mode.
    Every candidate also writes the postings as the engine does (`PostingsRuns`).
    Statements and parameters are built here, before the clock (as bench.py's (d) does).
    """
    cur = conn.cursor(binary=True)
    batches = list(zip(work.rows, work.balances, strict=True))
    from bank.ledger.postgres.writer import FLUSH_SQL  # the engine's own statement

    def advance(upto: int, head: int) -> int:
        cur.execute(FLUSH_SQL, {"upto": upto, "head": head})
        return int(cur.rowcount)

    runs = PostingsRuns(0, advance)
    heads = [rows[-1][0] for rows in work.rows]
    if method == "unnest":
        params = [
            [list(col) for col in zip(*rows, strict=True)]
            + [list(col) for col in zip(*bal, strict=True)]
            for rows, bal in batches
        ]

        def write() -> None:
            for p, head in zip(params, heads, strict=True):
                cur.execute(_UNNEST_SQL, p)
                runs.flush(head)
                conn.commit()

        return write
    if method == "unnest-text":
        columns = [
            (list(zip(*rows, strict=True)), list(zip(*bal, strict=True))) for rows, bal in batches
        ]

        def write() -> None:
            # The literals are built inside the clock, as psycopg dumps the lists of "unnest".
            for (cols, bal_cols), head in zip(columns, heads, strict=True):
                cur.execute(
                    _UNNEST_TEXT_SQL,
                    ["{" + ",".join(map(str, col)) + "}" for col in (*cols, *bal_cols)],
                )
                runs.flush(head)
                conn.commit()

        return write
    if method == "values":
        statements = [
            (
                _values_sql(len(rows)),
                [v for row in rows for v in row],
                _update_values_sql(len(bal)),
                [v for pair in bal for v in pair],
            )
            for rows, bal in batches
        ]

        def write() -> None:
            for (ins, ins_params, upd, upd_params), head in zip(statements, heads, strict=True):
                cur.execute(ins, ins_params)
                cur.execute(upd, upd_params)
                runs.flush(head)
                conn.commit()

        return write
    if method == "copy":
        from psycopg.sql import SQL

        copy_sql = SQL(f"COPY transfers ({_COLS}) FROM STDIN (FORMAT BINARY)")
        # Binary COPY needs each column's exact type (int4 or int8 ids, text or varchar).
        oids = dict(
            conn.execute(
                "SELECT attname, atttypid::int8 FROM pg_attribute"
                " WHERE attrelid = 'transfers'::regclass AND attnum > 0"
            ).fetchall()
        )
        types = [oids[c] for c in TRANSFER_COLUMNS]
        conn.commit()
        updates = [[list(col) for col in zip(*bal, strict=True)] for _, bal in batches]

        def write() -> None:
            for (rows, _), upd in zip(batches, updates, strict=True):
                with cur.copy(copy_sql) as copy:
                    copy.set_types(types)
                    for row in rows:
                        copy.write_row(row)
                cur.execute(_UPDATE_UNNEST_SQL, upd)
                runs.flush(rows[-1][0])
                conn.commit()

        return write
    if method == "pipeline":
        flipped = [[(b, i) for i, b in bal] for _, bal in batches]

        def write() -> None:
            for (rows, _), upd in zip(batches, flipped, strict=True):
                with conn.pipeline():
                    cur.executemany(_INSERT_ONE_SQL, rows)
                    cur.executemany(_UPDATE_ONE_SQL, upd)
                runs.flush(rows[-1][0])
                conn.commit()

        return write
    raise ValueError(f"unknown raw method {method!r} (one of {', '.join(RAW_METHODS)})")


def check_ceiling(url: URL, work: RawBatches, accounts: int, opening: int) -> list[str]:
    """Problems with what a candidate committed: row count, chain head, exact balances."""
    import psycopg

    problems: list[str] = []
    expected_rows = sum(len(r) for r in work.rows)
    with psycopg.connect(conninfo(url)) as conn:
        count, last = conn.execute(
            "SELECT count(*), (SELECT hash FROM transfers ORDER BY seq DESC LIMIT 1) FROM transfers"
        ).fetchone() or (0, None)
        balances: dict[int, int] = dict(
            conn.execute("SELECT id, balance FROM accounts WHERE id > 0").fetchall()
        )
        total = conn.execute("SELECT sum(balance)::int8 FROM accounts WHERE id > 0").fetchone()
        upto, posted = conn.execute(
            "SELECT (SELECT seq FROM postings_upto WHERE id = 1), (SELECT count(*) FROM postings)"
        ).fetchone() or (None, None)
    if upto is None or expected_rows - upto >= postings.POSTINGS_RUN_ROWS + max(
        (len(r) for r in work.rows), default=0
    ):
        problems.append(f"the postings watermark is {upto}: the postings were not written")
    elif posted != 2 * upto:
        problems.append(f"{posted} postings up to {upto}, expected {2 * upto}")
    if count != expected_rows:
        problems.append(f"{count} transfer rows committed, expected {expected_rows}")
    if expected_rows and last != work.head:
        problems.append("the last row's hash is not the chain's head")
    wrong = [i for i, b in work.final.items() if balances.get(i) != b]
    if wrong:
        problems.append(f"{len(wrong)} wrong balances (account {wrong[0]} first)")
    if total is None or total[0] != accounts * opening:
        problems.append(f"customer balances sum to {total}, not {accounts * opening}")
    return problems


# -- pgbench TPC-B ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PgbenchRun:
    """One `pgbench -c C -j J -T S` run, as pgbench reported it."""

    tps: float
    transactions: int
    failed: int
    cpu_seconds: float  # pgbench's own CPU (user + system)
    command: str


def pgbench_init(url: URL, scale: int) -> None:
    """`pgbench -i -s scale` (its four tables, vacuumed) on the database of `url`."""
    exe = postgres_bin("pgbench")
    assert exe is not None
    subprocess.run(
        [str(exe), "-i", "-q", "-s", str(scale)],
        env=libpq_env(url),
        check=True,
        capture_output=True,
    )


def pgbench_run(url: URL, clients: int, threads: int, seconds: int) -> PgbenchRun:
    """The built-in TPC-B-like script, durable (`synchronous_commit=on` for its sessions)."""
    import resource

    exe = postgres_bin("pgbench")
    assert exe is not None
    env = libpq_env(url)
    env["PGOPTIONS"] = "-c synchronous_commit=on"
    argv = [str(exe), "-c", str(clients), "-j", str(threads), "-T", str(seconds)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(argv, env=env, check=True, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = done.stdout
    tps = re.search(r"^tps = ([0-9.]+)", out, re.MULTILINE)
    processed = re.search(r"number of transactions actually processed: (\d+)", out)
    failed = re.search(r"number of failed transactions: (\d+)", out)
    if tps is None or processed is None:
        raise RuntimeError(f"cannot read pgbench's output: {out[-300:]!r}")
    return PgbenchRun(
        tps=float(tps.group(1)),
        transactions=int(processed.group(1)),
        failed=int(failed.group(1)) if failed else 0,
        cpu_seconds=(after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        command="PGOPTIONS='-c synchronous_commit=on' pgbench " + " ".join(argv[1:]),
    )


def pgbench_sums(url: URL) -> tuple[int, int, int, int]:
    """The sums of pgbench's accounts, branches, tellers and history deltas."""
    import psycopg

    with psycopg.connect(conninfo(url)) as conn:
        row = conn.execute(
            "SELECT (SELECT coalesce(sum(abalance), 0) FROM pgbench_accounts)::int8,"
            " (SELECT coalesce(sum(bbalance), 0) FROM pgbench_branches)::int8,"
            " (SELECT coalesce(sum(tbalance), 0) FROM pgbench_tellers)::int8,"
            " (SELECT coalesce(sum(delta), 0) FROM pgbench_history)::int8"
        ).fetchone()
    assert row is not None
    return row[0], row[1], row[2], row[3]


def pgbench_check(url: URL, before: tuple[int, int, int, int]) -> list[str]:
    """TPC-B's consistency: what this run added to each level's balances is the sum of
    the deltas in history (which pgbench empties at the start of every run)."""
    after = pgbench_sums(url)
    added = tuple(a - b for a, b in zip(after[:3], before[:3], strict=True))
    if set(added) != {after[3]}:
        return [
            f"pgbench: balances grew by {added} (accounts, branches, tellers), "
            f"history deltas sum to {after[3]}"
        ]
    return []
