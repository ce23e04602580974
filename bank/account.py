"""`Account`: one balance guarded by its own `RLock`."""

from __future__ import annotations

import threading

from bank.errors import BalanceOverflow, InsufficientFunds
from bank.limits import BALANCE_MAX, BALANCE_MIN, CASH_ACCOUNT_ID


class Account:
    """An account's live state. Read it freely; only the engine's workers change it.

    The lock is reentrant because a transfer holds both accounts' locks and then
    calls `withdraw`/`deposit`, which take the same lock again. `balance` is the
    live in-memory value (it may include operations still being committed);
    `Bank.balance()` waits until it is durable.
    """

    __slots__ = ("_balance", "_overdraft_limit", "id", "lock", "name")

    def __init__(self, id: int, name: str, overdraft_limit: int, balance: int = 0) -> None:
        self.id = id
        self.name = name
        self._overdraft_limit = overdraft_limit
        self._balance = balance
        self.lock = threading.RLock()

    def __repr__(self) -> str:
        return f"Account(id={self.id}, name={self.name!r}, balance={self.balance}, overdraft_limit={self.overdraft_limit})"

    @property
    def balance(self) -> int:
        """Current balance in minor units."""
        with self.lock:
            return self._balance

    @property
    def overdraft_limit(self) -> int:
        """How far below zero this account may go."""
        with self.lock:
            return self._overdraft_limit

    @property
    def is_system(self) -> bool:
        """True for `@cash`, whose only floor is signed 64 bits."""
        return self.id == CASH_ACCOUNT_ID

    def check_withdraw(self, amount: int) -> None:
        """Raise if `withdraw(amount)` would break a limit; changes nothing."""
        with self.lock:
            after = self._balance - amount
            if self.id == CASH_ACCOUNT_ID:
                if after < BALANCE_MIN:
                    raise BalanceOverflow(
                        f"@cash has {self._balance}: debiting {amount} would leave signed 64 bits"
                    )
            elif after < -self._overdraft_limit:
                raise InsufficientFunds(
                    f"account {self.id} has {self._balance}, overdraft limit {self._overdraft_limit}: "
                    f"cannot debit {amount}"
                )

    def check_deposit(self, amount: int) -> None:
        """Raise if `deposit(amount)` would leave signed 64 bits; changes nothing."""
        with self.lock:
            if self._balance + amount > BALANCE_MAX:
                raise BalanceOverflow(
                    f"account {self.id} has {self._balance}: crediting {amount} would leave signed 64 bits"
                )

    def withdraw(self, amount: int) -> int:
        """Debit after a passed `check_withdraw` (caller holds the lock); returns the new balance."""
        with self.lock:
            self._balance -= amount
            return self._balance

    def deposit(self, amount: int) -> int:
        """Credit after a passed `check_deposit` (caller holds the lock); returns the new balance."""
        with self.lock:
            self._balance += amount
            return self._balance

    def set_overdraft_limit(self, limit: int) -> None:
        """Change the limit (caller holds the lock and has checked the balance)."""
        with self.lock:
            self._overdraft_limit = limit
