"""The writer lease: a session advisory lock on a dedicated connection, held while the bank writes.

Advisory locks belong to one database, so the ledger is the database: whichever
process or machine holds `LEASE_KEY` there is its one writer. The server frees the
lock the moment the holder's session ends (a SIGKILLed holder's socket closes), so
a standby polling for it takes over at once. A monitor thread notices when this
connection dies and reports it (`lost`, `set_on_lost`): the bank must stop writing.

A server that stops answering without closing anything (every process SIGSTOPped, a
hung machine: the kernel keeps ACKing, so no keepalive or `tcp_user_timeout` fires)
is noticed by the probe's deadline (`PROBE_TIMEOUT_S`): the lease is lost, and then
every connection the bank registered here (`register`: the engine's pool, the
preflight's) is shut down at the socket, so that a COMMIT or a look-up waiting on that
server returns with an error at once instead of when (if ever) the server resumes.

Fencing a stale writer: every batch transaction takes `FENCE_KEY` shared and checks
in `pg_locks` that this lease's session still holds `LEASE_KEY`; a new holder takes
`FENCE_KEY` exclusively once before it reads the ledger, so a batch that passed the
check before the lease changed hands is committed (or gone) before the new writer's
recovery reads, and none can pass it after. The `seq` primary keys stay the last fence.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import select
import socket
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg import pq
from sqlalchemy.engine import URL

from bank.errors import LedgerBusy
from bank.ledger.postgres.errors import open_error
from bank.ledger.postgres.url import connect_kwargs
from bank.limits import LEASE_PROBE_TIMEOUT_S

log = logging.getLogger(__name__)


def advisory_key(name: str) -> int:
    """A fixed signed 64-bit advisory lock key derived from `name`."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


#: Held (session level) by the ledger's one writer.
LEASE_KEY = advisory_key("bank-ledger")
#: Shared by each batch transaction, exclusive (briefly) by a new lease holder.
FENCE_KEY = advisory_key("bank-ledger-fence")

#: How often a waiting standby retries the lease.
POLL_INTERVAL_S = 0.05
#: How often the monitor probes the lease connection (it also wakes on any traffic).
PROBE_INTERVAL_S = 0.5
#: How long the server may take to answer a probe before the lease counts as lost and
#: the bank's connections to it are cut. Read when a lease is taken: a test may lower it
#: first (`monkeypatch.setattr(lease, "PROBE_TIMEOUT_S", 2.0)`).
PROBE_TIMEOUT_S: float = LEASE_PROBE_TIMEOUT_S
#: How long a new holder waits at least for a previous writer's last transaction.
FENCE_WAIT_S_MIN = 5.0
#: Client-side TCP keepalives of the lease connection (a dead server is noticed).
KEEPALIVES: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 1,
    "keepalives_count": 3,
    "tcp_user_timeout": 10_000,
    "connect_timeout": 10,
}
#: Server-side settings of the lease session: a holder whose machine vanished is
#: dropped (and its lease freed) within seconds, not after the OS default of 2 hours.
SERVER_KEEPALIVES = (
    "SET tcp_keepalives_idle = 5",
    "SET tcp_keepalives_interval = 1",
    "SET tcp_keepalives_count = 5",
    "SET tcp_user_timeout = 10000",
)

#: `pg_locks` spells a 64-bit key as classid (high 32 bits) and objid (low), objsubid 1.
_KEY_MATCH = (
    "l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted "
    "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
    "AND l.classid = {hi}::oid AND l.objid = {lo}::oid"
)


def key_match_sql(key: int) -> str:
    """The `pg_locks l` condition that selects the granted session lock on `key`."""
    unsigned = key & 0xFFFF_FFFF_FFFF_FFFF
    return _KEY_MATCH.format(hi=unsigned >> 32, lo=unsigned & 0xFFFF_FFFF)


_HOLDER_SQL = (
    "SELECT l.pid, a.client_addr::text, a.application_name, a.backend_start "
    "FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid "
    f"WHERE {key_match_sql(LEASE_KEY)}"
)

