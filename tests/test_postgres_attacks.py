"""Attacks on the PostgreSQL backend's promises, with real processes and real servers.

- The server crashes (every server process SIGKILLed) under keyed load with
  durability=full: the bank answers everything in flight (`LedgerUnavailable`), stops,
  and after the server's crash recovery every acknowledged key is there with its seq.
- Two processes race `Bank.open` on one empty database: one wins, one is `LedgerBusy`;
  a standby does not get in while the holder writes.
- The server stops, or the lease session is terminated, while tellers submit: every
  future is answered within a bound and `close()` returns.
- The server freezes (every process SIGSTOPped: sockets open, the kernel ACKing) under
  keyed load: the lease probe's deadline ends every wait, and nothing acknowledged is lost.
- Bad inputs at open are specific one-line `BankError`s that never show the password.

Server kills run on throwaway clusters (`_Cluster`); the rest on the shared server.
"""

# ruff: noqa: E402  (the importorskip below must run before the backend is imported)
from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (the postgres extra)")

from sqlalchemy.engine import make_url

import bank
from bank.errors import BankError, CannotOpenLedger, NotALedger
from bank.ledger.postgres.lease import Lease
from tests import postgres

REPO_ROOT = Path(__file__).resolve().parents[1]


# -- a throwaway cluster that can be crashed and restarted ---------------------------------


class _Cluster:
    """A private cluster on 127.0.0.1 (fsync on), for tests that kill or stop its server.

    `auth_host`: the pg_hba method for TCP connections (`trust`, or `scram-sha-256` to
    check passwords); the unix socket is always `trust` (for the superuser's set-up).
    """

    def __init__(self, root: Path, auth_host: str = "trust") -> None:
        bindir = postgres.find_bindir()
        if bindir is None:
            reason = "no PostgreSQL server binaries (initdb, pg_ctl) on this machine"
            if postgres.required():
                pytest.fail(f"{reason} ({postgres.ENV_REQUIRE}=1 requires them)", pytrace=False)
            pytest.skip(reason)
        self.bindir = bindir
        self.root = root
        self.data = root / "data"
        self.socket = root / "socket"
        self.port = postgres._free_port()
        self.auth_host = auth_host

    def url(self, user: str = postgres.SUPERUSER, password: str | None = None) -> str:
        secret = f":{password}" if password is not None else ""
        return f"postgresql+psycopg://{user}{secret}@127.0.0.1:{self.port}/postgres"

    def admin(self) -> Any:
        """A superuser connection over the unix socket (always trusted)."""
        return psycopg.connect(
            host=str(self.socket),
            port=self.port,
            user=postgres.SUPERUSER,
            dbname="postgres",
            autocommit=True,
        )

    def _run(self, *argv: str) -> None:
        done = subprocess.run(
            postgres._as_owner(list(argv)), check=False, capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            log = self.root / "log"
            tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
            raise AssertionError(f"{argv[0]} failed: {done.stderr.strip()[-1500:]} {tail}")

    def init(self) -> None:
        self.socket.mkdir(parents=True)
        for path in (self.root, self.socket):
            postgres._chown_to_owner(path)
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            postgres.SUPERUSER,
            "--auth-local=trust",
            f"--auth-host={self.auth_host}",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )
        self.start()

    def start(self) -> None:
        options = " ".join(f"-c {k}={v}" for k, v in postgres.CLUSTER_SETTINGS.items())
        options += f" -c port={self.port} -c unix_socket_directories={self.socket}"
        self._run(
            str(self.bindir / "pg_ctl"),
            "start",
            "-w",
            "-t",
            "60",
            "-D",
            str(self.data),
            "-l",
            str(self.root / "log"),
            "-o",
            options,
        )

    def postmaster_pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])

    def crash(self) -> None:
        """SIGKILL the postmaster and every server process at once (a crash of the server,
        as the OOM killer or a power cut of the process tree leaves it), and wait until
        none is left."""
        master = self.postmaster_pid()
        victims = [master, *_children(master)]
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in victims):
            assert time.monotonic() < deadline, "server processes survived SIGKILL"
            time.sleep(0.01)

    def stop(self, mode: str = "immediate") -> None:
        if (self.data / "postmaster.pid").exists():
            subprocess.run(
                postgres._as_owner(
                    [str(self.bindir / "pg_ctl"), "stop", "-m", mode, "-D", str(self.data)]
                ),
                capture_output=True,
                check=False,
                timeout=60,
            )


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    """Until reaped: a server's lock-file check counts a zombie postmaster as running."""
    return Path(f"/proc/{pid}").exists()


