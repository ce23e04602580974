"""Every malformed command is refused at construction with a specific, readable InvalidCommand."""

from __future__ import annotations

from typing import Any

import pytest

import bank
from bank.limits import AMOUNT_MAX


@pytest.mark.parametrize(
    ("amount", "words"),
    [
        (0, "greater than or equal to 1"),
        (-5, "greater than or equal to 1"),
        (AMOUNT_MAX + 1, "less than or equal to"),
        (10**30, "less than or equal to"),
        (1.0, "valid integer"),
        (1.5, "valid integer"),
        (True, "valid integer"),
        ("100", "valid integer"),
        (None, "valid integer"),
    ],
)
def test_bad_amounts_are_refused_with_field_and_rule(amount: Any, words: str) -> None:
    for build in (
        lambda: bank.Deposit(account=1, amount=amount),
        lambda: bank.Withdrawal(account=1, amount=amount),
        lambda: bank.Transfer(source=1, target=2, amount=amount),
    ):
        with pytest.raises(bank.InvalidCommand) as info:
            build()
        assert ".amount" in str(info.value)
        assert words in str(info.value)
        assert isinstance(info.value, ValueError)


def test_largest_amount_is_accepted() -> None:
    assert bank.Deposit(account=1, amount=AMOUNT_MAX).amount == AMOUNT_MAX


@pytest.mark.parametrize("key", ["", "x" * 129, "bad\nkey", "nul\x00", "\ud800", 17, b"bytes"])
def test_bad_keys_are_refused(key: Any) -> None:
    with pytest.raises(bank.InvalidCommand, match="key"):
        bank.Transfer(source=1, target=2, amount=1, key=key)


def test_longest_key_and_unicode_keys_are_accepted() -> None:
    assert bank.Deposit(account=1, amount=1, key="k" * 128).key == "k" * 128
    assert bank.Deposit(account=1, amount=1, key="Zahlung-ü-€-😀|x").key == "Zahlung-ü-€-😀|x"


def test_same_source_and_target_is_its_own_error() -> None:
    with pytest.raises(bank.AccountsMustBeDifferent, match="source and target must be different"):
        bank.Transfer(source=3, target=3, amount=1)
    assert issubclass(bank.AccountsMustBeDifferent, bank.InvalidCommand)


@pytest.mark.parametrize("account", [-1, 2**63, 1.0, True, "1", None])
def test_bad_account_ids_are_refused(account: Any) -> None:
    with pytest.raises(bank.InvalidCommand, match="account"):
        bank.Deposit(account=account, amount=1)
    with pytest.raises(bank.InvalidCommand, match="source"):
        bank.Transfer(source=account, target=1, amount=1)


def test_cash_cannot_be_named_in_a_command() -> None:
    with pytest.raises(bank.InvalidCommand, match="@cash"):
        bank.Deposit(account=0, amount=1)
    with pytest.raises(bank.InvalidCommand, match="@cash"):
        bank.Transfer(source=0, target=1, amount=1)


def test_unknown_fields_and_missing_fields_are_refused() -> None:
    with pytest.raises(bank.InvalidCommand, match="amont"):
        bank.Deposit(account=1, amont=5)  # type: ignore[call-arg]
    with pytest.raises(bank.InvalidCommand, match="target"):
        bank.Transfer(source=1, amount=5)  # type: ignore[call-arg]


def test_commands_are_frozen_and_hashable() -> None:
    t = bank.Transfer(source=1, target=2, amount=5, key="k")
    with pytest.raises(Exception, match="frozen"):
        t.amount = 6  # type: ignore[misc]
    assert t == bank.Transfer(source=1, target=2, amount=5, key="k")
    assert hash(t) == hash(bank.Transfer(source=1, target=2, amount=5, key="k"))
    assert t.signature() == ("transfer", 1, 2, 5)
    assert bank.Deposit(account=4, amount=3).signature() == ("deposit", 0, 4, 3)
    assert bank.Withdrawal(account=4, amount=3).signature() == ("withdrawal", 4, 0, 3)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"name": ""}, "at least 1"),
        ({"name": "x" * 65}, "at most 64"),
        ({"name": "@cash"}, "reserved"),
        ({"name": " padded"}, "white space"),
        ({"name": "tab\there"}, "control"),
        ({"name": 5}, "valid string"),
        ({"name": "ok", "overdraft_limit": -1}, "greater than or equal to 0"),
        ({"name": "ok", "overdraft_limit": 1.0}, "valid integer"),
        ({"name": "ok", "overdraft_limit": True}, "valid integer"),
    ],
)
def test_bad_account_specs(kwargs: dict[str, Any], words: str) -> None:
    with pytest.raises(bank.InvalidCommand, match=words):
        bank.AccountSpec(**kwargs)