#: Live leases of this process (a forked child must not touch them: see `_after_fork`).
_leases: weakref.WeakSet[Lease] = weakref.WeakSet()


class Lease:
    """The writer lease of one ledger database (an `OwnerLock`)."""

    def __init__(self, conn: psycopg.Connection[Any], where: str) -> None:
        self.where = where
        #: The server process of the lease session (batches check it holds the lease).
        self.backend_pid: int = conn.info.backend_pid
        self._conn = conn
        self._pid = os.getpid()
        #: How long a probe may go unanswered (`PROBE_TIMEOUT_S` when the lease was taken).
        self.probe_timeout_s = PROBE_TIMEOUT_S
        #: The bank's other connections to this server, cut if it stops answering.
        self._sessions: weakref.WeakSet[psycopg.Connection[Any]] = weakref.WeakSet()
        self._cut = False  # the server stopped answering: the sessions were cut
        self._usable = True  # False once a probe failed or went unanswered
        self._io = threading.Lock()  # one user of the connection at a time
        self._state = threading.Lock()
        self._lost: str | None = None
        self._released = False
        self._on_lost: Callable[[str], None] | None = None
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        os.set_inheritable(self._wake_r, False)
        os.set_inheritable(self._wake_w, False)
        self._monitor = threading.Thread(target=self._watch, name="bank-ledger-lease", daemon=True)
        _leases.add(self)
        self._monitor.start()

    # -- OwnerLock ---------------------------------------------------------------------

    def lost(self) -> str | None:
        """Why this process no longer holds the lease (None while it does)."""
        with self._state:
            return self._lost

    def set_on_lost(self, callback: Callable[[str], None] | None) -> None:
        """Call `callback(reason)` once, from the monitor thread, when the lease is lost
        (at once, here, if it already is). Not called on `release`."""
        with self._state:
            self._on_lost = callback
            reason = self._lost
        if reason is not None and callback is not None:
            _notify(callback, reason)

    def watch(self, on_lost: Callable[[str], None]) -> None:
        """`OwnerLock.watch`: the bank's writer is told the moment the lease goes."""
        self.set_on_lost(on_lost)

    def release(self) -> None:
        """Give the lease up and close its connection (idempotent; never raises). Bounded
        by `probe_timeout_s` on a server that stopped answering; cuts nothing."""
        with self._state:
            if self._released:
                return
            self._released = True
            self._on_lost = None
        self._stop.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._pid != os.getpid():
            return  # a forked child: the session is the parent's; touch nothing
        deadline = time.monotonic() + self.probe_timeout_s
        if self._monitor.is_alive() and self._monitor is not threading.current_thread():
            # A probe in progress ends by its own deadline, which is before ours.
            self._monitor.join(self.probe_timeout_s + PROBE_INTERVAL_S * 4)
        with self._io:
            if self._usable and not self._conn.closed:
                # Unlocked before closing, so that the lease is free when this returns.
                with contextlib.suppress(psycopg.Error, NoAnswer):
                    ask(self._conn, _UNLOCK, max(deadline - time.monotonic(), 0.1))
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    # -- the monitor -------------------------------------------------------------------

    def _watch(self) -> None:
        """Probe the connection every `PROBE_INTERVAL_S`, and at once when the server
        sends anything (a terminated session's FATAL message, or EOF)."""
        try:
            sock = self._conn.fileno()
        except psycopg.Error as exc:
            self._lose(exc)
            return
        while not self._stop.is_set():
            try:
                select.select([sock, self._wake_r], [], [], PROBE_INTERVAL_S)
            except (OSError, ValueError) as exc:
                if self._stop.is_set():
                    return
                self._lose(exc)
                return
            if self._stop.is_set():
                return
            failure: psycopg.Error | NoAnswer | None = None
            with self._io:
                if self._stop.is_set():
                    return
                try:
                    ask(self._conn, b"SELECT 1", self.probe_timeout_s)
                except (psycopg.Error, NoAnswer) as exc:
                    self._usable = False
                    failure = exc
            if failure is not None:
                if self._stop.is_set():
                    return
                if isinstance(failure, NoAnswer):
                    self._unanswered()
                else:
                    self._lose(failure)
                return

    def _unanswered(self) -> None:
        self.mark_lost(
            f"{self.where}: the server did not answer the writer lease's probe within "
            f"{self.probe_timeout_s:g} s (frozen or unreachable); this bank must not write "
            "again and has cut its connections to it",
            cut=True,
        )

    def _lose(self, exc: BaseException) -> None:
        first = str(exc).strip().splitlines()
        why = first[0] if first else type(exc).__name__
        self.mark_lost(
            f"{self.where}: the writer lease's connection to the server was lost ({why}); "
            "this bank must not write again (another bank may own the ledger now)"
        )

    def mark_lost(self, reason: str, *, cut: bool = False) -> None:
        """Record that the lease is gone and tell the callback (once); with `cut` (the
        server stopped answering), then cut every registered connection."""
        with self._state:
            if self._lost is not None or self._released:
                return
            self._lost = reason
            callback = self._on_lost
        log.error("%s", reason)
        if callback is not None:
            _notify(callback, reason)
        if cut:
            with self._state:  # `release` takes this lock first: never a cut after it
                if self._released or self._pid != os.getpid():
                    return
                self._cut = True
                for conn in (self._conn, *self._sessions):
                    cut_socket(conn)

    # -- the bank's other connections --------------------------------------------------

    def register(self, conn: psycopg.Connection[Any]) -> None:
        """Have `conn`, one of this bank's connections to the server, cut if the server
        stops answering (at once if it already has). Held weakly."""
        with self._state:
            if self._released or self._pid != os.getpid():
                return
            self._sessions.add(conn)
            if self._cut:
                cut_socket(conn)

    def check_answering(self) -> None:
        """Raise `psycopg.OperationalError` once the server stopped answering the lease's
        probe: a new connection to it would wait `connect_timeout` for nothing."""
        with self._state:
            cut, reason = self._cut, self._lost
        if cut:
            raise psycopg.OperationalError(reason or "the server stopped answering")