@pytest.fixture
def cluster() -> Iterator[_Cluster]:
    root = postgres.scratch_dir("bank-pg-attack-")
    c = _Cluster(root)
    try:
        c.init()
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


# -- a bank under keyed load in a child process --------------------------------------------

#: argv: url acks durability tellers. Opens a bank, opens accounts, then tellers submit
#: keyed deposits and transfers (single and batched) and append one line per answer to
#: the ack file: `A key seq` a receipt, `R key Reason` a refusal, `U key` LedgerUnavailable,
#: `C key` BankClosed, `H key` no answer within 30 s (a hang). A teller stops at the first
#: error of the bank itself; then the child closes the bank and prints how long that took.
TELLERS = r"""
import os, sys, threading, time
import bank
url, acks, durability, tellers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
b = bank.Bank.open(url, workers=3, durability=durability)
ids = [b.open_account(f"acct-{i}", overdraft_limit=1000).id for i in range(4)]
fd = os.open(acks, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
def ack(line):
    os.write(fd, (line + "\n").encode())
print("open", flush=True)
def teller(t):
    n = 0
    while True:
        batch = []
        for _ in range((1, 3, 8)[n % 3]):
            n += 1
            key = f"t{t}-{n}"
            if n % 4 == 0:
                batch.append(bank.Deposit(account=ids[n % 4], amount=100, key=key))
            else:
                batch.append(bank.Transfer(source=ids[n % 4], target=ids[(n + 1) % 4],
                                           amount=7, key=key))
        try:
            futures = b.submit_many(batch)
        except bank.BankError as exc:
            ack(f"S t{t} {type(exc).__name__}")
            return
        stop = False
        for command, future in zip(batch, futures):
            try:
                r = future.result(timeout=30)
            except TimeoutError:
                ack(f"H {command.key}")
                stop = True
            except bank.LedgerUnavailable:
                ack(f"U {command.key}")
                stop = True
            except bank.BankClosed:
                ack(f"C {command.key}")
                stop = True
            except bank.BankError as exc:
                ack(f"R {command.key} {type(exc).__name__}")
            else:
                ack(f"A {command.key} {r.seq}")
        if stop:
            return
threads = [threading.Thread(target=teller, args=(t,), daemon=True) for t in range(tellers)]
for th in threads:
    th.start()
for th in threads:
    th.join(60)
print("tellers", sum(th.is_alive() for th in threads), flush=True)
t0 = time.monotonic()
b.close()
print("closed", round(time.monotonic() - t0, 3), flush=True)
"""


def _tellers(url: str, acks: Path, durability: str, tellers: int = 4) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", TELLERS, url, str(acks), durability, str(tellers)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _acks(path: Path) -> list[list[str]]:
    if not path.exists():
        return []
    return [line.split() for line in path.read_text().split("\n")[:-1]]


def _wait_for_acks(proc: subprocess.Popen[str], acks: Path, count: int) -> None:
    deadline = time.monotonic() + 30
    while sum(1 for a in _acks(acks) if a[0] == "A") < count:
        assert proc.poll() is None, f"the bank process ended early: {proc.communicate()}"
        assert time.monotonic() < deadline, "no acknowledgements in time"
        time.sleep(0.01)


def _finish(proc: subprocess.Popen[str], within_s: float) -> str:
    """The child's stdout once it has exited by itself within `within_s` (the watchdog)."""
    try:
        out, err = proc.communicate(timeout=within_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"watchdog: the bank process did not finish in {within_s} s:\n{out}\n{err}")
    assert proc.returncode == 0, f"the bank process failed ({proc.returncode}):\n{out}\n{err}"
    return out


