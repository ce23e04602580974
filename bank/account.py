"""`Account`: one balance guarded by its own `RLock`."""

from __future__ import annotations

from bank import lockcheck
from bank.errors import AccountClosed, BalanceOverflow, InsufficientFunds
from bank.limits import BALANCE_MAX, BALANCE_MIN, CASH_ACCOUNT_ID


class Account:
    """An account's live state. Read it freely; only the engine's workers change it.

    The lock is reentrant because the code that holds it (a transfer holds both
    accounts' locks) still reads `balance` and friends, which take it again. `balance` is the
    live in-memory value (it may include operations still being committed);
    `Bank.balance()` waits until it is durable.
    """

    __slots__ = ("_balance", "_closed", "_held", "_overdraft_limit", "id", "lock", "name")

    def __init__(self, id: int, name: str, overdraft_limit: int, balance: int = 0) -> None:
        self.id = id
        self.name = name
        self._overdraft_limit = overdraft_limit
        self._balance = balance
        self._closed = False  # set once, by `Bank.close_account` (under the lock), never unset
        self._held = 0  # the sum of this account's pending holds as their source
        self.lock = lockcheck.rlock("account", id)

    def __repr__(self) -> str:
        return f"Account(id={self.id}, name={self.name!r}, balance={self.balance}, overdraft_limit={self.overdraft_limit})"

    @property
    def balance(self) -> int:
        """Current balance in minor units."""
        with self.lock:
            return self._balance

    @property
    def held(self) -> int:
        """The sum of the pending holds this account is the source of (reserved, not moved)."""
        with self.lock:
            return self._held

    @property
    def available(self) -> int:
        """`balance + overdraft_limit - held`: what a withdrawal, transfer or new hold may use.

        (`@cash` has no overdraft limit; its only floor is signed 64 bits.)
        """
        with self.lock:
            return self._balance + self._overdraft_limit - self._held

    @property
    def overdraft_limit(self) -> int:
        """How far below zero this account may go."""
        with self.lock:
            return self._overdraft_limit

    @property
    def closed(self) -> bool:
        """True once `Bank.close_account` closed it: every later operation on it is refused."""
        with self.lock:
            return self._closed

    @property
    def is_system(self) -> bool:
        """True for `@cash`, whose only floor is signed 64 bits."""
        return self.id == CASH_ACCOUNT_ID

    def set_overdraft_limit(self, limit: int) -> None:
        """Change the limit (caller holds the lock and has checked the balance)."""
        with self.lock:
            self._overdraft_limit = limit

    def close(self) -> None:
        """Mark it closed (caller holds the lock, has checked it may close and has staged
        the 'close' event)."""
        with self.lock:
            self._closed = True


def move(source: Account, target: Account, amount: int) -> tuple[int, int]:
    """Debit `source` and credit `target` by `amount`; returns their new balances.

    The caller holds both accounts' locks. Both limits are checked before
    anything changes, so a refusal (`AccountClosed`, `InsufficientFunds`,
    `BalanceOverflow`) leaves both balances as they were. One function rather than
    four lock-taking methods because every accepted operation runs it. What the source
    holds for its pending holds is not available: the check is against `available`.
    """
    if source._closed or target._closed:  # checked under both locks: a close cannot race it
        closed = source if source._closed else target
        raise AccountClosed(f"account {closed.id} ({closed.name!r}) is closed")
    debited = source._balance - amount
    if source.id == CASH_ACCOUNT_ID:
        if debited - source._held < BALANCE_MIN:
            check_debit(source, amount, debited - source._held)  # raises
    elif debited - source._held < -source._overdraft_limit:
        check_debit(source, amount, debited - source._held)  # raises
    credited = target._balance + amount
    if credited > BALANCE_MAX:
        check_credit(target, amount)  # raises
    source._balance = debited
    target._balance = credited
    return debited, credited


def check_debit(source: Account, amount: int, floor_test: int, verb: str = "debit") -> None:
    """Raise if `floor_test` (the balance after the debit, minus what stays held) is below
    the source's floor: `-overdraft_limit` (`InsufficientFunds`), or for `@cash` signed
    64 bits (`BalanceOverflow`). The caller holds the lock."""
    if source.id == CASH_ACCOUNT_ID:
        if floor_test < BALANCE_MIN:
            raise BalanceOverflow(
                f"@cash has {source._balance} ({source._held} held): debiting {amount} "
                "would leave signed 64 bits"
            )
    elif floor_test < -source._overdraft_limit:
        held = f", {source._held} held" if source._held else ""
        raise InsufficientFunds(
            f"account {source.id} has {source._balance}{held}, overdraft limit "
            f"{source._overdraft_limit}: cannot {verb} {amount} "
            f"(available {source._balance + source._overdraft_limit - source._held})"
        )


def check_credit(target: Account, amount: int) -> int:
    """The target's balance after crediting `amount`; `BalanceOverflow` past 64 bits."""
    credited = target._balance + amount
    if credited > BALANCE_MAX:
        raise BalanceOverflow(
            f"account {target.id} has {target._balance}: crediting {amount} would leave signed 64 bits"
        )
    return credited
