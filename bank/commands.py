"""Commands: frozen, strict pydantic models, validated once when they are built.

Building a command is where bad input is caught: a float, a bool, a numeric
string, a zero or oversized amount, an overlong key or `source == target`
raises `InvalidCommand` (never pydantic's own `ValidationError`), so that the
engine's workers only ever see commands that are well formed.

Pydantic also builds models without validating them (`model_construct`,
`model_copy(update=...)`, `copy.copy`), so the engine trusts no command on its
word: `is_validated` is the gate every entry point passes each command through.
It asks two things, both cheap. Was this very instance validated? (The
constructor seals it; model_construct and model_copy skip the constructor and
every copy drops the seal.) And are its fields still, object for object, the
ones validation accepted? (So a sealed command whose `__dict__` was edited
afterwards is refused too.)
"""

from __future__ import annotations

import inspect
import math
import re
from operator import is_
from types import UnionType
from typing import (
    TYPE_CHECKING,
    Annotated,
    Any,
    ClassVar,
    Literal,
    Self,
    Union,
    get_args,
    get_origin,
)

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic._internal._model_construction import ModelMetaclass

from bank.errors import AccountsMustBeDifferent, InvalidCommand
from bank.limits import (
    ACCOUNT_ID_MAX,
    AMOUNT_MAX,
    BALANCE_MAX,
    CASH_ACCOUNT_ID,
    HOLD_EXPIRES_S_MAX,
    KEY_LENGTH_MAX,
    NAME_LENGTH_MAX,
    OVERDRAFT_LIMIT_MAX,
)
from bank.money import Amount

if TYPE_CHECKING:
    from bank.records import Receipt

#: The kinds of the three one-step money commands (what the load simulator mixes).
Kind = Literal["deposit", "withdrawal", "transfer"]
KINDS: tuple[Kind, ...] = ("deposit", "withdrawal", "transfer")
#: Every kind a command can have, two-phase ones included.
CommandKind = Literal["deposit", "withdrawal", "transfer", "hold", "post", "void"]

AccountId = Annotated[int, Field(ge=0, le=ACCOUNT_ID_MAX)]
Key = Annotated[str, Field(min_length=1, max_length=KEY_LENGTH_MAX)]
#: A hold's seq, as its receipt gives it.
HoldSeq = Annotated[int, Field(ge=1, le=BALANCE_MAX)]


#: Exactly Unicode categories Cc (control) and Cs (surrogate); a test compares every code point.
_BAD_TEXT = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def _check_text(value: str, what: str) -> str:
    """Keys and names end up in the hash chain as UTF-8: refuse what can't round-trip."""
    if _BAD_TEXT.search(value) is not None:
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


def _invalid(model: str, exc: ValidationError) -> InvalidCommand:
    """The `InvalidCommand` (or `AccountsMustBeDifferent`) for a failed validation.

    pydantic's `model_validate` runs our `__init__`, so its error may wrap the
    constructor's own `InvalidCommand`: that one is returned as it is.
    """
    for err in exc.errors():
        inner = err.get("ctx", {}).get("error")
        if isinstance(inner, InvalidCommand):
            return inner
    error = (
        AccountsMustBeDifferent
        if any(e["type"] == "accounts_must_be_different" for e in exc.errors())
        else InvalidCommand
    )
    return error(describe_validation_error(model, exc))


class _ReadableMeta(ModelMetaclass):
    """`dir()` of a bank model lists what bank defines, not pydantic's machinery.

    pydoc builds `help(cls)` from `dir(cls)` (through `inspect.classify_class_attrs`), so
    this keeps the fifty-odd inherited `BaseModel` members (`model_dump`, `copy`, `json`,
    `__pydantic_*__`, ...) out of the page; they still work as before (`getattr` is
    untouched), only the listing is shorter.
    """

    def __dir__(cls) -> list[str]:
        names: set[str] = {"__init__"}
        for klass in cls.__mro__:
            if klass is BaseModel:
                break
            names.update(n for n in vars(klass) if not n.startswith("_"))
        return sorted(names - {"model_config"})