def _check_ledger(url: str, acks: list[list[str]], wait_s: float = 0.0) -> None:
    """Every acknowledged key with its seq, no refused key, a clean audit."""
    acked = {a[1]: int(a[2]) for a in acks if a[0] == "A"}
    refused = [a[1] for a in acks if a[0] == "R"]
    with bank.Bank.open(url, wait_s=wait_s) as b:
        missing = {k: s for k, s in acked.items() if (r := b.find(k)) is None or r.seq != s}
        assert missing == {}, f"acknowledged keys lost or moved: {list(missing.items())[:10]}"
        present = [k for k in refused if b.find(k) is not None]
        assert present == [], f"refused keys in the ledger: {present[:10]}"
        report = b.audit()
        assert report.ok, report.problems[:5]
        seq = b.snapshot().seq
    assert seq >= max(acked.values(), default=0)


# -- 1. nothing acknowledged is lost when the server crashes -------------------------------


def _take_down(cluster: _Cluster, how: str) -> None:
    if how == "sigkill":
        cluster.crash()
    else:
        cluster.stop(how)


@pytest.mark.postgres
@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["sigkill", "immediate", "fast"])
def test_the_server_going_down_under_load_loses_nothing_acknowledged(
    cluster: _Cluster, tmp_path: Path, how: str
) -> None:
    """`sigkill`: every server process killed at once (a crash: WAL replay at restart);
    `immediate`: `pg_ctl stop -m immediate` (the same, by the postmaster); `fast`: the
    server ends every session and shuts down cleanly. Every wait of the bank ends
    (`LedgerUnavailable`), `close()` returns, and after the restart every acknowledged key
    is there with its seq, no refused key is, and the audit is clean."""
    url = cluster.url()
    acks = tmp_path / "acks"
    proc = _tellers(url, acks, "full", tellers=6)
    try:
        _wait_for_acks(proc, acks, 300)
        _take_down(cluster, how)
        out = _finish(proc, 20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = _acks(acks)
    tags = {a[0] for a in lines}
    assert "H" not in tags, "a future was not answered within 30 s"
    assert "C" not in tags, "BankClosed for work in flight: the bank was not closed"
    assert "U" in tags or "S" in tags, f"nobody was told the ledger broke: {tags}"
    assert "tellers 0" in out, out
    closed = float(out.split("closed", 1)[1].split()[0])
    assert closed < 5, f"close() took {closed} s"
    counts = {t: sum(1 for a in lines if a[0] == t) for t in sorted(tags)}
    print(f"answers after {how}: {counts}; close() took {closed} s")
    cluster.start()  # after a crash: recovery replays the WAL
    _check_ledger(url, lines)


# -- 3. every wait ends when the bank's sessions are cut -----------------------------------


def _bank_pids(url: str, admin_url: str) -> dict[str, int]:
    """application_name/backend pid of every session on `url`'s database but this one."""
    database = make_url(url).database
    with psycopg.connect(postgres.libpq_conninfo(admin_url), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid, application_name FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (database,),
        ).fetchall()
    return {f"{app}/{pid}": pid for pid, app in rows}


def _terminate(admin_url: str, pids: list[int]) -> None:
    with psycopg.connect(postgres.libpq_conninfo(admin_url), autocommit=True) as conn:
        for pid in pids:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))