#: The lease's own unlock, as one simple query (`ask` sends no parameters).
_UNLOCK = f"SELECT pg_advisory_unlock({LEASE_KEY})".encode()


class NoAnswer(Exception):
    """The server did not answer within the deadline (`ask`)."""


def ask(conn: psycopg.Connection[Any], query: bytes, timeout_s: float) -> None:
    """Run `query` (simple protocol, results dropped) on `conn`, waiting at most
    `timeout_s` for the server: `NoAnswer` past it (the query is then still outstanding
    and the connection unusable), `psycopg.Error` if it fails or the connection breaks.

    On psycopg's own nonblocking libpq connection, polling its socket: the blocking
    `execute` would wait for as long as a frozen server keeps the socket open.
    """
    pgconn = conn.pgconn
    deadline = time.monotonic() + timeout_s
    pgconn.send_query(query)
    fd = pgconn.socket
    while pgconn.flush():  # 1: more to send
        _wait(fd, select.POLLOUT, deadline)
    while True:
        pgconn.consume_input()
        if not pgconn.is_busy():
            break
        _wait(fd, select.POLLIN, deadline)
    error: str | None = None
    while (result := pgconn.get_result()) is not None:
        if result.status == pq.ExecStatus.FATAL_ERROR and error is None:
            error = (result.error_message or b"").decode(errors="replace").strip()
    if error is not None:
        raise psycopg.OperationalError(error or "the query failed")


def _wait(fd: int, event: int, deadline: float) -> None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise NoAnswer
    poller = select.poll()
    poller.register(fd, event)  # POLLHUP and POLLERR are always reported
    if not poller.poll(remaining * 1000):
        raise NoAnswer