class ReadableModel(BaseModel, metaclass=_ReadableMeta):
    """Base of bank's pydantic models: a short `help()` that names the fields.

    Each subclass's docstring gets a `Fields:` section generated from its fields (pydantic
    keeps fields off the class, so pydoc would not list them otherwise).
    """

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if not cls.model_fields:  # an abstract base (`_Validated`): nothing to list
            return
        lines, parameters = [], []
        for name, field in cls.model_fields.items():
            shown = _type_name(field.annotation)
            bounds = _bounds(field.metadata)
            default = inspect.Parameter.empty if field.is_required() else field.default
            parameters.append(
                inspect.Parameter(
                    name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=shown
                )
            )
            text = f"{name}: {shown}" + (
                "" if default is inspect.Parameter.empty else f" = {default!r}"
            )
            lines.append(f"    {text}{bounds}")
        doc = (cls.__doc__ or cls.__name__).rstrip()
        cls.__doc__ = doc + "\n\nFields:\n" + "\n".join(lines) + "\n"
        # The page's first line: `Transfer(*, amount: int, ...)`, not pydantic's Annotated[...].
        cls.__signature__ = inspect.Signature(parameters, return_annotation=None)


def _type_name(annotation: object) -> str:
    """`int`, `str | None`: a field's type as a reader writes it (metadata dropped)."""
    if get_origin(annotation) is Annotated:
        return _type_name(get_args(annotation)[0])
    if get_origin(annotation) in (Union, UnionType):
        return " | ".join(_type_name(a) for a in get_args(annotation))
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def _bounds(metadata: list[Any]) -> str:
    """`  (1 to 1,000,000,000,000,000)` from a field's Ge/Le/MinLen/MaxLen constraints."""
    low = next((m.ge for m in metadata if hasattr(m, "ge")), None)
    high = next((m.le for m in metadata if hasattr(m, "le")), None)
    if low is not None or high is not None:
        return f"  ({low:,} to {high:,})" if low is not None and high is not None else ""
    return ""


