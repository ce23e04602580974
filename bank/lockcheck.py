"""A lock-order checker for the engine's locks (a small lockdep), for tests and debugging.

Off by default, and then free: the factories below return plain `threading` locks.
Switched on (`BANK_LOCK_CHECK=1` in the environment, or `enabled(True)`), locks made
afterwards record, per thread, the order in which they are taken, and a blocking
acquisition that breaks an order raises `LockOrderViolation` in that thread (before
it blocks) and records it in `violations()`, so a swallowed exception still fails a
test run. Two rules:

1. The documented order (`bank.engine`'s docstring): `registry` -> `account` locks
   (ascending id among themselves) -> `writer`; `claims`, `buffer`, `batch` and `holds` are leaves
   (nothing is taken while one is held). A non-reentrant lock taken again by its
   holder is a self-deadlock.
2. Any order observed before: every blocking acquisition of class B while holding
   class A adds the edge A -> B to one process-wide graph; an acquisition that would
   close a cycle is a violation even if no rule above names those classes.

Try-acquisitions (`blocking=False`) cannot deadlock: they are tracked as held but
add no edge. Re-entering an `RLock` already held by the thread is not an event.
"""

from __future__ import annotations

import _thread
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Protocol, cast

#: Rank of each lock class in the documented order; leaves rank last and nest nothing.
_RANKS = {
    "registry": 0,
    "account": 1,
    "writer": 2,
    "claims": 3,
    "buffer": 3,
    "batch": 3,
    "holds": 3,
}
_LEAVES = frozenset({"claims", "buffer", "batch", "holds"})


class LockOrderViolation(AssertionError):
    """A thread took the engine's locks in an order that can deadlock (a bug)."""


class Lockish(Protocol):
    """What the engine needs of a lock: a plain one or a checked one."""

    def acquire(self, blocking: bool = ..., timeout: float = ...) -> bool: ...
    def release(self) -> None: ...
    def __enter__(self) -> bool: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


#: The one switch, in a dict so `enabled()` needs no `global` (read when a lock is made).
_state = {"on": os.environ.get("BANK_LOCK_CHECK", "") not in ("", "0")}
_graph_lock = threading.Lock()  # guards _edges and _violations (never a checked lock)
_edges: dict[str, set[str]] = {}
_violations: list[str] = []
_local = threading.local()


def is_enabled() -> bool:
    """True if locks made now are checked."""
    return _state["on"]


@contextmanager
def enabled(on: bool = True) -> Iterator[None]:
    """Check (or not) the locks made inside the block; restores the previous setting."""
    old = _state["on"]
    _state["on"] = on
    try:
        yield
    finally:
        _state["on"] = old


def violations() -> list[str]:
    """Every violation recorded so far (also those whose exception was swallowed)."""
    with _graph_lock:
        return list(_violations)


def reset() -> None:
    """Forget recorded violations and the observed-order graph (between tests)."""
    with _graph_lock:
        _violations.clear()
        _edges.clear()


def lock(kind: str, order: int = 0) -> _thread.LockType:
    """A `threading.Lock` of lock class `kind`, checked if checking is on.

    Typed as a plain lock: a checked one has the same methods (and a `Condition`
    over it works through their fallbacks).
    """
    if not _state["on"]:
        return threading.Lock()
    return cast("_thread.LockType", _CheckedLock(kind, order, threading.Lock(), reentrant=False))


def rlock(kind: str, order: int = 0) -> threading.RLock:
    """A `threading.RLock` of lock class `kind` (`order`: rank among its class), checked if on."""
    if not _state["on"]:
        return threading.RLock()
    return cast("threading.RLock", _CheckedLock(kind, order, threading.RLock(), reentrant=True))


def _held() -> list[_CheckedLock]:
    held: list[_CheckedLock] | None = getattr(_local, "held", None)
    if held is None:
        held = _local.held = []
    return held


def _reaches(start: str, goal: str) -> bool:
    """True if the observed graph has a path start -> ... -> goal. `_graph_lock` held."""
    seen = {start}
    todo = [start]
    while todo:
        node = todo.pop()
        if node == goal:
            return True
        for nxt in _edges.get(node, ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return False


def _fail(message: str) -> None:
    text = f"{message} (thread {threading.current_thread().name})"
    with _graph_lock:
        _violations.append(text)
    raise LockOrderViolation(text)


class _CheckedLock:
    """A lock that checks the order of acquisition before it blocks."""

    __slots__ = ("_inner", "_reentrant", "kind", "order")

    def __init__(self, kind: str, order: int, inner: Lockish, *, reentrant: bool) -> None:
        self.kind = kind
        self.order = order
        self._inner = inner
        self._reentrant = reentrant

    def __repr__(self) -> str:
        return f"<{self.kind} lock {self.order}>"

    def _check(self, held: list[_CheckedLock]) -> None:
        rank = _RANKS.get(self.kind)
        for other in held:
            if other is self:
                _fail(f"{self!r} taken again by its holder: self-deadlock")
            if other.kind in _LEAVES:
                _fail(f"{self!r} taken while holding the leaf {other!r}")
            other_rank = _RANKS.get(other.kind)
            if rank is not None and other_rank is not None:
                if other_rank > rank:
                    _fail(f"{self!r} taken while holding {other!r}: documented order inverted")
                if other.kind == self.kind and other.order >= self.order:
                    _fail(f"{self!r} taken while holding {other!r}: not in ascending order")
        with _graph_lock:
            for other in held:
                if other.kind != self.kind and _reaches(self.kind, other.kind):
                    inversion = (
                        f"{self!r} taken while holding {other!r}: inverts an order seen before"
                    )
                    _violations.append(f"{inversion} (thread {threading.current_thread().name})")
                    raise LockOrderViolation(inversion)
            for other in held:
                if other.kind != self.kind:
                    _edges.setdefault(other.kind, set()).add(self.kind)

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        held = _held()
        if self._reentrant and self in held:
            got = self._inner.acquire(blocking, timeout)
            if got:
                held.append(self)
            return got
        if blocking:
            self._check(held)
        got = self._inner.acquire(blocking, timeout)
        if got:
            held.append(self)
        return got

    def release(self) -> None:
        self._inner.release()
        held = _held()
        for i in range(len(held) - 1, -1, -1):
            if held[i] is self:
                del held[i]
                break

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


__all__ = [
    "LockOrderViolation",
    "Lockish",
    "enabled",
    "is_enabled",
    "lock",
    "reset",
    "rlock",
    "violations",
]
