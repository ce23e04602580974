"""The engine refuses every command it did not validate (model_construct, model_copy, copies,
edits behind `frozen=True`) with InvalidCommand at each entry point, and writes nothing."""

from __future__ import annotations

import copy
import pickle
import unicodedata
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import bank
from bank.ledger.audit import audit_ledger
from bank.limits import ACCOUNT_ID_MAX, KEY_LENGTH_MAX
from tests.conftest import LEDGER_PARAMS, new_ledger

Command = bank.Deposit | bank.Withdrawal | bank.Transfer

# Accounts 1 and 2 exist in the module's bank (opened first, in this order).
A, B = 1, 2


def _edited(command: Command, **fields: Any) -> Command:
    """A validated command whose fields were changed behind `frozen=True`."""
    for name, value in fields.items():
        object.__setattr__(command, name, value)
    return command


def _stolen_seal() -> Command:
    """model_construct handed the fields-set (the seal) of a validated command."""
    donor = bank.Deposit(account=A, amount=5)
    return bank.Deposit.model_construct(
        _fields_set=donor.__pydantic_fields_set__, account=A, amount=5
    )


def _dead_donor_seal() -> Command:
    """The same with a donor that is gone, so its address may be reused."""
    seal = bank.Deposit(account=A, amount=5).__pydantic_fields_set__
    return bank.Deposit.model_construct(_fields_set=seal, account=A, amount=5)


#: (id, a forged command, words its refusal must contain). Each one got past the old gate.
FORGED: list[tuple[str, Callable[[], Any], str]] = [
    ("amount-real", lambda: bank.Deposit.model_construct(account=A, amount=1.5), "Deposit.amount"),  # type: ignore[arg-type]
    ("amount-bool", lambda: bank.Deposit.model_construct(account=A, amount=True), "Deposit.amount"),
    (
        "amount-zero",
        lambda: bank.Withdrawal.model_construct(account=A, amount=0),
        "Withdrawal.amount",
    ),
    (
        "amount-huge",
        lambda: bank.Deposit.model_construct(account=A, amount=10**16),
        "Deposit.amount",
    ),
    ("amount-str", lambda: bank.Deposit.model_construct(account=A, amount="5"), "Deposit.amount"),  # type: ignore[arg-type]
    (
        "account-negative",
        lambda: bank.Deposit.model_construct(account=-1, amount=5),
        "Deposit.account",
    ),
    ("account-cash", lambda: bank.Withdrawal.model_construct(account=0, amount=5), "not @cash"),
    (
        "account-huge",
        lambda: bank.Deposit.model_construct(account=ACCOUNT_ID_MAX + 1, amount=5),
        "Deposit.account",
    ),
    (
        "account-bool",
        lambda: bank.Deposit.model_construct(account=True, amount=5),
        "Deposit.account",
    ),
    (
        "source-cash",
        lambda: bank.Transfer.model_construct(source=0, target=B, amount=5),
        "Transfer.source",
    ),
    ("key-empty", lambda: bank.Deposit.model_construct(account=A, amount=5, key=""), "Deposit.key"),
    (
        "key-long",
        lambda: bank.Deposit.model_construct(account=A, amount=5, key="a" * (KEY_LENGTH_MAX + 1)),
        "Deposit.key",
    ),
    (
        "key-control",
        lambda: bank.Deposit.model_construct(account=A, amount=5, key="bad\nkey"),
        "control characters",
    ),
    (
        "key-nul",
        lambda: bank.Transfer.model_construct(source=A, target=B, amount=5, key="x\x00"),
        "control characters",
    ),
    (
        "key-surrogate",
        lambda: bank.Deposit.model_construct(account=A, amount=5, key="\ud800"),
        "surrogates",
    ),
    ("key-int", lambda: bank.Deposit.model_construct(account=A, amount=5, key=17), "Deposit.key"),  # type: ignore[arg-type]
    (
        "same-accounts",
        lambda: bank.Transfer.model_construct(source=A, target=A, amount=5),
        "source and target must be different",
    ),
    ("missing-account", lambda: bank.Deposit.model_construct(amount=5), "Deposit.account: missing"),  # type: ignore[call-arg]
    (
        "missing-target",
        lambda: bank.Transfer.model_construct(source=A, amount=5),  # type: ignore[call-arg]
        "Transfer.target: missing",
    ),
    # model_construct drops an unknown field silently (here a mistyped key: a retry would pay twice).
    (
        "extra-field",
        lambda: bank.Deposit.model_construct(account=A, amount=5, kye="order-1"),  # type: ignore[call-arg]
        "not validated",
    ),
    (
        "valid-but-constructed",
        lambda: bank.Transfer.model_construct(source=A, target=B, amount=5),
        "not validated",
    ),
    (
        "copy-amount",
        lambda: bank.Deposit(account=A, amount=5).model_copy(update={"amount": 1.5}),
        "Deposit.amount",
    ),
    (
        "copy-same-accounts",
        lambda: (t := bank.Transfer(source=A, target=B, amount=5)).model_copy(
            update={"source": t.target}
        ),
        "source and target must be different",
    ),
    (
        "copy-extra",
        lambda: bank.Deposit(account=A, amount=5).model_copy(update={"colour": "red"}),
        "Deposit.colour: unknown field",
    ),
    (
        "copy-deep-amount",
        lambda: bank.Deposit(account=A, amount=5).model_copy(update={"amount": True}, deep=True),
        "Deposit.amount",
    ),
    (
        "copy-valid-update",
        lambda: bank.Deposit(account=A, amount=5).model_copy(update={"amount": 6}),
        "not validated",
    ),
    ("copy-plain", lambda: bank.Deposit(account=A, amount=5).model_copy(), "not validated"),
    ("copy-module", lambda: copy.copy(bank.Deposit(account=A, amount=5)), "not validated"),
    ("copy-deep", lambda: copy.deepcopy(bank.Withdrawal(account=A, amount=5)), "not validated"),
    (
        "edited-amount",
        lambda: _edited(bank.Deposit(account=A, amount=5), amount=1.5),
        "Deposit.amount",
    ),
    (
        "edited-target",
        lambda: _edited(bank.Transfer(source=A, target=B, amount=5), target=A),
        "source and target must be different",
    ),
    (
        "edited-big-amount",
        lambda: _edited(bank.Deposit(account=A, amount=10**12), amount=int("1" + "0" * 12)),
        "not validated",
    ),
    ("stolen-seal", _stolen_seal, "not validated"),
    ("dead-donor-seal", _dead_donor_seal, "not validated"),
    ("not-a-command", lambda: {"account": A, "amount": 5}, "Deposit, Withdrawal or Transfer"),
]