@pytest.mark.postgres
@pytest.mark.timeout(60)
@pytest.mark.parametrize("victim", ["lease", "writer", "every session"])
def test_cutting_the_banks_sessions_answers_every_future_and_close_returns(
    postgres_server: postgres.Server, pg_url: str, victim: str
) -> None:
    b = bank.Bank.open(pg_url, workers=4)
    futures: list[Future[bank.Receipt]] = []
    stop = threading.Event()
    errors: list[BaseException] = []
    try:
        ids = [b.open_account(f"a{i}").id for i in range(4)]

        def teller(t: int) -> None:
            n = 0
            while not stop.is_set():
                batch = []
                for _ in range(16):
                    n += 1
                    batch.append(bank.Deposit(account=ids[n % 4], amount=1, key=f"t{t}-{n}"))
                try:
                    futures.extend(b.submit_many(batch))
                except (bank.LedgerUnavailable, bank.BankClosed):
                    return
                except BaseException as exc:
                    errors.append(exc)
                    return
                time.sleep(0.001)

        tellers = [threading.Thread(target=teller, args=(t,), daemon=True) for t in range(8)]
        for th in tellers:
            th.start()
        deadline = time.monotonic() + 20
        while sum(f.done() for f in list(futures)) < 500:
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.01)
        assert isinstance(b._owner, Lease)
        lease_pid = b._owner.backend_pid
        sessions = _bank_pids(pg_url, postgres_server.url)
        if victim == "lease":
            pids = [lease_pid]
        elif victim == "writer":  # the session that runs the batches (not the lease)
            pids = _writer_pids(postgres_server.url, pg_url, lease_pid)
        else:
            pids = list(sessions.values())
        assert pids, sessions
        _terminate(postgres_server.url, pids)
        cut = time.monotonic()
        stop.set()
        for th in tellers:
            th.join(10)
        assert not any(th.is_alive() for th in tellers), "a teller is stuck in submit"
        pending = [f for f in futures if not f.done()]
        deadline = time.monotonic() + 10
        while pending and time.monotonic() < deadline:
            time.sleep(0.01)
            pending = [f for f in pending if not f.done()]
        assert not pending, f"{len(pending)} of {len(futures)} futures unanswered 10 s after"
        answered_s = time.monotonic() - cut
        outcomes = Counter(
            type(f.exception()).__name__ if f.exception() else "Receipt" for f in futures
        )
        assert set(outcomes) <= {"Receipt", "LedgerUnavailable"}, outcomes
        assert outcomes["LedgerUnavailable"] > 0, outcomes
        with pytest.raises(bank.LedgerUnavailable):
            b.deposit(ids[0], 1)
        print(f"{victim}: {dict(outcomes)}, every future answered {answered_s:.2f} s after")
    finally:
        stop.set()
        t0 = time.monotonic()
        b.close()
        took = time.monotonic() - t0
    assert not errors, errors
    assert took < 5, f"close() took {took:.1f} s"
    acked = [["A", f.result().key or "", str(f.result().seq)] for f in futures if not f.exception()]
    _check_ledger(pg_url, acked)


def _writer_pids(admin_url: str, url: str, lease_pid: int) -> list[int]:
    """The session of the bank's writer: the one that has run the batch statement."""
    database = make_url(url).database
    deadline = time.monotonic() + 5
    with psycopg.connect(postgres.libpq_conninfo(admin_url), autocommit=True) as conn:
        while time.monotonic() < deadline:
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> %s "
                "AND (query LIKE '%%unnest%%' OR query LIKE 'COMMIT%%' "
                "OR query LIKE '%%pg_advisory_xact_lock_shared%%')",
                (database, lease_pid),
            ).fetchall()
            if rows:
                return [r[0] for r in rows]
            time.sleep(0.005)
    return []


# -- 2. one writer per ledger ----------------------------------------------------------------

#: argv: url wait_s. Says "ready" once imported, opens the bank when told "go" on stdin
#: (so two of them race), deposits with keys until stdin closes, then closes the bank.
RACER = r"""
import sys, time
import bank
url, wait_s = sys.argv[1], float(sys.argv[2])
print("ready", flush=True)
sys.stdin.readline()
t0 = time.monotonic()
try:
    b = bank.Bank.open(url, wait_s=wait_s)
except bank.BankError as exc:
    print("refused", type(exc).__name__, round(time.monotonic() - t0, 2), str(exc), flush=True)
    sys.exit(0)
print("won", flush=True)
account = b.open_account("racer").id
i = 0
import select
while not select.select([sys.stdin], [], [], 0)[0]:
    i += 1
    b.deposit(account, 1, key=f"racer-{i}")
b.close()
print("closed", i, flush=True)
"""


def _racer(url: str, wait_s: float) -> subprocess.Popen[str]:
    return _ready(_start_racer(url, wait_s))


def _start_racer(url: str, wait_s: float) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", RACER, url, str(wait_s)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _ready(proc: subprocess.Popen[str]) -> subprocess.Popen[str]:
    """`proc` once it has said it is ready (imported `bank`)."""
    assert proc.stdout is not None
    assert proc.stdout.readline() == "ready\n", proc.communicate()
    return proc