class _Validated(ReadableModel):
    """What every command shares: strict, frozen, sealed when validated (see `is_validated`)."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")
    kind: ClassVar[CommandKind]

    def __init__(self, /, **data: Any) -> None:
        """Validate the fields; raises `InvalidCommand` (never pydantic's `ValidationError`).

        Calls the validator as `BaseModel.__init__` does, without its frame and a second
        packing of the fields (a command is built per operation: 0.9 of its 4 us here).
        """
        try:
            self.__pydantic_validator__.validate_python(data, self_instance=self)
        except ValidationError as exc:
            raise _invalid(type(self).__name__, exc) from None
        # Only here, after validation passed: model_construct and model_copy never
        # come this way (see `is_validated`).
        _seal_instance(self)

    @classmethod
    def model_validate(cls, obj: Any, **options: Any) -> Self:
        """pydantic's validation from a mapping (or object), sealed like the constructor's.

        A model instance is validated again from its fields: pydantic would hand it
        back as it is (`revalidate_instances="never"`), and sealing that would accept
        a `model_construct`ed or edited command. Raises `InvalidCommand`.
        """
        if isinstance(obj, BaseModel):
            obj = dict(obj.__dict__)
        try:
            command = super().model_validate(obj, **options)
        except ValidationError as exc:
            raise _invalid(cls.__name__, exc) from None
        _seal_instance(command)
        return command

    @classmethod
    def model_validate_json(cls, json_data: str | bytes | bytearray, **options: Any) -> Self:
        """pydantic's validation from JSON, sealed like the constructor's; raises `InvalidCommand`."""
        try:
            command = super().model_validate_json(json_data, **options)
        except ValidationError as exc:
            raise _invalid(cls.__name__, exc) from None
        _seal_instance(command)
        return command

    def __reduce__(self) -> tuple[Any, ...]:
        # Unpickling goes through the constructor, so a pickled command comes back
        # validated (and sealed) or raises InvalidCommand.
        return (_rebuild, (type(self), dict(self.__dict__)))

    @field_validator("key", check_fields=False)
    @classmethod
    def _key_text(cls, value: str | None) -> str | None:
        return None if value is None else _check_text(value, "key")

    def same_as(self, receipt: Receipt) -> bool:
        """True if `receipt` is what this command would have made (a repeated key)."""
        raise NotImplementedError

    def describe(self) -> str:
        """The command in a few words, for an `IdempotencyConflict` message."""
        raise NotImplementedError


class Command(_Validated):
    """Base of the operations that name both accounts (deposit, withdrawal, transfer, hold)."""

    amount: Amount
    key: Key | None = None

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

    def same_as(self, receipt: Receipt) -> bool:
        return receipt.signature() == self.signature()

    def describe(self) -> str:
        return f"{self.kind} {self.debit_account}->{self.credit_account} amount {self.amount}"


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


class Hold(Command):
    """Reserves `amount` of `source` for `target` (the first phase of a two-phase transfer).

    The money stays in `source` but is no longer available to it (`Account.held`)
    until a `Post` moves all or part of it to `target` (releasing the rest), a `Void`
    releases it, or, `expires_s` seconds after the hold, the engine expires it. Either
    account may be `@cash` (a pending deposit or withdrawal); they must differ.
    """

    kind: ClassVar[CommandKind] = "hold"
    source: AccountId
    target: AccountId
    expires_s: int | float | None = None

    @property
    def debit_account(self) -> int:
        return self.source

    @property
    def credit_account(self) -> int:
        return self.target

    @property
    def expires_after_us(self) -> int | None:
        """How long the hold lasts, in whole microseconds (None: until settled)."""
        seconds = self.expires_s
        if seconds is None:
            return None
        return seconds * 1_000_000 if type(seconds) is int else round(seconds * 1_000_000)

    @field_validator("expires_s")
    @classmethod
    def _expiry(cls, value: int | float | None) -> int | float | None:
        problem = _expiry_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _different(self) -> Hold:
        if self.source == self.target:
            from pydantic_core import PydanticCustomError

            raise PydanticCustomError(
                "accounts_must_be_different",
                "source and target must be different accounts (both are {account})",
                {"account": self.source},
            )
        return self

    def same_as(self, receipt: Receipt) -> bool:
        if receipt.signature() != self.signature():
            return False
        after = self.expires_after_us
        if after is None or receipt.expires_us is None:
            return after is None and receipt.expires_us is None
        return receipt.expires_us - receipt.ts_us == after

    def describe(self) -> str:
        expiry = "" if self.expires_s is None else f" expiring after {self.expires_s} s"
        return f"{super().describe()}{expiry}"


class Post(_Validated):
    """Completes hold `hold` (the seq of its receipt): moves `amount` (default: all of it,
    never more) from its source to its target and releases the rest."""

    kind: ClassVar[CommandKind] = "post"
    hold: HoldSeq
    amount: Amount | None = None
    key: Key | None = None

    def same_as(self, receipt: Receipt) -> bool:
        # Without an amount it asked for "all of the hold": the post of that hold under
        # this key is its answer, whatever amount that was (the hold's amount is not on
        # the post's row to compare with).
        return (
            receipt.kind == "post"
            and receipt.hold_seq == self.hold
            and (self.amount is None or receipt.amount == self.amount)
        )

    def describe(self) -> str:
        amount = "all" if self.amount is None else f"amount {self.amount}"
        return f"post of hold {self.hold}, {amount}"


class Void(_Validated):
    """Cancels hold `hold` (the seq of its receipt): releases all of it, moves nothing."""

    kind: ClassVar[CommandKind] = "void"
    hold: HoldSeq
    key: Key | None = None

    def same_as(self, receipt: Receipt) -> bool:
        return receipt.kind == "void" and receipt.hold_seq == self.hold

    def describe(self) -> str:
        return f"void of hold {self.hold}"


#: The one-step money commands (what the load simulator's plain mixes submit).
AnyCommand = Deposit | Withdrawal | Transfer
#: Every command the engine takes: `submit`, `submit_many`, `submit_linked`.
BankCommand = Deposit | Withdrawal | Transfer | Hold | Post | Void
#: The commands that settle a hold.
SettleCommand = Post | Void


def _expiry_problem(value: object) -> str | None:
    """Why `value` is no `Hold.expires_s`, or None."""
    if value is None:
        return None
    if type(value) is not int and type(value) is not float:
        return f"must be None or a number of seconds (got {_shown(value)})"
    if not (math.isfinite(value) and 0 < value <= HOLD_EXPIRES_S_MAX):
        return f"must be None or a number of seconds above 0 and at most {HOLD_EXPIRES_S_MAX}"
    if type(value) is float and round(value * 1_000_000) < 1:
        return "must be at least one microsecond"
    return None


def _rebuild(cls: type[_Validated], fields: dict[str, Any]) -> _Validated:
    return cls(**fields)


# -- the engine's gate: was this command validated, and is it still valid? ---------


class _Sealed(set[str]):
    """The fields-set of a validated command, tied to the fields it validated.

    pydantic copies `__pydantic_fields_set__` with `copy()` in model_copy (with or
    without `update`, deep or not) and pickles it: each of those gets a plain set,
    so no copy inherits the seal. `fields` is the instance's own `__dict__` (a copy
    has a new one), so a seal handed to `model_construct(_fields_set=...)` seals
    nothing; holding the dict rather than an id means no new object can reuse it.
    `values` are the field values as validated (amount, key, then the accounts).
    """

    __slots__ = ("fields", "values")
    fields: dict[str, Any]
    values: tuple[Any, ...]

    def __copy__(self) -> set[str]:
        return set(self)

    def __deepcopy__(self, memo: object) -> set[str]:
        return set(self)

    def __reduce__(self) -> tuple[Any, ...]:
        return (set, (list(self),))


def _seal_instance(command: _Validated, _set: Any = object.__setattr__) -> None:
    fields = command.__dict__
    sealed = _Sealed(command.__pydantic_fields_set__)
    sealed.fields = fields
    # pydantic fills __dict__ in field order (amount, key, then the accounts, for the
    # one-step commands); were that to change, `is_validated` would refuse every
    # command, never accept a bad one.
    sealed.values = tuple(fields.values())
    _set(command, "__pydantic_fields_set__", sealed)


#: Exact types only: a subclass could override any field or property.
COMMAND_TYPES = frozenset((Deposit, Withdrawal, Transfer, Hold, Post, Void))
_TWO_PHASE_TYPES = frozenset((Hold, Post, Void))


def is_validated(
    command: Any,
    _transfer: type = Transfer,
    _deposit: type = Deposit,
    _withdrawal: type = Withdrawal,
    _sealed: type[_Sealed] = _Sealed,
    _two_phase: frozenset[type] = _TWO_PHASE_TYPES,
    _is: Any = is_,
) -> bool:
    """True only for a command of one of the exact command types that was validated and
    whose fields are still, object for object, the ones validation accepted.

    The engine calls it on every command it is given, so it is one function with
    its names bound as fast locals: ~0.15 us. Identity (`is`) is the exact
    re-check: the values were checked when sealed and are immutable, and an edit
    of `__dict__` behind `frozen=True` puts a different object there (1.5 or
    True for 1 included, which `==` would let through). A new command type adds
    a branch here.
    """
    kind = type(command)
    if kind is not _transfer and kind is not _deposit and kind is not _withdrawal:
        if kind not in _two_phase:
            return False
        seal = command.__pydantic_fields_set__
        if type(seal) is not _sealed:
            return False
        fields = command.__dict__
        values = seal.values
        return (
            seal.fields is fields
            and len(fields) == len(values)
            and all(map(_is, fields.values(), values))
        )
    seal = command.__pydantic_fields_set__
    if type(seal) is not _sealed:
        return False  # model_construct, model_copy, copy.copy: never validated
    fields = command.__dict__
    try:
        if kind is _transfer:
            amount, key, source, target = seal.values
            return (
                seal.fields is fields
                and len(fields) == 4
                and fields["amount"] is amount
                and fields["source"] is source
                and fields["target"] is target
                and fields["key"] is key
            )
        amount, key, account = seal.values
        return (
            seal.fields is fields
            and len(fields) == 3
            and fields["amount"] is amount
            and fields["account"] is account
            and fields["key"] is key
        )
    except KeyError:  # a field deleted from __dict__ (and another put in its place)
        return False


def _shown(value: object) -> str:
    """A value for a one-line message, cut short (a forged key may be huge)."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def _field_problem(
    name: str, value: object, *, post: bool = False, cash_ok: bool = False
) -> str | None:
    """Why one stored field breaks its rule, or None (the slow path of `is_validated`).

    `post`: a `Post`, whose amount may be None; `cash_ok`: a `Hold`, whose accounts may
    be `@cash`."""
    if name == "amount":
        if value is None and post:
            return None
        if type(value) is not int or not 1 <= value <= AMOUNT_MAX:
            return f"must be an int from 1 to {AMOUNT_MAX} (got {_shown(value)})"
    elif name == "expires_s":
        return _expiry_problem(value)
    elif name == "hold":
        if type(value) is not int or not 1 <= value <= BALANCE_MAX:
            return f"must be an int from 1 to {BALANCE_MAX} (got {_shown(value)})"
    elif name == "key":
        if value is not None:
            return _key_problem(value, "None or ")
    elif type(value) is not int or not 0 <= value <= ACCOUNT_ID_MAX:
        return f"must be an int from 1 to {ACCOUNT_ID_MAX} (got {_shown(value)})"
    elif value == CASH_ACCOUNT_ID and not cash_ok:
        return f"must be a customer account, not @cash (got {_shown(value)})"
    return None


