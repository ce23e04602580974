"""Take several accounts' locks in one global order (ascending id), so no cycle of
transfers can deadlock: any two threads contend for the lowest common id first."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from bank.account import Account


def lock_order(accounts: Iterable[Account]) -> list[Account]:
    """The distinct accounts in the order their locks must be taken."""
    return sorted({a.id: a for a in accounts}.values(), key=lambda a: a.id)


@contextmanager
def locked(accounts: Iterable[Account]) -> Iterator[list[Account]]:
    """Hold every given account's lock for the `with` body (duplicates allowed)."""
    ordered = lock_order(accounts)
    taken: list[Account] = []
    try:
        for account in ordered:
            account.lock.acquire()
            taken.append(account)
        yield ordered
    finally:
        for account in reversed(taken):
            account.lock.release()
