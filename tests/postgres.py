"""A real PostgreSQL server for the tests, and a fresh empty database per test.

`BANK_TEST_POSTGRES_URL` (an SQLAlchemy URL of a superuser's maintenance database)
names a running server; without it the tests start a throwaway cluster from the
PostgreSQL binaries on the machine (`initdb` + `pg_ctl` in a temporary directory, a
private port and socket directory, fsync on: the bank refuses a server without it) and
stop it at the end. Its files live in RAM (`scratch_dir`) where the machine has a tmpfs. With neither, the PostgreSQL tests are skipped for one stated
reason, and `BANK_REQUIRE_POSTGRES=1` (set by `.ci/run`) turns that skip into a failure.

Also a command line for scripts (`.ci/run`):

    python -m tests.postgres start DIR   # start a cluster in DIR, print its URL
    python -m tests.postgres stop DIR    # stop it (immediately) and remove DIR
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import URL, make_url

ENV_URL = "BANK_TEST_POSTGRES_URL"
ENV_REQUIRE = "BANK_REQUIRE_POSTGRES"
ENV_PREFIX = "BANK_TEST_DB_PREFIX"
#: Settings of a throwaway cluster: real fsync, small memory, room for many banks at once.
CLUSTER_SETTINGS: dict[str, str] = {
    "fsync": "on",
    "shared_buffers": "16MB",
    "max_connections": "200",
    "listen_addresses": "127.0.0.1",
    "max_wal_size": "256MB",
    "log_min_messages": "warning",
}
START_TIMEOUT_S = 60
SUPERUSER = "postgres"
_names = itertools.count(1)


class NoPostgres(Exception):
    """No PostgreSQL server for the tests; the message is the one-line reason."""


def required() -> bool:
    """True when a missing server must fail the run instead of skipping (`.ci/run`)."""
    return os.environ.get(ENV_REQUIRE, "") not in ("", "0")


def find_bindir() -> Path | None:
    """The directory holding `initdb` and `pg_ctl`: PATH, `pg_config --bindir`, Debian's layout."""
    initdb = shutil.which("initdb")
    if initdb is not None and shutil.which("pg_ctl") is not None:
        return Path(initdb).resolve().parent
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()
            candidates.append(Path(out))
    # Newest major version first.
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    versions.sort(key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0)
    candidates += [Path(p) for p in reversed(versions)]
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file():
            return bindir
    return None


#: Where throwaway clusters live when it is a writable tmpfs (else the system's temp dir).
RAM_DIR = Path("/dev/shm")


def scratch_dir(prefix: str) -> Path:
    """A new private directory for a throwaway cluster, in RAM when the machine has a tmpfs.

    A cluster on a tmpfs keeps fsync on (the bank checks it) but its fsyncs cost nothing,
    which is most of a test's wait on a busy disk. No test can tell the difference: the
    crash tests kill processes (the server's, the bank's), never the machine, and the
    page cache a SIGKILLed server leaves behind is all a disk would have kept too.
    """
    if ram_dir_usable():
        return Path(tempfile.mkdtemp(prefix=prefix, dir=RAM_DIR))
    return Path(tempfile.mkdtemp(prefix=prefix))


#: Free space `RAM_DIR` must have to be used: a container's default /dev/shm (64 MiB)
#: would fill up with two clusters and the suite's ledgers, failing tests with ENOSPC.
RAM_DIR_FREE_MIN_BYTES = 2 * 1024**3


def ram_dir_usable() -> bool:
    """True when `RAM_DIR` exists, this process may create directories in it, and it has
    room for the suite (`RAM_DIR_FREE_MIN_BYTES`); else the system's temp dir is used."""
    if not (RAM_DIR.is_dir() and os.access(RAM_DIR, os.W_OK | os.X_OK)):
        return False
    return shutil.disk_usage(RAM_DIR).free >= RAM_DIR_FREE_MIN_BYTES


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _as_owner(argv: list[str]) -> list[str]:
    """`argv` run as the `postgres` user when we are root (initdb and postgres refuse root)."""
    if os.geteuid() != 0:
        return argv
    runuser = shutil.which("runuser")
    if runuser is None:
        raise NoPostgres("running as root and no `runuser` to start PostgreSQL as `postgres`")
    return [runuser, "-u", SUPERUSER, "--", *argv]


def _chown_to_owner(path: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, user=SUPERUSER, group=None)


