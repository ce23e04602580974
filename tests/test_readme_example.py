"""The README's ten-line example, as the README has it, runs twice in a row on one file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import bank

README = Path(__file__).resolve().parents[1] / "README.md"


def _example() -> str:
    """The first python block under "The API in ten lines" (the test fails if it goes)."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## The API in ten lines", 1)[1]
    found = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert found is not None, "README.md lost its ten-line example"
    code = found.group(1)
    assert 'bank.Bank.open("ledger.db"' in code and len(code.splitlines()) <= 12
    return code


def test_the_readme_example_runs_twice_in_a_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code = compile(_example(), str(README), "exec")
    for run in (1, 2):
        exec(code, {"__name__": f"readme_run_{run}"})
    with bank.Bank.open(tmp_path / "ledger.db") as b:
        alice, shop = b.account_named("alice"), b.account_named("shop")
        # Each run deposits 100.00 and withdraws 10.00; the keyed transfer happened once.
        assert (b.balance(alice.id), b.balance(shop.id)) == (2 * 90_00 - 25_00, 25_00)
        assert len(b.history(alice.id)) == 5
        assert b.audit().ok


def test_the_readme_documents_the_balances_at_query_the_reader_runs() -> None:
    from bank.ledger.store import BALANCES_AT_SQL

    section = README.read_text(encoding="utf-8").split("### Every balance as of a seq", 1)[1]
    found = re.search(r"```sql\n(.*?)```", section, re.DOTALL)
    assert found is not None
    assert found.group(1).split() == BALANCES_AT_SQL.split()