@pytest.fixture(scope="module", params=LEDGER_PARAMS)
def module_bank(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[bank.Bank]:
    """One bank per backend for the whole file (with accounts 1 and 2 funded); audited
    after it closes."""
    ledger = new_ledger(request, tmp_path_factory.mktemp("unvalidated"))
    try:
        b = bank.Bank.open(ledger.db)
        assert b.open_account("a").id == A
        assert b.open_account("b").id == B
        b.deposit(A, 1_000)
        b.deposit(B, 1_000)
        yield b
        b.close()
        report = audit_ledger(ledger.db)
        assert report.ok, report.problems
        if ledger.backend == "sqlite":  # PostgreSQL's BIGINT column holds nothing else
            types = ledger.query("SELECT DISTINCT typeof(amount) FROM transfers")
            assert types == [("integer",)]
    finally:
        if ledger.server is not None:
            ledger.drop()


def _state(b: bank.Bank) -> tuple[int, dict[int, int]]:
    snapshot = b.snapshot()
    return snapshot.seq, snapshot.balances


@pytest.mark.parametrize(
    ("build", "words"), [(f, w) for _, f, w in FORGED], ids=[i for i, _, _ in FORGED]
)
def test_submit_refuses_a_command_it_did_not_validate(
    module_bank: bank.Bank, build: Callable[[], Any], words: str
) -> None:
    before = _state(module_bank)
    forged = build()
    with pytest.raises(bank.InvalidCommand) as info:
        module_bank.submit(forged)
    message = str(info.value)
    assert message.startswith("submit: ") and words in message
    assert "\n" not in message
    assert _state(module_bank) == before
    assert module_bank.deposit(A, 1).amount == 1  # still working


@pytest.mark.parametrize(
    ("build", "words"), [(f, w) for _, f, w in FORGED], ids=[i for i, _, _ in FORGED]
)
def test_submit_many_names_the_item_and_queues_nothing(
    module_bank: bank.Bank, build: Callable[[], Any], words: str
) -> None:
    before = _state(module_bank)
    batch = [bank.Deposit(account=A, amount=7), bank.Deposit(account=B, amount=7), build()]
    with pytest.raises(bank.InvalidCommand) as info:
        module_bank.submit_many(batch)
    assert str(info.value).startswith("submit_many: item 2: ") and words in str(info.value)
    assert _state(module_bank) == before  # the valid commands before it were not queued
    assert [f.result().amount for f in module_bank.submit_many(batch[:2])] == [7, 7]


def test_a_refused_forgery_keeps_its_key_free(module_bank: bank.Bank) -> None:
    forged = bank.Deposit(account=A, amount=5, key="forged-1").model_copy(update={"amount": 1.5})
    with pytest.raises(bank.InvalidCommand):
        module_bank.submit(forged)
    assert module_bank.find("forged-1") is None
    assert module_bank.deposit(A, 5, key="forged-1").key == "forged-1"


def test_blocking_calls_refuse_bad_arguments(module_bank: bank.Bank) -> None:
    before = _state(module_bank)
    with pytest.raises(bank.InvalidCommand, match="amount"):
        module_bank.deposit(A, 1.5)  # type: ignore[arg-type]
    with pytest.raises(bank.InvalidCommand, match="amount"):
        module_bank.withdraw(A, True)
    with pytest.raises(bank.AccountsMustBeDifferent):
        module_bank.transfer(A, A, 1)
    assert _state(module_bank) == before


@pytest.mark.parametrize(
    "build",
    [
        lambda: bank.Transfer(source=A, target=B, amount=3, key="Zahlung-ü-€-😀"),
        lambda: bank.Deposit.model_validate({"account": A, "amount": 3}),
        lambda: bank.Withdrawal.model_validate_json('{"account": 1, "amount": 3, "key": "j"}'),
        lambda: pickle.loads(pickle.dumps(bank.Transfer(source=A, target=B, amount=3))),
        lambda: (c := bank.Deposit(account=A, amount=3).model_copy()).__class__(**c.model_dump()),
    ],
    ids=["constructor", "model_validate", "model_validate_json", "pickled", "copy-rebuilt"],
)
def test_validated_commands_are_accepted(
    module_bank: bank.Bank, build: Callable[[], Command]
) -> None:
    from bank.commands import is_validated

    command = build()
    assert is_validated(command)
    assert module_bank.submit(command).result().amount == 3


class _TamperedPickle:
    """Pickles as a Deposit whose amount was edited in the byte stream."""

    def __reduce__(self) -> tuple[Any, ...]:
        from bank.commands import _rebuild

        return (_rebuild, (bank.Deposit, {"account": A, "amount": 0, "key": None}))


def test_unpickling_a_tampered_command_raises_invalid_command() -> None:
    data = pickle.dumps(_TamperedPickle())
    with pytest.raises(bank.InvalidCommand, match=r"Deposit\.amount"):
        pickle.loads(data)


def test_control_character_rule_is_exactly_unicode_cc_and_cs() -> None:
    from bank.commands import _BAD_TEXT

    # The gate's and the validators' regular expression against unicodedata, code point by code point.
    for code in range(0x110000):
        ch = chr(code)
        assert (_BAD_TEXT.search(ch) is not None) == (unicodedata.category(ch) in ("Cc", "Cs")), (
            hex(code)
        )


def test_specs_cannot_be_bypassed_through_the_public_api(module_bank: bank.Bank) -> None:
    # open_account / set_overdraft_limit take plain arguments and build their specs
    # themselves, so a caller has no way to hand them an unvalidated one.
    with pytest.raises(bank.InvalidCommand, match="name"):
        module_bank.open_account("")
    with pytest.raises(bank.InvalidCommand, match="overdraft_limit"):
        module_bank.open_account("c", overdraft_limit=1.5)  # type: ignore[arg-type]
    with pytest.raises(bank.InvalidCommand, match="overdraft_limit"):
        module_bank.set_overdraft_limit(A, True)


def test_a_field_swapped_in_dict_is_refused() -> None:
    from bank.commands import is_validated, refusal

    # The unknown-field branch in the gate: a field deleted from __dict__ and another added.
    command = bank.Deposit(account=A, amount=5)
    del command.__dict__["key"]
    command.__dict__["kee"] = None
    assert not is_validated(command)
    assert "Deposit.key: missing" in str(refusal(command, "x"))


@pytest.mark.parametrize("build", [f for _, f, _ in FORGED], ids=[i for i, _, _ in FORGED])
def test_the_gate_says_no(build: Callable[[], Any]) -> None:
    from bank.commands import is_validated

    assert not is_validated(build())
