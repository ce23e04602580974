"""Real storage faults for tests and scripts: a tmpfs that fills, an LD_PRELOAD shim that makes
fsync/write fail, lock holders in other processes, and SIGKILL, around a child bank that logs
every answer by key, plus the by-key check that a ledger kept its promises after the fault.

Importable from `scripts/` (put the repository root on `sys.path`); it needs only `bank` and
the standard library. The child side runs as `python -m tests.faults child ...`.

The child's log is one line per answer, each written with a single `write(2)` on an
O_APPEND stdout, so it is in the page cache the instant the answer is known and
survives a SIGKILL:

    OPENING                       about to call Bank.open
    OPEN <account ids...>         the bank is open and its accounts exist
    A <key> <seq>                 acknowledged: a receipt
    R <key> <Error> <json msg>    refused (nothing changed)
    U <key> <Error> <json msg>    LedgerUnavailable: outcome unknown
    E <where> <Error> <json msg>  a BankError outside an operation (open, close, accounts)
    X <where> <Type> <json msg>   anything that is not a BankError (always a failure)
    CLOSED                        close() returned
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

REPO_ROOT = Path(__file__).resolve().parents[1]
#: A child that nobody stops gives up after this long (so none is ever orphaned).
CHILD_LIFETIME_S_MAX = 120.0


class FaultUnavailable(Exception):
    """This machine cannot inject the fault (no root for mount, no gcc, no sqlite3 CLI)."""


# -- the LD_PRELOAD shim ---------------------------------------------------------------------

SHIM_SOURCE = r"""
/* Fail fsync/fdatasync (and optionally write/pwrite) with an errno, for a bank's child
   process. Armed by BANK_FAULT_TRIGGER (a path: faults start once it exists and never
   stop) or BANK_FAULT_AFTER (faults start after that many calls of the chosen ops).
   BANK_FAULT_OPS: "fsync" (default), "write" or "fsync,write". BANK_FAULT_ERRNO: the
   errno (default EIO). BANK_FAULT_PATH: only fds whose path contains it (default: all
   but 0-2). BANK_FAULT_LOG: a file that gets one line per injected fault.
   BANK_FAULT_ACTION=kill: SIGKILL the process instead of failing the call. The
   variables are read at each call, so a forked child may set them after the fork. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

static int armed_flag = 0;
static long calls = 0;

static int want(const char *op) {
    const char *ops = getenv("BANK_FAULT_OPS");
    if (ops == NULL || *ops == 0) ops = "fsync";
    return strstr(ops, op) != NULL;
}

static void note(const char *what, int fd) {
    static ssize_t (*real_write)(int, const void *, size_t) = NULL;
    const char *log = getenv("BANK_FAULT_LOG");
    char line[64];
    int n, lfd;
    if (log == NULL) return;
    if (real_write == NULL) real_write = dlsym(RTLD_NEXT, "write");
    lfd = open(log, O_WRONLY | O_APPEND | O_CREAT, 0644);
    if (lfd < 0) return;
    n = snprintf(line, sizeof line, "%s %d\n", what, fd);
    real_write(lfd, line, (size_t)n);
    close(lfd);
}

static int fd_matches(int fd) {
    const char *want_path = getenv("BANK_FAULT_PATH");
    char link[64], target[4096];
    ssize_t n;
    if (fd <= 2) return 0;
    if (want_path == NULL || *want_path == 0) return 1;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    n = readlink(link, target, sizeof target - 1);
    if (n < 0) return 0;
    target[n] = 0;
    return strstr(target, want_path) != NULL;
}

static int faulty(const char *what, int fd) {
    const char *trigger, *after;
    if (!fd_matches(fd)) return 0;
    if (!__atomic_load_n(&armed_flag, __ATOMIC_SEQ_CST)) {
        long n;
        trigger = getenv("BANK_FAULT_TRIGGER");
        after = getenv("BANK_FAULT_AFTER");
        if ((trigger == NULL || !*trigger) && (after == NULL || !*after))
            return 0; /* not armed: not even counted (a fork server forks from here) */
        n = __atomic_add_fetch(&calls, 1, __ATOMIC_SEQ_CST);
        if ((trigger != NULL && *trigger && access(trigger, F_OK) == 0)
            || (after != NULL && *after && n > atol(after)))
            __atomic_store_n(&armed_flag, 1, __ATOMIC_SEQ_CST);
        else
            return 0;
    }
    note(what, fd);
    {
        const char *action = getenv("BANK_FAULT_ACTION");
        if (action != NULL && strcmp(action, "kill") == 0)
            kill(getpid(), SIGKILL); /* a crash exactly before this call reaches the disk */
    }
    {
        const char *e = getenv("BANK_FAULT_ERRNO");
        errno = (e != NULL && *e) ? atoi(e) : EIO;
    }
    return 1;
}

