"""`help()` of every command model is short, names its fields, and hides pydantic's machinery."""

from __future__ import annotations

import pydoc

import pytest

import bank
from bank.commands import LimitSpec, ReadableModel

MODELS = [bank.Deposit, bank.Withdrawal, bank.Transfer, bank.AccountSpec, LimitSpec]


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_help_is_short_and_names_every_field(model: type[ReadableModel]) -> None:
    page = pydoc.plain(pydoc.render_doc(model))
    assert len(page.splitlines()) < 80, page
    head = page.split("Method resolution order")[0]
    for name in model.model_fields:
        assert f"    {name}: " in head, (name, head)  # the generated Fields: section
        assert f"{name}: '" in head.splitlines()[3]  # and the signature line
    for internal in ("model_dump", "model_json_schema", "__pydantic", "Annotated", "FieldInfo"):
        assert internal not in page, internal


def test_hidden_members_still_work() -> None:
    transfer = bank.Transfer(source=1, target=2, amount=5, key="k")
    assert transfer.model_dump() == {"amount": 5, "key": "k", "source": 1, "target": 2}
    assert bank.Transfer.model_validate(transfer.model_dump()) == transfer
    assert "model_dump" in dir(transfer)  # instances list everything, as before
    assert "model_dump" not in dir(bank.Transfer)  # the class page stays short


def test_a_bad_field_is_still_invalid_command() -> None:
    with pytest.raises(bank.InvalidCommand, match=r"Transfer\.amount"):
        bank.Transfer(source=1, target=2, amount=0)
