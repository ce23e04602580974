"""Where `--json`, `--csv`, `--plot` and `--history` may write, and writing there safely.

What each kind of target gets (checked before the run, so a long run never
ends with "cannot write", and again when writing):

| target | what happens |
|---|---|
| `-`, or the very file that is stdout (`/dev/stdout`, `/proc/self/fd/1`) | the result goes to stdout; the summary and progress go to stderr |
| the very file that is stderr (`/dev/stderr`) | written to stderr |
| a path that does not exist | created atomically (a temporary file beside it, fsync'ed, renamed); its directory must exist |
| a regular file | replaced atomically the same way (its permission bits kept) |
| a symlink | followed, never replaced: its final target is written as that kind of target says |
| a character device (`/dev/null`, a terminal) or a FIFO | written through, never renamed over; a FIFO with no reader is refused instead of hanging |
| a directory, a block device, a socket, a dangling symlink | refused with `OutputError` |

Renaming over a device would replace the device itself (as root,
`/dev/stdout` for everyone): nothing here ever renames over anything that is
not a regular file.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

#: What `check_target` decided for one output.
How = Literal["stdout", "stderr", "replace", "through"]


class OutputError(ValueError):
    """An output option names something the result cannot (or must not) be written to."""


@dataclass(frozen=True, slots=True)
class Target:
    """One output option's destination, as checked."""

    option: str
    path: str
    how: How
    #: The regular file a `replace` writes (the symlink's final target for a link).
    file: Path | None = None


def _same_file(st: os.stat_result, fd: int) -> bool:
    try:
        other = os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (other.st_dev, other.st_ino)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a file"


def check_target(option: str, path: str, *, devices: bool = True) -> Target:
    """Decide how `option PATH` is written (see the module docstring); raise `OutputError`.

    `devices=False` (for `--history`, which `check-history` must read back as a
    regular file) refuses stdout, devices and FIFOs too.
    """
    where = f"{option} {path}"
    if path == "-":
        if not devices:
            raise OutputError(f"{where}: needs a file (it is read back later)")
        return Target(option, path, "stdout")
    if not path or "\0" in path:
        raise OutputError(f"{option}: {path!r} is not a file name")
    try:
        link = os.lstat(path)
    except FileNotFoundError:
        return _new_file(option, path)
    except OSError as exc:
        raise OutputError(f"{where}: {exc.strerror}") from None
    if stat.S_ISLNK(link.st_mode):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise OutputError(
                f"{where}: is a symlink to {os.readlink(path)}, which does not exist "
                "(a link is followed, never used to create a file)"
            ) from None
        except OSError as exc:
            raise OutputError(f"{where}: {exc.strerror}") from None
    else:
        st = link
    if devices and _same_file(st, 1):
        return Target(option, path, "stdout")
    if devices and _same_file(st, 2):
        return Target(option, path, "stderr")
    if stat.S_ISREG(st.st_mode):
        file = Path(os.path.realpath(path))
        if not os.access(file, os.W_OK) or not os.access(file.parent, os.W_OK | os.X_OK):
            raise OutputError(f"{where}: permission denied (cannot replace {file})")
        return Target(option, path, "replace", file)
    if devices and (stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode)):
        if not os.access(path, os.W_OK):
            raise OutputError(f"{where}: permission denied")
        return Target(option, path, "through")
    if not devices and (stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode)):
        raise OutputError(f"{where}: is a device or FIFO; this option needs a regular file")
    raise OutputError(f"{where}: is {_kind(st.st_mode)}, not a file the result can be written to")


def _new_file(option: str, path: str) -> Target:
    file = Path(path).absolute()
    parent = file.parent
    if not parent.exists():
        raise OutputError(f"{option} {path}: the directory {parent} does not exist")
    if not parent.is_dir():
        raise OutputError(f"{option} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{option} {path}: permission denied (cannot create a file in {parent})")
    return Target(option, path, "replace", file)


def _destination(target: Target) -> str:
    if target.how in ("stdout", "stderr"):
        return target.how
    if target.how == "through":
        return os.path.realpath(target.path)
    return str(target.file)


def check_distinct(targets: list[Target]) -> None:
    """Refuse two outputs that name the same destination (one would overwrite the other)."""
    seen: dict[str, Target] = {}
    for target in targets:
        key = _destination(target)
        other = seen.get(key)
        if other is not None and key != os.devnull:
            raise OutputError(
                f"{other.option} {other.path} and {target.option} {target.path} "
                "name the same destination"
            )
        seen[key] = target


def write_bytes(target: Target, data: bytes) -> None:
    """Write `data` to `target` as `check_target` decided (checked again now)."""
    current = check_target(target.option, target.path)
    if current.how == "stdout":
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    elif current.how == "stderr":
        sys.stderr.flush()
        sys.stderr.buffer.write(data)
        sys.stderr.flush()
    elif current.how == "through":
        _write_through(current, data)
    else:
        assert current.file is not None
        _replace(current, current.file, data)


def write_text(target: Target, text: str) -> None:
    """Write `text` (UTF-8) to `target`."""
    write_bytes(target, text.encode("utf-8"))


def _write_through(target: Target, data: bytes) -> None:
    try:
        # O_NONBLOCK: opening a FIFO nobody reads fails (ENXIO) instead of waiting forever.
        fd = os.open(target.path, os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            raise OutputError(
                f"{target.option} {target.path}: is a FIFO that nobody is reading"
            ) from None
        raise OutputError(f"{target.option} {target.path}: {exc.strerror}") from None
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _replace(target: Target, file: Path, data: bytes) -> None:
    try:
        mode = stat.S_IMODE(os.stat(file).st_mode)
    except FileNotFoundError:
        mode = None
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        raise OutputError(f"{target.option} {target.path}: {exc.strerror} ({tmp})") from None
    try:
        try:
            if mode is not None:
                os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
