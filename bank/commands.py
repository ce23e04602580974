"""Commands: frozen, strict pydantic models, validated once when they are built.

Building a command is where bad input is caught: a float, a bool, a numeric
string, a zero or oversized amount, an overlong key or `source == target`
raises `InvalidCommand` (never pydantic's own `ValidationError`), so that the
engine's workers only ever see commands that are well formed.
"""

from __future__ import annotations

import unicodedata
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bank.errors import AccountsMustBeDifferent, InvalidCommand
from bank.limits import (
    ACCOUNT_ID_MAX,
    CASH_ACCOUNT_ID,
    KEY_LENGTH_MAX,
    NAME_LENGTH_MAX,
    OVERDRAFT_LIMIT_MAX,
)
from bank.money import Amount

Kind = Literal["deposit", "withdrawal", "transfer"]
KINDS: tuple[Kind, ...] = ("deposit", "withdrawal", "transfer")

AccountId = Annotated[int, Field(ge=0, le=ACCOUNT_ID_MAX)]
Key = Annotated[str, Field(min_length=1, max_length=KEY_LENGTH_MAX)]


def _check_text(value: str, what: str) -> str:
    """Keys and names end up in the hash chain as UTF-8: refuse what can't round-trip."""
    for ch in value:
        if unicodedata.category(ch) in ("Cc", "Cs"):
            raise ValueError(f"{what} must not contain control characters or lone surrogates")
    return value


def describe_validation_error(model: str, exc: ValidationError) -> str:
    """One line per broken rule: `Transfer.amount: Input should be ... (got 0)`."""
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "source/target"
        msg = err["msg"].removeprefix("Value error, ")
        got = err.get("input")
        shown = f" (got {got!r})" if err["type"] != "missing" and not isinstance(got, dict) else ""
        parts.append(f"{model}.{field}: {msg}{shown}")
    return "; ".join(parts)


class Command(BaseModel):
    """Base of the three operations; subclasses say which accounts they debit and credit."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")
    kind: ClassVar[Kind]

    amount: Amount
    key: Key | None = None

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            error = (
                AccountsMustBeDifferent
                if any(e["type"] == "accounts_must_be_different" for e in exc.errors())
                else InvalidCommand
            )
            raise error(describe_validation_error(type(self).__name__, exc)) from None

    @field_validator("key")
    @classmethod
    def _key_text(cls, value: str | None) -> str | None:
        return None if value is None else _check_text(value, "key")

    @property
    def debit_account(self) -> int:
        """The account money leaves."""
        raise NotImplementedError

    @property
    def credit_account(self) -> int:
        """The account money arrives in."""
        raise NotImplementedError

    def signature(self) -> tuple[str, int, int, int]:
        """What must match for a repeated idempotency key to count as the same command."""
        return (self.kind, self.debit_account, self.credit_account, self.amount)


class Deposit(Command):
    """Cash in: moves `amount` from `@cash` to `account`."""

    kind: ClassVar[Kind] = "deposit"
    account: AccountId

    @property
    def debit_account(self) -> int:
        return CASH_ACCOUNT_ID

    @property
    def credit_account(self) -> int:
        return self.account

    @field_validator("account")
    @classmethod
    def _not_cash(cls, value: int) -> int:
        if value == CASH_ACCOUNT_ID:
            raise ValueError("must be a customer account, not @cash")
        return value


class Withdrawal(Command):
    """Cash out: moves `amount` from `account` to `@cash`."""

    kind: ClassVar[Kind] = "withdrawal"
    account: AccountId

    @property
    def debit_account(self) -> int:
        return self.account

    @property
    def credit_account(self) -> int:
        return CASH_ACCOUNT_ID

    @field_validator("account")
    @classmethod
    def _not_cash(cls, value: int) -> int:
        if value == CASH_ACCOUNT_ID:
            raise ValueError("must be a customer account, not @cash")
        return value


class Transfer(Command):
    """Moves `amount` from `source` to `target` (two different customer accounts)."""

    kind: ClassVar[Kind] = "transfer"
    source: AccountId
    target: AccountId

    @property
    def debit_account(self) -> int:
        return self.source

    @property
    def credit_account(self) -> int:
        return self.target

    @field_validator("source", "target")
    @classmethod
    def _not_cash(cls, value: int) -> int:
        if value == CASH_ACCOUNT_ID:
            raise ValueError("must be a customer account, not @cash (use Deposit or Withdrawal)")
        return value

    @model_validator(mode="after")
    def _different(self) -> Transfer:
        if self.source == self.target:
            from pydantic_core import PydanticCustomError

            raise PydanticCustomError(
                "accounts_must_be_different",
                "source and target must be different accounts (both are {account})",
                {"account": self.source},
            )
        return self


AnyCommand = Deposit | Withdrawal | Transfer


class AccountSpec(BaseModel):
    """Validated arguments of `Bank.open_account`."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")
    name: Annotated[str, Field(min_length=1, max_length=NAME_LENGTH_MAX)]
    overdraft_limit: Annotated[int, Field(ge=0, le=OVERDRAFT_LIMIT_MAX)] = 0

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise InvalidCommand(describe_validation_error("open_account", exc)) from None

    @field_validator("name")
    @classmethod
    def _name_text(cls, value: str) -> str:
        _check_text(value, "name")
        if value != value.strip():
            raise ValueError("name must not start or end with white space")
        if value.startswith("@"):
            raise ValueError("names starting with '@' are reserved for system accounts")
        return value


class LimitSpec(BaseModel):
    """Validated arguments of `Bank.set_overdraft_limit`."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")
    account: AccountId
    overdraft_limit: Annotated[int, Field(ge=0, le=OVERDRAFT_LIMIT_MAX)]

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise InvalidCommand(describe_validation_error("set_overdraft_limit", exc)) from None