def cut_socket(conn: psycopg.Connection[Any]) -> None:
    """Shut `conn`'s socket down both ways (never raises): whoever waits on it, in any
    thread, gets EOF and an error at once. The connection stays open, and broken."""
    if conn.closed:
        return
    try:
        fd = conn.pgconn.socket
        dup = os.dup(fd)  # a socket object of our own: closing it leaves libpq's fd alone
    except (psycopg.Error, OSError):
        return
    try:
        sock = socket.socket(fileno=dup)
    except OSError:
        os.close(dup)
        return
    with sock, contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _notify(callback: Callable[[str], None], reason: str) -> None:
    try:
        callback(reason)
    except BaseException:
        log.exception("the lease-lost callback raised")


def _after_fork() -> None:
    # The child shares the parent's socket: it holds no lease and must never speak on it
    # (psycopg does not close a connection it inherited; `release` returns early).
    for lease in list(_leases):
        with lease._state:
            if lease._lost is None:
                lease._lost = f"{lease.where}: a forked child holds no writer lease"
            lease._on_lost = None


os.register_at_fork(after_in_child=_after_fork)


# -- acquiring -------------------------------------------------------------------------


def connect(url: URL, where: str, *, application: str) -> psycopg.Connection[Any]:
    """A dedicated autocommit psycopg connection to the ledger database, with keepalives."""
    kwargs = {**KEEPALIVES, **connect_kwargs(url)}
    kwargs.setdefault("application_name", application)
    try:
        return psycopg.connect(autocommit=True, **kwargs)
    except psycopg.Error as exc:
        raise (open_error(exc, where) or exc) from None


def acquire(url: URL, where: str, *, wait_s: float) -> Lease:
    """Take the writer lease of the database at `url`, waiting up to `wait_s` for it.

    Raises `LedgerBusy` (naming the holder) when another session holds it past the wait.
    """
    deadline = time.monotonic() + max(wait_s, 0.0)
    conn = connect(url, where, application="bank writer lease")
    try:
        for statement in SERVER_KEEPALIVES:
            conn.execute(statement)
        while not _try_lock(conn):
            if time.monotonic() >= deadline:
                raise LedgerBusy(_busy_message(conn, where, wait_s))
            time.sleep(POLL_INTERVAL_S)
        _drain_fence(conn, where, max(deadline - time.monotonic(), FENCE_WAIT_S_MIN))
    except psycopg.Error as exc:
        conn.close()
        error = open_error(exc, where)
        if error is None:
            raise
        raise error from None
    except BaseException:
        conn.close()
        raise
    return Lease(conn, where)


def _try_lock(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute("SELECT pg_try_advisory_lock(%s)", (LEASE_KEY,)).fetchone()
    return bool(row and row[0])


def _drain_fence(conn: psycopg.Connection[Any], where: str, wait_s: float) -> None:
    """Wait until no batch of a previous writer is between its lease check and its commit."""
    conn.execute(f"SET lock_timeout = {int(wait_s * 1000)}")
    try:
        conn.execute("SELECT pg_advisory_lock(%s)", (FENCE_KEY,))
        conn.execute("SELECT pg_advisory_unlock(%s)", (FENCE_KEY,))
    except psycopg.errors.LockNotAvailable:
        raise LedgerBusy(
            f"{where}: the previous writer still has a transaction open after {wait_s:.0f} s; "
            "try again once the server has ended its session"
        ) from None
    finally:
        conn.execute("RESET lock_timeout")


def _busy_message(conn: psycopg.Connection[Any], where: str, wait_s: float) -> str:
    database = conn.info.dbname
    holder = ""
    with contextlib.suppress(psycopg.Error):
        row = conn.execute(_HOLDER_SQL).fetchone()
        if row is not None:
            pid, addr, app, since = row
            holder = (
                f" (server process {pid}, client {addr or 'local socket'}, "
                f"{app or 'no application name'}, connected since {since:%Y-%m-%d %H:%M:%S %Z})"
            )
    waited = f"waited {wait_s:g} s; " if wait_s > 0 else ""
    return (
        f"{where}: another bank writes the ledger in database {database!r}{holder}; "
        f"{waited}pass wait_s to wait for its writer lease (a hot standby)"
    )