def _say(proc: subprocess.Popen[str], line: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(line)
    proc.stdin.flush()


@pytest.mark.postgres
@pytest.mark.timeout(60)
def test_two_processes_racing_to_create_one_ledger_one_wins_one_is_busy(
    postgres_server: postgres.Server,
) -> None:
    for _ in range(3):  # a few rounds: the instant of the race varies
        with postgres_server.database("race") as url:
            # Both interpreters start at once (importing bank is most of a racer's start).
            racers = [_start_racer(url, 0), _start_racer(url, 0)]
            try:
                for proc in racers:
                    _ready(proc)
                for proc in racers:
                    _say(proc, "go\n")
                first = [_line(proc) for proc in racers]
                winners = [p for p, line in zip(racers, first, strict=True) if line == "won"]
                refused = [line for line in first if line.startswith("refused")]
                assert len(winners) == 1 and len(refused) == 1, first
                assert refused[0].split()[1] == "LedgerBusy", refused[0]
                assert "another bank writes the ledger" in refused[0], refused[0]
                time.sleep(0.3)  # the winner writes a while
                _say(winners[0], "stop\n")
                out = _finish(winners[0], 20)
                assert out.startswith("closed"), out
            finally:
                for proc in racers:
                    if proc.poll() is None:
                        proc.kill()
                    proc.communicate()
            with bank.Bank.open(url) as b:
                assert b.audit().ok
                assert b.find("racer-1") is not None


def _line(proc: subprocess.Popen[str], timeout: float = 30) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "no answer from the child in time"
    return proc.stdout.readline().strip()


@pytest.mark.postgres
@pytest.mark.timeout(60)
def test_a_standby_does_not_get_in_while_the_holder_writes(pg_url: str) -> None:
    holder = _racer(pg_url, 0)
    standby: subprocess.Popen[str] | None = None
    try:
        _say(holder, "go\n")
        assert _line(holder) == "won"
        standby = _racer(pg_url, 2)
        _say(standby, "go\n")
        line = _line(standby, 20)
        assert line.startswith("refused LedgerBusy"), line
        waited = float(line.split()[2])
        assert 2 <= waited < 6, line
        assert "waited 2 s" in line, line
        _say(holder, "stop\n")
        out = _finish(holder, 20)
        assert out.startswith("closed") and int(out.split()[1]) > 0, out
    finally:
        for proc in (holder, standby):
            if proc is not None:
                if proc.poll() is None:
                    proc.kill()
                proc.communicate()
    with bank.Bank.open(pg_url) as b:
        assert b.audit().ok


# -- 4. bad inputs at open ---------------------------------------------------------------------

SECRET = "s3cr3t-pw"


def _open_error(url: str) -> BankError:
    t0 = time.monotonic()
    with pytest.raises(BankError) as info:
        bank.Bank.open(url).close()
    assert time.monotonic() - t0 < 15, "the refusal took too long"
    error = info.value
    message = str(error)
    assert "\n" not in message, message
    assert SECRET not in message and SECRET not in repr(error), message
    assert error.__cause__ is None or SECRET not in str(error.__cause__)
    return error


@pytest.fixture(scope="module")
def password_cluster() -> Iterator[_Cluster]:
    """A cluster that checks passwords over TCP (scram-sha-256), with a role `teller`."""
    root = postgres.scratch_dir("bank-pg-auth-")
    c = _Cluster(root, auth_host="scram-sha-256")
    try:
        c.init()
        with c.admin() as conn:
            conn.execute(f"CREATE ROLE teller LOGIN PASSWORD '{SECRET}x'")
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.postgres
def test_a_wrong_password_is_refused_without_showing_it(password_cluster: _Cluster) -> None:
    error = _open_error(password_cluster.url("teller", SECRET))
    assert type(error) is CannotOpenLedger, repr(error)
    assert "refused these credentials" in str(error), error
    assert "***" in str(error), error


@pytest.mark.postgres
def test_an_unreachable_server_is_refused_specifically(postgres_server: postgres.Server) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    error = _open_error(f"postgresql+psycopg://u:{SECRET}@127.0.0.1:{port}/ledger")
    assert type(error) is CannotOpenLedger, repr(error)
    assert "no PostgreSQL server answers" in str(error), error


@pytest.mark.postgres
@pytest.mark.parametrize("kind", ["table", "foreign table", "view"])
def test_a_database_of_another_program_is_not_touched(
    postgres_server: postgres.Server, pg_url: str, kind: str
) -> None:
    ddl = {
        "table": ["CREATE TABLE customers (id int)"],
        "foreign table": [
            "CREATE EXTENSION file_fdw",
            "CREATE SERVER files FOREIGN DATA WRAPPER file_fdw",
            "CREATE FOREIGN TABLE customers (id int) SERVER files OPTIONS (filename '/dev/null')",
        ],
        "view": ["CREATE VIEW customers AS SELECT 1 AS id"],
    }[kind]
    with psycopg.connect(postgres.libpq_conninfo(pg_url), autocommit=True) as conn:
        for sql in ddl:
            conn.execute(sql)
    user = make_url(pg_url).username
    error = _open_error(pg_url.replace(f"{user}@", f"{user}:{SECRET}@"))
    assert type(error) is NotALedger, repr(error)
    assert "customers" in str(error), error
    with psycopg.connect(postgres.libpq_conninfo(pg_url)) as conn:
        tables = conn.execute(
            "SELECT relname FROM pg_class c JOIN pg_namespace n ON n.oid = relnamespace "
            "WHERE nspname = 'public' AND relkind IN ('r', 'v', 'f', 'p')"
        ).fetchall()
    assert tables == [("customers",)], tables  # nothing was created beside it


def _role(pg_url: str, name: str, *grants: str) -> str:
    """A login role `name` on `pg_url`'s server with `grants`; its URL (with the password)."""
    database = make_url(pg_url).database
    with psycopg.connect(postgres.libpq_conninfo(pg_url), autocommit=True) as conn:
        conn.execute(f"DROP ROLE IF EXISTS {name}")
        conn.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{SECRET}'")
        conn.execute(f"GRANT CONNECT ON DATABASE {database} TO {name}")
        for sql in grants:
            conn.execute(sql.format(role=name))
    return str(make_url(pg_url).set(username=name, password=SECRET).render_as_string(False))


def _drop_role(pg_url: str, name: str) -> None:
    with psycopg.connect(postgres.libpq_conninfo(pg_url), autocommit=True) as conn:
        conn.execute(f"DROP OWNED BY {name}")
        conn.execute(f"DROP ROLE IF EXISTS {name}")


@pytest.mark.postgres
def test_a_read_only_role_is_refused_on_a_new_and_on_an_existing_ledger(pg_url: str) -> None:
    role = f"reader_{os.getpid()}"
    url = _role(pg_url, role)
    try:
        # An empty database: the role may not create the ledger's tables.
        error = _open_error(url)
        assert type(error) is CannotOpenLedger, repr(error)
        assert "privilege" in str(error), error
        # An existing ledger: SELECT only.
        with bank.Bank.open(pg_url) as b:
            b.deposit(b.open_account("alice").id, 5, key="k")
        with psycopg.connect(postgres.libpq_conninfo(pg_url), autocommit=True) as conn:
            conn.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}")
        error = _open_error(url)
        assert type(error) is CannotOpenLedger, repr(error)
        assert "lacks INSERT on accounts" in str(error), error
        # A role whose sessions are read-only.
        with psycopg.connect(postgres.libpq_conninfo(pg_url), autocommit=True) as conn:
            conn.execute(f"GRANT INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO {role}")
            conn.execute(f"ALTER ROLE {role} SET default_transaction_read_only = on")
        error = _open_error(url)
        assert type(error) is CannotOpenLedger, repr(error)
        assert "read-only" in str(error), error
        with bank.Bank.open(pg_url) as b:  # nothing was written by the refused opens
            assert b.audit().ok and b.snapshot().seq == 1
    finally:
        _drop_role(pg_url, role)