int fsync(int fd) {
    static int (*real)(int) = NULL;
    if (real == NULL) real = dlsym(RTLD_NEXT, "fsync");
    if (want("fsync") && faulty("fsync", fd)) return -1;
    return real(fd);
}

int fdatasync(int fd) {
    static int (*real)(int) = NULL;
    if (real == NULL) real = dlsym(RTLD_NEXT, "fdatasync");
    if (want("fsync") && faulty("fdatasync", fd)) return -1;
    return real(fd);
}

ssize_t write(int fd, const void *buf, size_t count) {
    static ssize_t (*real)(int, const void *, size_t) = NULL;
    if (real == NULL) real = dlsym(RTLD_NEXT, "write");
    if (want("write") && faulty("write", fd)) return -1;
    return real(fd, buf, count);
}

ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset) {
    static ssize_t (*real)(int, const void *, size_t, off_t) = NULL;
    if (real == NULL) real = dlsym(RTLD_NEXT, "pwrite");
    if (want("write") && faulty("pwrite", fd)) return -1;
    return real(fd, buf, count, offset);
}

ssize_t pwrite64(int fd, const void *buf, size_t count, off_t offset) {
    static ssize_t (*real)(int, const void *, size_t, off_t) = NULL;
    if (real == NULL) real = dlsym(RTLD_NEXT, "pwrite64");
    if (want("write") && faulty("pwrite64", fd)) return -1;
    return real(fd, buf, count, offset);
}
"""


def build_shim(cache_dir: Path | None = None) -> Path:
    """Compile the shim with gcc (once per source text) and return the .so path.

    Raises `FaultUnavailable` when gcc is missing or fails.
    """
    digest = hashlib.sha256(SHIM_SOURCE.encode()).hexdigest()[:16]
    cache = cache_dir or Path(tempfile.gettempdir()) / "bank-fault-shim"
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"shim-{digest}.so"
    if target.exists():
        return target
    source = cache / f"shim-{digest}-{os.getpid()}.c"
    source.write_text(SHIM_SOURCE)
    partial = cache / f"shim-{digest}-{os.getpid()}.so"
    try:
        result = subprocess.run(
            ["gcc", "-shared", "-fPIC", "-O2", "-o", str(partial), str(source), "-ldl"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    except FileNotFoundError:
        raise FaultUnavailable("gcc is not installed: cannot build the fsync shim") from None
    if result.returncode != 0:
        raise FaultUnavailable(f"gcc could not build the shim: {result.stderr.strip()[:300]}")
    os.replace(partial, target)  # atomic: a concurrent builder sees the whole file or none
    source.unlink(missing_ok=True)
    return target


def shim_env(
    shim: Path,
    *,
    trigger: Path | None = None,
    after: int | None = None,
    ops: str = "fsync",
    errno_value: int = errno.EIO,
    path_filter: str | None = None,
    log: Path | None = None,
    kill: bool = False,
) -> dict[str, str]:
    """Environment variables that load and arm the shim in a child process (with `kill`,
    the first faulty call SIGKILLs the process instead of failing)."""
    env = {"LD_PRELOAD": str(shim), "BANK_FAULT_OPS": ops, "BANK_FAULT_ERRNO": str(errno_value)}
    if kill:
        env["BANK_FAULT_ACTION"] = "kill"
    if trigger is not None:
        env["BANK_FAULT_TRIGGER"] = str(trigger)
    if after is not None:
        env["BANK_FAULT_AFTER"] = str(after)
    if path_filter is not None:
        env["BANK_FAULT_PATH"] = path_filter
    if log is not None:
        env["BANK_FAULT_LOG"] = str(log)
    return env


# -- a tiny filesystem -----------------------------------------------------------------------


@dataclass
class Tmpfs:
    """A mounted tmpfs: resize it, fill it, make it read-only (only with no writer open)."""

    path: Path
    filler: Path = field(init=False)

    def __post_init__(self) -> None:
        self.filler = self.path / "filler.bin"

    def _mount(self, options: str) -> None:
        result = subprocess.run(
            ["mount", "-o", options, str(self.path)],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        if result.returncode != 0:
            raise OSError(f"mount -o {options} {self.path}: {result.stderr.strip()}")

    def resize(self, size: str) -> None:
        """Grow or shrink the filesystem (tmpfs allows it while files are open)."""
        self._mount(f"remount,size={size}")

    def remount_ro(self) -> None:
        """Read-only; the kernel refuses (EBUSY) while any file is open for writing."""
        self._mount("remount,ro")

    def remount_rw(self) -> None:
        self._mount("remount,rw")

    def fill(self) -> int:
        """Write a filler file until ENOSPC; returns the bytes it took."""
        written = 0
        with self.filler.open("ab", buffering=0) as fh:
            for chunk in (65_536, 4_096, 512, 1):
                block = b"\0" * chunk
                while True:
                    try:
                        n = fh.write(block)
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
                    written += n or 0
        return written

    def unfill(self) -> None:
        self.filler.unlink(missing_ok=True)

    def unmount(self) -> None:
        """Unmount (lazily if a straggler still has a file open)."""
        done = subprocess.run(["umount", str(self.path)], capture_output=True, check=False)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True, check=False)

    def free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize


def mount_tmpfs(path: Path, size: str = "256k") -> Tmpfs:
    """Mount a tmpfs of `size` on `path` (created if missing); `unmount()` it when done.
    Raises `FaultUnavailable` if mounting is refused (not root, no CAP_SYS_ADMIN)."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
    except FileNotFoundError:
        raise FaultUnavailable("no mount(8) on this machine") from None
    if result.returncode != 0:
        raise FaultUnavailable(f"mount -t tmpfs refused: {result.stderr.strip()}")
    return Tmpfs(path)


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "256k") -> Iterator[Tmpfs]:
    """A tmpfs on `path` for the duration of the block (see `mount_tmpfs`)."""
    mounted = mount_tmpfs(path, size)
    try:
        yield mounted
    finally:
        mounted.unmount()