def _key_problem(value: object, also: str = "") -> str | None:
    """Why `value` is not an idempotency key, or None (`also`: what else is allowed)."""
    if type(value) is not str or not 1 <= len(value) <= KEY_LENGTH_MAX:
        return f"must be {also}a str of 1 to {KEY_LENGTH_MAX} characters (got {_shown(value)})"
    if _BAD_TEXT.search(value) is not None:
        return f"must not contain control characters or lone surrogates (got {_shown(value)})"
    return None


def check_key(key: object, where: str) -> str:
    """`key` if it is a valid idempotency key (a command's rule for `key`, None excluded);
    raises `InvalidCommand` naming `where` and the rule. For look-ups by key (`Bank.find`)."""
    problem = _key_problem(key)
    if problem is not None:
        raise InvalidCommand(f"{where}: key {problem}")
    assert isinstance(key, str)
    return key


def refusal(command: object, where: str) -> InvalidCommand:
    """The error for a command `is_validated` refused: the first broken field and its rule.

    `where` says which call and item it was (`submit`, `submit_many: item 3`).
    """
    if type(command) not in COMMAND_TYPES:
        return InvalidCommand(
            f"{where}: takes a bank.Deposit, Withdrawal or Transfer (or a Hold, Post or Void) "
            f"(got {type(command).__name__})"
        )
    assert isinstance(command, _Validated)
    kind = type(command)
    name = kind.__name__
    fields: dict[str, Any] = command.__dict__
    expected = kind.model_fields
    for field in expected:
        if field not in fields:
            return InvalidCommand(
                f"{where}: {name}.{field}: missing (built without validation, by model_construct?)"
            )
    for field in fields:
        if field not in expected:
            return InvalidCommand(
                f"{where}: {name}.{field}: unknown field (added by model_copy(update=...)?)"
            )
    for field, value in fields.items():
        problem = _field_problem(field, value, post=kind is Post, cash_ok=kind is Hold)
        if problem is not None:
            return InvalidCommand(f"{where}: {name}.{field}: {problem}")
    if kind in (Transfer, Hold) and fields["source"] == fields["target"]:
        return AccountsMustBeDifferent(
            f"{where}: {name}: source and target must be different accounts "
            f"(both are {fields['source']!r})"
        )
    return InvalidCommand(
        f"{where}: this {name} was not validated (made by model_construct, model_copy or "
        f"copy): build it with {name}(...)"
    )


class AccountSpec(ReadableModel):
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


class LimitSpec(ReadableModel):
    """Validated arguments of `Bank.set_overdraft_limit`."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")
    account: AccountId
    overdraft_limit: Annotated[int, Field(ge=0, le=OVERDRAFT_LIMIT_MAX)]

    def __init__(self, /, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise InvalidCommand(describe_validation_error("set_overdraft_limit", exc)) from None
