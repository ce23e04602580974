"""The owner lock of a SQLite ledger: an flock on the file, and this process's registry of
the files it owns (so nothing here ever closes a descriptor of an owned file).

POSIX drops every fcntl lock a process holds on a file as soon as the process closes ANY
descriptor of that file, and SQLite's locks are fcntl locks. So once this process owns
a ledger, nothing here may open and close that file outside SQLite: a second opener
learns that the file is taken from this registry (keyed by device and inode, reached
with stat(), which opens nothing), whatever path, symlink or hard link it came by.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bank.errors import CannotOpenLedger, LedgerBusy, NotALedger

#: How often a waiting `FileLock` tries again (a standby takes over within this).
RETRY_S = 0.05

_owned_lock = threading.Lock()
#: (st_dev, st_ino) -> the lock that owns that file in this process.
_owned: dict[tuple[int, int], FileLock] = {}

SIDE_FILES = ("-wal", "-shm", "-journal")


def owned_here(path: Path) -> bool:
    """True if a `Bank` of this process owns the file at `path` (stat only, no open)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    with _owned_lock:
        return (st.st_dev, st.st_ino) in _owned


def side_file_size(path: Path, suffix: str) -> int:
    """Size of `path` + suffix (-wal, -journal), -1 when absent (stat only)."""
    try:
        return os.stat(path.with_name(path.name + suffix)).st_size
    except FileNotFoundError:
        return -1


def at_rest(path: Path) -> bool:
    """No -wal or -journal content beside `path`: the main file alone is the database."""
    return side_file_size(path, "-wal") <= 0 and side_file_size(path, "-journal") <= 0


def fingerprint(path: Path) -> tuple[int, int, int, int, int]:
    """What changes when anyone writes the ledger: identity, size, mtime, side-file sizes."""
    st = os.stat(path)
    return (
        st.st_ino,
        st.st_size,
        st.st_mtime_ns,
        side_file_size(path, "-wal"),
        side_file_size(path, "-journal"),
    )


class FileLock:
    """An exclusive `flock` on the ledger file: one open `Bank` per ledger, across processes.

    Two banks on one file would each trust their own in-memory balances and
    corrupt the ledger; readers (the audit, plain `sqlite3`) never take this lock.
    `flock` locks are independent of SQLite's own `fcntl` byte-range locks, and the
    descriptor stays open until `release()` (after SQLite's connections are closed).
    A file this process already owns is refused from the registry without opening it.
    With `wait_s` > 0 a busy file (held here or elsewhere) is tried again until then.
    It is the SQLite backend's `OwnerLock`: it cannot be lost while the process lives.
    """

    def __init__(self, path: Path, *, create: bool = True, wait_s: float = 0.0) -> None:
        self.path = path
        #: True when this lock created the file (so a failed creation may remove it).
        self.created = False
        self._fd: int | None = None
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self._try(path, create=create)
                return
            except LedgerBusy as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    if wait_s > 0:
                        raise LedgerBusy(f"{exc} (waited {wait_s:g} s)") from None
                    raise
            time.sleep(min(RETRY_S, left))

    def _try(self, path: Path, *, create: bool) -> None:
        with _owned_lock:
            try:
                st: os.stat_result | None = os.stat(path)
            except FileNotFoundError:
                st = None
            except OSError as exc:
                raise CannotOpenLedger(f"{path}: cannot be examined ({exc.strerror})") from None
            if st is not None:
                owner = _owned.get((st.st_dev, st.st_ino))
                if owner is not None:
                    raise LedgerBusy(
                        f"{path} is already open in another Bank of this process (as {owner.path})"
                    )
                if not stat.S_ISREG(st.st_mode):
                    raise NotALedger(f"{path} is not a regular file")
            elif not create:
                raise NotALedger(f"no ledger at {path} (mode=rw does not create one)")
            else:
                self._refuse_orphan_side_files()
            fd = self._open(path, create=st is None)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                # Not owned here (checked above under this lock), so closing drops no lock of ours.
                os.close(fd)
                raise LedgerBusy(
                    f"{path} is already open in another Bank (another process)"
                ) from None
            st = os.fstat(fd)
            self.identity = (st.st_dev, st.st_ino)
            self.size = st.st_size
            self._fd = fd
            _owned[self.identity] = self

    def _refuse_orphan_side_files(self) -> None:
        # A -wal or -journal without its database belongs to a deleted one: SQLite would
        # replay its pages into the new ledger.
        for suffix in ("-wal", "-journal"):
            if side_file_size(self.path, suffix) > 0:
                raise CannotOpenLedger(
                    f"{self.path} does not exist but {self.path.name}{suffix} does (a leftover "
                    "of a deleted database): move it away before creating a ledger here"
                )

    def _open(self, path: Path, *, create: bool) -> int:
        flags = os.O_RDONLY | os.O_CLOEXEC
        try:
            if create:
                try:
                    fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644)
                    self.created = True
                    return fd
                except FileExistsError:
                    # Raced by another creator, or a dangling symlink (O_EXCL refuses
                    # those): create through it, not knowing for sure who made the file.
                    return os.open(path, flags | os.O_CREAT, 0o644)
            return os.open(path, flags)
        except OSError as exc:
            raise CannotOpenLedger(f"{path}: cannot be opened ({exc.strerror})") from None

    def lost(self) -> str | None:
        """Never: an flock is held for as long as its descriptor (and the process) lives."""
        return None

    def watch(self, on_lost: Callable[[str], None]) -> None:
        """Nothing to watch: this lock cannot be lost (see `OwnerLock.watch`)."""

    def read_header(self, size: int) -> bytes:
        """The first `size` bytes of the locked file, read on the lock's own descriptor
        (pread: no descriptor opened or closed)."""
        assert self._fd is not None, "the lock was released"
        return os.pread(self._fd, size, 0)

    def remove_created(self) -> None:
        """Unlink a file this lock created, and its side files (a failed creation leaves
        nothing a later open could misread). Call with the lock held, SQLite closed."""
        if not self.created or self._fd is None:
            return
        for suffix in ("", *SIDE_FILES):
            # Absent, or best effort: an empty or uncommitted file reads as new anyway.
            with contextlib.suppress(OSError):
                os.unlink(self.path.with_name(self.path.name + suffix))

    def release(self) -> None:
        """Drop the lock (idempotent)."""
        with _owned_lock:
            if self._fd is not None:
                _owned.pop(self.identity, None)
                # Unlock before closing: a forked child shares this open file description,
                # and closing our descriptor alone would leave the lock held by its copy.
                with contextlib.suppress(OSError):
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
                self._fd = None