@dataclass
class Cluster:
    """A throwaway cluster in `root` (data/, socket/, log), on `port` of 127.0.0.1."""

    root: Path
    bindir: Path
    port: int = field(default_factory=_free_port)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        """initdb and start the server; raises `NoPostgres` (with the log's tail) on failure."""
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "socket").mkdir(exist_ok=True)
        for path in (self.root, self.root / "socket"):
            _chown_to_owner(path)
        self._run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",  # the cluster's files: no need to sync them at creation
            ],
            "initdb",
        )
        options = " ".join(f"-c {k}={v}" for k, v in CLUSTER_SETTINGS.items())
        options += f" -c port={self.port} -c unix_socket_directories={self.root / 'socket'}"
        self._run(
            [
                str(self.bindir / "pg_ctl"),
                "start",
                "-w",
                "-t",
                str(START_TIMEOUT_S),
                "-D",
                str(self.data),
                "-l",
                str(self.root / "log"),
                "-o",
                options,
            ],
            "pg_ctl start",
        )

    def stop_when_gone(self, pid: int) -> None:
        """Stop the cluster once process `pid` has ended, however it ended (a test run
        killed by SIGKILL leaves no server behind): a small watcher in its own session."""
        watcher = (
            "import os, sys, time\n"
            "from tests.postgres import Cluster\n"
            "from pathlib import Path\n"
            "pid = int(sys.argv[1])\n"
            "while True:\n"
            "    try:\n"
            "        os.kill(pid, 0)\n"
            "    except ProcessLookupError:\n"
            "        break\n"
            "    time.sleep(1)\n"
            "Cluster(Path(sys.argv[2]), Path(sys.argv[3]), port=0).stop()\n"
        )
        subprocess.Popen(
            [sys.executable, "-c", watcher, str(pid), str(self.root), str(self.bindir)],
            cwd=Path(__file__).resolve().parents[1],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def stop(self) -> None:
        """Stop the server at once (nothing to keep) and remove its directory."""
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(NoPostgres):
                self._run(
                    [str(self.bindir / "pg_ctl"), "stop", "-m", "immediate", "-D", str(self.data)],
                    "pg_ctl stop",
                )
        shutil.rmtree(self.root, ignore_errors=True)

    def _run(self, argv: list[str], what: str) -> None:
        done = subprocess.run(
            _as_owner(argv), capture_output=True, text=True, check=False, timeout=120
        )
        if done.returncode != 0:
            log = self.root / "log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise NoPostgres(
                f"{what} failed ({done.returncode}): {done.stderr.strip()[-2000:]} {tail}".strip()
            )


def libpq_conninfo(url: str | URL) -> str:
    """A libpq URI for psycopg from an SQLAlchemy URL (`postgresql+psycopg://...`)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@dataclass
class Server:
    """A running server the tests may create and drop databases on (as a superuser)."""

    url: str
    cluster: Cluster | None = None

    def create_database(self, prefix: str | None = None) -> str:
        """A new empty database named `<prefix>_<pid>_<n>` (prefix: `BANK_TEST_DB_PREFIX`,
        default `bank_test`, for a server shared with others); returns its SQLAlchemy URL."""
        import psycopg

        prefix = prefix or os.environ.get(ENV_PREFIX) or "bank_test"
        name = f"{prefix}_{os.getpid()}_{next(_names)}"
        with psycopg.connect(libpq_conninfo(self.url), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return make_url(self.url).set(database=name).render_as_string(hide_password=False)

    def drop_database(self, url: str) -> None:
        """Drop a database made by `create_database`, closing any session still on it."""
        import psycopg

        name = make_url(url).database
        with psycopg.connect(libpq_conninfo(self.url), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    @contextlib.contextmanager
    def database(self, prefix: str | None = None) -> Iterator[str]:
        url = self.create_database(prefix)
        try:
            yield url
        finally:
            self.drop_database(url)

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()


def _check_reachable(url: str) -> None:
    import psycopg

    deadline = time.monotonic() + 3
    while True:
        try:
            with psycopg.connect(libpq_conninfo(url), connect_timeout=5) as conn:
                conn.execute("SELECT 1")
            return
        except psycopg.OperationalError as exc:
            if time.monotonic() > deadline:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise NoPostgres(f"cannot connect to {url}: {first}") from None
            time.sleep(0.2)


def start_server() -> Server:
    """The server named by `BANK_TEST_POSTGRES_URL`, else a new throwaway cluster.

    Raises `NoPostgres` with a one-line reason when there is neither.
    """
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise NoPostgres("psycopg is not installed (pip install 'bank[postgres]')") from None
    url = os.environ.get(ENV_URL)
    if url:
        _check_reachable(url)
        return Server(url)
    bindir = find_bindir()
    if bindir is None:
        raise NoPostgres(
            f"no PostgreSQL server binaries (initdb, pg_ctl) on this machine and no {ENV_URL}"
        )
    root = scratch_dir("bank-test-pg-")
    cluster = Cluster(root, bindir)
    try:
        cluster.start()
        _check_reachable(cluster.url)
    except BaseException:
        cluster.stop()
        raise
    cluster.stop_when_gone(os.getpid())
    return Server(cluster.url, cluster)


def _main(argv: list[str]) -> int:
    """`start DIR` prints the URL of a new cluster in DIR; `stop DIR` stops and removes it."""
    if len(argv) != 2 or argv[0] not in ("start", "stop"):
        print("usage: python -m tests.postgres start|stop DIR", file=sys.stderr)
        return 2
    command, root = argv[0], Path(argv[1]).resolve()
    if command == "stop":
        bindir = find_bindir()
        if bindir is not None:
            Cluster(root, bindir, port=0).stop()
        return 0
    bindir = find_bindir()
    if bindir is None:
        print("no PostgreSQL server binaries (initdb, pg_ctl) on this machine", file=sys.stderr)
        return 1
    cluster = Cluster(root, bindir)
    try:
        cluster.start()
        _check_reachable(cluster.url)
    except NoPostgres as exc:
        cluster.stop()
        print(exc, file=sys.stderr)
        return 1
    print(cluster.url)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