# -- 4. a server that stops answering (frozen, not dead) ------------------------------------

#: The lease probe's deadline in the frozen-server test (the default is 15 s).
FROZEN_PROBE_TIMEOUT_S = 2.0


@pytest.mark.postgres
@pytest.mark.timeout(90)
def test_a_frozen_server_answers_every_future_within_a_bound(
    cluster: _Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every server process SIGSTOPped under keyed load (a hung machine): the sockets stay
    open and ACKed, so no keepalive or `tcp_user_timeout` fires, and the writer's COMMIT,
    the workers' key look-ups and the lease probe all wait on the server. The probe's
    deadline loses the lease and cuts the bank's connections: every future is answered
    (a receipt or `LedgerUnavailable`) within a bound while the server stays frozen,
    `close()` returns, and after SIGCONT every acknowledged key is there, the audit clean."""
    from bank.ledger.postgres import lease as pg_lease

    monkeypatch.setattr(pg_lease, "PROBE_TIMEOUT_S", FROZEN_PROBE_TIMEOUT_S)
    url = cluster.url()
    b = bank.Bank.open(url, workers=3)
    master = cluster.postmaster_pid()
    frozen: list[int] = []
    futures: list[Future[bank.Receipt]] = []
    stop = threading.Event()
    errors: list[BaseException] = []
    closed_s = answered_s = 0.0
    try:
        ids = [b.open_account(f"a{i}").id for i in range(4)]

        def teller(t: int) -> None:
            n = 0
            while not stop.is_set():
                batch = []
                for _ in range(8):
                    n += 1
                    batch.append(bank.Deposit(account=ids[n % 4], amount=1, key=f"t{t}-{n}"))
                try:
                    futures.extend(b.submit_many(batch))
                except (bank.LedgerUnavailable, bank.BankClosed):
                    return
                except BaseException as exc:
                    errors.append(exc)
                    return
                time.sleep(0.001)

        tellers = [threading.Thread(target=teller, args=(t,), daemon=True) for t in range(6)]
        for th in tellers:
            th.start()
        deadline = time.monotonic() + 20
        while sum(f.done() for f in list(futures)) < 300:
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.01)
        frozen = [master, *_children(master)]
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        froze = time.monotonic()
        # The tellers go on submitting into the frozen server until the bank stops.
        for th in tellers:
            th.join(FROZEN_PROBE_TIMEOUT_S + 10)
        assert not any(th.is_alive() for th in tellers), "a teller is stuck in submit"
        # After the deadline every queued future (thousands) is failed one by one; on a
        # loaded machine that takes seconds of CPU. The bound stays below the default
        # deadline (LEASE_PROBE_TIMEOUT_S, 15 s), so only the 2-s deadline can meet it.
        bound = FROZEN_PROBE_TIMEOUT_S + 10
        pending = [f for f in futures if not f.done()]
        while pending and time.monotonic() < froze + bound:
            time.sleep(0.01)
            pending = [f for f in pending if not f.done()]
        assert not pending, f"{len(pending)} of {len(futures)} futures unanswered {bound} s after"
        answered_s = time.monotonic() - froze
        outcomes = Counter(
            type(f.exception()).__name__ if f.exception() else "Receipt" for f in futures
        )
        assert set(outcomes) <= {"Receipt", "LedgerUnavailable"}, outcomes
        assert outcomes["LedgerUnavailable"] > 0, outcomes
        with pytest.raises(bank.LedgerUnavailable, match="did not answer") as refused:
            b.deposit(ids[0], 1)
        assert f"within {FROZEN_PROBE_TIMEOUT_S:g} s" in str(refused.value)
        t0 = time.monotonic()
        b.close()  # the server is still frozen
        closed_s = time.monotonic() - t0
        assert closed_s < 5, f"close() took {closed_s:.1f} s on the frozen server"
        print(
            f"frozen: {dict(outcomes)}; every future answered {answered_s:.2f} s after the "
            f"freeze (probe deadline {FROZEN_PROBE_TIMEOUT_S:g} s); close() took {closed_s:.2f} s"
        )
    finally:
        stop.set()
        for pid in frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        b.close()
    assert not errors, errors
    acked = [["A", f.result().key or "", str(f.result().seq)] for f in futures if not f.exception()]
    # The old sessions end once the resumed server reads their EOF (the lease with them).
    _check_ledger(url, acked, wait_s=30)