# -- lock holders ----------------------------------------------------------------------------


@contextlib.contextmanager
def sqlite_exclusive(db: Path) -> Iterator[subprocess.Popen[str]]:
    """The real `sqlite3` CLI in another process holding `BEGIN EXCLUSIVE` on `db`."""
    try:
        proc = subprocess.Popen(
            ["sqlite3", str(db)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    except FileNotFoundError:
        raise FaultUnavailable("the sqlite3 command-line shell is not installed") from None
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(
            "PRAGMA busy_timeout = 10000;\nBEGIN EXCLUSIVE;\nSELECT 'locked-' || 'now';\n"
        )
        proc.stdin.flush()
        line = _readline(proc.stdout, 20.0)
        if line.strip() == "10000":  # the shell echoes the pragma's new value
            line = _readline(proc.stdout, 20.0)
        if line.strip() != "locked-now":
            raise AssertionError(f"sqlite3 did not take the lock: {line!r}")
        yield proc
    finally:
        with contextlib.suppress(OSError, ValueError):
            proc.stdin.write("ROLLBACK;\n.quit\n")
            proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


_FLOCK_HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
print("locked", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def flock_holder(db: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process holding the exclusive `flock` the bank takes on `db`."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _FLOCK_HOLDER, str(db)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        line = _readline(proc.stdout, 20.0)
        if line.strip() != "locked":
            raise AssertionError(f"the flock holder did not lock {db}: {line!r}")
        yield proc
    finally:
        with contextlib.suppress(OSError):
            proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _readline(stream: IO[str], timeout_s: float) -> str:
    """One line from a child's pipe, or AssertionError after `timeout_s` (never a hang)."""
    box: list[str] = []
    reader = threading.Thread(target=lambda: box.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    if not box:
        raise AssertionError(f"watchdog: no line from the child in {timeout_s} s")
    return box[0]


# -- the child bank ----------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    return json.dumps(str(exc))


def child_main(argv: list[str]) -> int:
    """Open a bank on `--db` and run keyed deposits and transfers, logging every answer."""
    parser = argparse.ArgumentParser(prog="python -m tests.faults child")
    parser.add_argument("--db", required=True)
    parser.add_argument("--durability", default="full")
    parser.add_argument("--tellers", type=int, default=2)
    parser.add_argument("--accounts", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="largest submit_many batch")
    parser.add_argument("--ops", type=int, default=0, help="ops per teller (0: until stopped)")
    parser.add_argument("--prefix", default="k")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--after-unknown", type=int, default=3, help="batches a teller sends after its first U"
    )
    parser.add_argument("--pace-s", type=float, default=0.0, help="pause between batches")
    args = parser.parse_args(argv)
    out_lock = threading.Lock()

    def emit(line: str) -> None:
        with out_lock:
            os.write(1, (line + "\n").encode())

    def give_up() -> None:
        time.sleep(CHILD_LIFETIME_S_MAX)
        os._exit(4)  # nobody stopped us: the parent is gone

    threading.Thread(target=give_up, daemon=True).start()
    import bank

    emit("OPENING")
    try:
        b = bank.Bank.open(args.db, workers=2, durability=args.durability)
    except bank.BankError as exc:
        emit(f"E open {type(exc).__name__} {_one_line(exc)}")
        return 2
    except BaseException as exc:
        emit(f"X open {type(exc).__name__} {_one_line(exc)}")
        raise
    try:
        ids = [a.id for a in b.accounts()]
        for i in range(len(ids), args.accounts):
            ids.append(b.open_account(f"acct-{i}").id)
    except bank.BankError as exc:
        emit(f"E accounts {type(exc).__name__} {_one_line(exc)}")
        _close(b, emit)
        return 2
    emit("OPEN " + " ".join(map(str, ids)))

    def teller(t: int) -> None:
        rng = random.Random(args.seed * 1_000 + t)
        n = 0
        unknown_batches = 0
        while args.ops == 0 or n < args.ops:
            batch: list[bank.Deposit | bank.Transfer] = []
            for _ in range(rng.randint(1, args.batch)):
                n += 1
                key = f"{args.prefix}{t}-{n}"
                if rng.random() < 0.4:
                    batch.append(
                        bank.Deposit(account=rng.choice(ids), amount=rng.randint(1, 500), key=key)
                    )
                else:
                    source, target = rng.sample(ids, 2)
                    batch.append(
                        bank.Transfer(
                            source=source, target=target, amount=rng.randint(1, 300), key=key
                        )
                    )
            saw_unknown = False
            try:
                futures = b.submit_many(batch)
            except bank.LedgerUnavailable as exc:
                for c in batch:
                    emit(f"U {c.key} {type(exc).__name__} {_one_line(exc)}")
                saw_unknown = True
            except bank.BankError as exc:
                for c in batch:
                    emit(f"R {c.key} {type(exc).__name__} {_one_line(exc)}")
                if isinstance(exc, bank.BankClosed):
                    return
            else:
                for c, future in zip(batch, futures, strict=True):
                    try:
                        r = future.result(timeout=60)
                    except bank.LedgerUnavailable as exc:
                        emit(f"U {c.key} {type(exc).__name__} {_one_line(exc)}")
                        saw_unknown = True
                    except bank.BankError as exc:
                        emit(f"R {c.key} {type(exc).__name__} {_one_line(exc)}")
                    except BaseException as exc:  # a hang (TimeoutError) or a raw error
                        emit(f"X {c.key} {type(exc).__name__} {_one_line(exc)}")
                    else:
                        emit(f"A {c.key} {r.seq}")
            if saw_unknown:
                unknown_batches += 1
                if unknown_batches > args.after_unknown:
                    return
            if args.pace_s:
                time.sleep(args.pace_s)

    def guarded(t: int) -> None:
        try:
            teller(t)
        except BaseException as exc:
            emit(f"X teller-{t} {type(exc).__name__} {_one_line(exc)}")

    threads = [
        threading.Thread(target=guarded, args=(t,), name=f"teller-{t}", daemon=True)
        for t in range(args.tellers)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    _close(b, emit)
    return 0


def _close(b: Any, emit: Any) -> None:
    import bank

    try:
        b.close()
    except bank.BankError as exc:
        emit(f"E close {type(exc).__name__} {_one_line(exc)}")
    except BaseException as exc:
        emit(f"X close {type(exc).__name__} {_one_line(exc)}")
        raise
    else:
        emit("CLOSED")


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a child: the repository importable, plus `extra`."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env


class Child:
    """A child bank process whose answers go to `log` (see the module docstring)."""

    def __init__(
        self,
        db: Path,
        log: Path,
        *,
        env: dict[str, str] | None = None,
        durability: str = "full",
        tellers: int = 2,
        ops: int = 0,
        batch: int = 8,
        prefix: str = "k",
        seed: int = 1,
        pace_s: float = 0.0,
    ) -> None:
        self.db, self.log = db, log
        self.stderr_path = log.with_suffix(".stderr")
        command = [
            sys.executable,
            "-m",
            "tests.faults",
            "child",
            "--db",
            str(db),
            "--durability",
            durability,
            "--tellers",
            str(tellers),
            "--ops",
            str(ops),
            "--batch",
            str(batch),
            "--prefix",
            prefix,
            "--seed",
            str(seed),
            "--pace-s",
            str(pace_s),
        ]
        with log.open("ab") as out, self.stderr_path.open("ab") as err:
            self.proc = subprocess.Popen(
                command, stdout=out, stderr=err, env=child_env(env), cwd=REPO_ROOT
            )

    def lines(self) -> list[str]:
        return read_lines(self.log)

    def wait_for(self, predicate: Any, timeout_s: float = 60.0) -> list[str]:
        """Poll the log until `predicate(lines)` holds; AssertionError if the child ends or
        the deadline passes first."""
        deadline = time.monotonic() + timeout_s
        while True:
            lines = self.lines()
            if predicate(lines):
                return lines
            if self.proc.poll() is not None:
                lines = self.lines()
                if predicate(lines):
                    return lines
                raise AssertionError(
                    f"the child exited ({self.proc.returncode}) first; log tail {lines[-5:]}\n"
                    + self.stderr()
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"watchdog: child log tail {lines[-5:]}\n" + self.stderr())
            time.sleep(0.005)

    def wait_acks(self, n: int, timeout_s: float = 60.0) -> list[str]:
        return self.wait_for(lambda ls: sum(1 for x in ls if x.startswith("A ")) >= n, timeout_s)

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text()[-3000:]
        except FileNotFoundError:
            return ""

    def wait(self, timeout_s: float = 60.0) -> int:
        """The exit code; kills the child and raises AssertionError if it does not end."""
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"watchdog: the child did not end in {timeout_s} s (a hang); log tail "
                f"{self.lines()[-5:]}\n{self.stderr()}"
            ) from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def read_lines(path: Path) -> list[str]:
    """The complete lines of a log (a torn last line is not an answer)."""
    try:
        text = path.read_bytes().decode()
    except FileNotFoundError:
        return []
    return text.split("\n")[:-1]


# -- a bank served over a pipe -------------------------------------------------------------------


def serve_main(argv: list[str]) -> int:
    """A bank driven by JSON lines on stdin; answers (and each future's outcome, from its
    done-callback, the instant it is known) go to stdout as JSON lines. One worker, so
    operations are judged in the order they arrive (a model can predict every answer)."""
    parser = argparse.ArgumentParser(prog="python -m tests.faults serve")
    parser.add_argument("--db", required=True)
    parser.add_argument("--accounts", type=int, default=3)
    parser.add_argument("--durability", default="full")
    args = parser.parse_args(argv)
    import bank

    out_lock = threading.Lock()

    def emit(obj: dict[str, Any]) -> None:
        with out_lock:  # one write(2) per line: lines never interleave
            os.write(1, (json.dumps(obj) + "\n").encode())

    def answered(key: str) -> Any:
        def callback(future: Any) -> None:
            error = future.exception()
            if error is None:
                emit({"ans": "A", "key": key, "seq": future.result().seq})
            elif isinstance(error, bank.LedgerUnavailable):
                emit({"ans": "U", "key": key, "error": type(error).__name__})
            else:
                emit({"ans": "R", "key": key, "error": type(error).__name__})

        return callback

    b = bank.Bank.open(args.db, workers=1, durability=args.durability)
    ids = [a.id for a in b.accounts()]
    for i in range(len(ids), args.accounts):
        ids.append(b.open_account(f"acct-{i}", overdraft_limit=100 * i).id)
    emit({"ready": ids, "limits": {a.id: a.overdraft_limit for a in b.accounts()}})
    for line in sys.stdin:
        request = json.loads(line)
        op = request["op"]
        if op == "submit":
            kind, key = request["kind"], request["key"]
            command: bank.Deposit | bank.Withdrawal | bank.Transfer
            if kind == "deposit":
                command = bank.Deposit(account=request["credit"], amount=request["amount"], key=key)
            elif kind == "withdrawal":
                command = bank.Withdrawal(
                    account=request["debit"], amount=request["amount"], key=key
                )
            else:
                command = bank.Transfer(
                    source=request["debit"],
                    target=request["credit"],
                    amount=request["amount"],
                    key=key,
                )
            b.submit(command).add_done_callback(answered(key))
        elif op == "find":
            r = b.find(request["key"])
            emit({"find": request["key"], "seq": None if r is None else r.seq})
        elif op == "snapshot":
            snap = b.snapshot()
            emit({"snapshot": {str(k): v for k, v in snap.balances.items()}, "seq": snap.seq})
        elif op == "close":
            b.close()
            emit({"closed": True})
            return 0
    b.close()
    return 0


# -- a fork server ------------------------------------------------------------------------------


class ForkServer:
    """A pre-imported Python (`bank` loaded) that forks children on request: a child is
    running its script within milliseconds instead of the ~0.5 s of a fresh interpreter,
    which is what makes a 1,000-round crash loop or many kills inside `Bank.open` cheap.

    The server has no threads when it forks, so each child starts from a sound copy.
    Kill a child with `os.kill(pid, SIGKILL)`; `wait(pid)` returns its exit code the way
    `subprocess` reports it (negative: the signal).
    """

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.faults", "zygote"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=child_env(env),
            cwd=REPO_ROOT,
            text=True,
        )
        if self._reply(60.0) != "ready":
            raise AssertionError("the fork server did not start")

    def _reply(self, timeout_s: float) -> str:
        assert self.proc.stdout is not None
        return _readline(self.proc.stdout, timeout_s).strip()

    def _ask(self, request: dict[str, Any], timeout_s: float = 60.0) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._reply(timeout_s)

    def spawn(
        self,
        script: Path,
        argv: list[str],
        stdout: Path,
        stderr: Path,
        env: dict[str, str] | None = None,
    ) -> int:
        """Fork a child that runs `script` as `__main__` with `argv` (and `env` added to
        its environment); returns its pid."""
        reply = self._ask(
            {
                "op": "spawn",
                "script": str(script),
                "argv": argv,
                "out": str(stdout),
                "err": str(stderr),
                "env": env or {},
            }
        )
        return int(reply)

    def wait(self, pid: int, timeout_s: float = 120.0) -> int:
        """Reap `pid`; kills it first if it has not ended within `timeout_s`."""
        return int(self._ask({"op": "wait", "pid": pid, "timeout_s": timeout_s}, timeout_s + 30))

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> ForkServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _zygote_main() -> int:
    """The fork server's side: import `bank`, then fork one child per request."""
    import runpy

    import bank  # the point: children start with it loaded
    import bank.ledger.audit  # noqa: F401

    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "spawn":
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    null = os.open(os.devnull, os.O_RDONLY)
                    os.dup2(null, 0)
                    out = os.open(request["out"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                    err = os.open(request["err"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                    os.dup2(out, 1)
                    os.dup2(err, 2)
                    random.seed()
                    os.environ.update(request["env"])
                    sys.argv = [request["script"], *request["argv"]]
                    runpy.run_path(request["script"], run_name="__main__")
                    code = 0
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else 1
                except BaseException:
                    import traceback

                    traceback.print_exc()
                finally:
                    os._exit(code)
            print(pid, flush=True)
        elif request["op"] == "wait":
            pid = request["pid"]
            deadline = time.monotonic() + request["timeout_s"]
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    status = 0xFFFF  # reported as a hang below
                    break
                time.sleep(0.002)
            if status == 0xFFFF:
                print("-999", flush=True)
            else:
                print(os.waitstatus_to_exitcode(status), flush=True)
    return 0


# -- the check by key --------------------------------------------------------------------------


@dataclass
class Answers:
    """What a child was told, by key."""

    acked: dict[str, int] = field(default_factory=dict)
    refused: dict[str, tuple[str, str]] = field(default_factory=dict)  # key -> (error, message)
    unknown: dict[str, tuple[str, str]] = field(default_factory=dict)
    errors: list[tuple[str, str, str]] = field(default_factory=list)  # (where, type, message)
    raw_errors: list[str] = field(default_factory=list)  # X lines: never allowed
    opened: bool = False
    closed: bool = False
    # Per teller, the answers in the order the teller got them.
    by_teller: dict[str, list[str]] = field(default_factory=dict)


def parse_answers(lines: list[str]) -> Answers:
    """Parse a child's log (see the module docstring)."""
    answers = Answers()
    for line in lines:
        tag, _, rest = line.partition(" ")
        if tag == "OPEN":
            answers.opened = True
        elif tag == "CLOSED":
            answers.closed = True
        elif tag == "A":
            key, seq = rest.split(" ")
            answers.acked[key] = int(seq)
        elif tag in ("R", "U", "E"):
            where, kind, message = rest.split(" ", 2)
            answer = (kind, json.loads(message))
            if tag == "R":
                answers.refused[where] = answer
            elif tag == "U":
                answers.unknown[where] = answer
            else:
                answers.errors.append((where, *answer))
        elif tag == "X":
            answers.raw_errors.append(rest)
        if tag in ("A", "R", "U"):
            key = rest.split(" ", 1)[0]
            answers.by_teller.setdefault(key.rsplit("-", 1)[0], []).append(tag)
    return answers


def specific_error_problems(answers: Answers) -> list[str]:
    """Every error the child saw that is not a specific `BankError` with a one-line message."""
    import bank

    problems = [f"not a BankError: {x}" for x in answers.raw_errors]
    names = {n for n in dir(bank) if isinstance(getattr(bank, n), type)}
    seen = [(k, *v) for k, v in answers.refused.items()]
    seen += [(k, *v) for k, v in answers.unknown.items()]
    seen += answers.errors
    for where, kind, message in seen:
        if kind == "BankError" or kind not in names:
            problems.append(f"{where}: {kind} is not a specific BankError subclass ({message!r})")
        if "\n" in message or "Traceback" in message:
            problems.append(f"{where}: a message of more than one line: {message!r}")
    return problems


def stopped_after_first_unknown(answers: Answers) -> list[str]:
    """Per teller, no acknowledgement after its first 'unknown' (the bank stops at the
    first failed commit); returns the tellers that break it."""
    bad = []
    for teller, tags in answers.by_teller.items():
        if "U" in tags and "A" in tags[tags.index("U") :]:
            bad.append(f"teller {teller}: acknowledged after LedgerUnavailable: {''.join(tags)}")
    return bad


def ledger_keys(db: Path) -> dict[str, list[int]]:
    """Every key in `transfers` with the seqs that carry it, read with plain sqlite3
    from this process (which must not own the ledger)."""
    from urllib.parse import quote

    con = sqlite3.connect(f"file:{quote(str(db))}?mode=ro", uri=True)
    try:
        found: dict[str, list[int]] = {}
        for key, seq in con.execute("SELECT key, seq FROM transfers WHERE key IS NOT NULL"):
            found.setdefault(key, []).append(seq)
        return found
    finally:
        con.close()


def key_problems(answers: Answers, found: dict[str, list[int]]) -> list[str]:
    """Acknowledged: present exactly once with its seq; refused: absent; unknown: at most once."""
    problems = []
    for key, seq in answers.acked.items():
        if found.get(key) != [seq]:
            problems.append(f"acknowledged {key} (seq {seq}) is in the ledger as {found.get(key)}")
    for key in answers.refused:
        if key in found:
            problems.append(f"refused {key} is in the ledger at {found[key]}")
    for key in answers.unknown:
        if len(found.get(key, [])) > 1:
            problems.append(f"unknown {key} is in the ledger {len(found[key])} times")
    lost = sum(1 for k in answers.acked if k not in found)
    if lost:
        problems.append(f"{lost} of {len(answers.acked)} acknowledged operations lost")
    return problems


def reopen_and_check(db: Path, answers: Answers) -> list[str]:
    """Reopen with `Bank.open` (recovery), check `find` and a new op, close, then audit and
    check every key with plain sqlite3; returns the problems (empty: every promise held)."""
    import bank
    from bank.ledger.audit import audit_ledger

    problems: list[str] = []
    try:
        with bank.Bank.open(db) as b:
            for key, seq in answers.acked.items():
                r = b.find(key)
                if r is None or r.seq != seq:
                    problems.append(f"find({key!r}) after reopen gave {r}")
            for key in answers.refused:
                if b.find(key) is not None:
                    problems.append(f"find({key!r}) of a refused key found it")
            snap = b.snapshot()
            if snap.total != 0:
                problems.append(f"reopened balances sum to {snap.total}")
            if b.deposit(b.open_account("after-fault").id, 1).seq != snap.seq + 1:
                problems.append("the first op after reopening does not continue the seq")
    except bank.BankError as exc:
        return [f"Bank.open after the fault: {type(exc).__name__}: {exc}"]
    except Exception as exc:  # a raw error: reported with the others, not raised
        first = (str(exc).splitlines() or [""])[0]
        return [
            f"Bank.open after the fault raised {type(exc).__module__}.{type(exc).__name__}: {first}"
        ]
    report = audit_ledger(db)
    if not report.ok:
        problems.append(f"audit: {[p.message for p in report.problems[:5]]}")
    problems += key_problems(answers, ledger_keys(db))
    return problems


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["child"]:
        return child_main(argv[1:])
    if argv[:1] == ["serve"]:
        return serve_main(argv[1:])
    if argv[:1] == ["zygote"]:
        return _zygote_main()
    print("usage: python -m tests.faults child --db PATH [...]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
