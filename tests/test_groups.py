"""Atomic groups (`submit_linked`, `transact`): all applied in order or none, in memory and
in the ledger; consecutive seqs; refusals, limits and keys, on both backends."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import bank
from bank.ledger.audit import audit_ledger
from bank.limits import GROUP_COMMANDS_MAX
from tests.conftest import LedgerDb


def _rows(ledger_db: LedgerDb) -> list[tuple[Any, ...]]:
    return ledger_db.query(
        "SELECT seq, kind, amount, link_first, link_count FROM transfers ORDER BY seq"
    )


def _state(b: bank.Bank) -> tuple[bank.Snapshot, list[tuple[int, int]]]:
    return b.snapshot(), [(a.id, a.held) for a in b.accounts()]


def test_a_group_is_applied_whole_as_consecutive_rows(
    make_ledger_bank: Callable[..., bank.Bank], ledger_db: LedgerDb
) -> None:
    b = make_ledger_bank()
    alice = b.open_account("alice").id
    shop = b.open_account("shop").id
    fees = b.open_account("fees").id
    b.deposit(alice, 100_00)
    h = b.hold(alice, shop, 10_00)
    receipts = b.transact(
        [
            bank.Transfer(source=alice, target=shop, amount=50_00, key="pay-1"),
            bank.Transfer(source=alice, target=fees, amount=1_00, key="fee-1"),
            bank.Post(hold=h.seq, amount=4_00),
            bank.Hold(source=alice, target=shop, amount=5_00, expires_s=600),
            bank.Withdrawal(account=alice, amount=40_00),  # uses what the post released
        ]
    )
    first = receipts[0].seq
    assert [r.seq for r in receipts] == list(range(first, first + 5))
    assert {(r.link_first, r.link_count) for r in receipts} == {(first, 5)}
    assert [r.kind for r in receipts] == ["transfer", "transfer", "post", "hold", "withdrawal"]
    assert receipts[3].expires_us == receipts[3].ts_us + 600_000_000
    assert (b.balance(alice), b.balance(shop), b.balance(fees)) == (5_00, 54_00, 1_00)
    assert b.account(alice).held == 5_00
    rows = [r for r in _rows(ledger_db) if r[3] is not None]
    assert [(r[0], r[3], r[4]) for r in rows] == [(first + i, first, 5) for i in range(5)]
    assert b.find("fee-1") == receipts[1]
    b.post(receipts[3].seq)  # the group's hold is a hold like any other
    report = audit_ledger(ledger_db.db)
    assert report.ok, report.problems[:5]


def test_a_refused_member_leaves_nothing_of_the_group(
    make_ledger_bank: Callable[..., bank.Bank], ledger_db: LedgerDb
) -> None:
    b = make_ledger_bank()
    alice = b.open_account("alice").id
    shop = b.open_account("shop").id
    b.deposit(alice, 100_00)
    h = b.hold(alice, shop, 30_00)
    before, rows_before = _state(b), _rows(ledger_db)
    cases: list[tuple[list[bank.BankCommand], int, type[bank.BankError]]] = [
        (
            [
                bank.Transfer(source=alice, target=shop, amount=60_00, key="k1"),
                bank.Withdrawal(account=alice, amount=10_01),  # 10_00 available after
            ],
            1,
            bank.InsufficientFunds,
        ),
        (
            [bank.Void(hold=h.seq), bank.Post(hold=h.seq)],  # settled twice
            1,
            bank.HoldNotPending,
        ),
        ([bank.Deposit(account=alice, amount=1), bank.Post(hold=999)], 1, bank.HoldNotFound),
        ([bank.Post(hold=h.seq, amount=30_01)], 0, bank.PostExceedsHold),
        ([bank.Deposit(account=alice, amount=1), bank.Deposit(account=77, amount=1)], 1,
         bank.AccountNotFound),
        ([bank.Hold(source=alice, target=shop, amount=70_01)], 0, bank.InsufficientFunds),
    ]  # fmt: skip
    for commands, index, error in cases:
        with pytest.raises(bank.LinkedCommandFailed) as caught:
            b.transact(commands)
        assert caught.value.index == index, caught.value
        assert isinstance(caught.value.error, error), caught.value
        assert _state(b) == before
        assert _rows(ledger_db) == rows_before
    assert b.find("k1") is None  # a refused group leaves its keys free
    assert b.transact([bank.Void(hold=h.seq, key="k1")])[0].kind == "void"


def test_group_limits_and_bad_items_are_refused_before_queueing(
    make_bank: Callable[..., bank.Bank],
) -> None:
    b = make_bank()
    alice = b.open_account("alice").id
    with pytest.raises(bank.InvalidCommand, match="1 to 8190"):
        b.submit_linked([])
    with pytest.raises(bank.InvalidCommand, match="1 to 8190"):
        b.submit_linked([bank.Deposit(account=alice, amount=1)] * (GROUP_COMMANDS_MAX + 1))
    with pytest.raises(bank.InvalidCommand, match="item 1"):
        b.submit_linked([bank.Deposit(account=alice, amount=1), "deposit"])  # type: ignore[list-item]
    with pytest.raises(bank.InvalidCommand, match="item 1"):
        b.submit_linked(
            [
                bank.Deposit(account=alice, amount=1),
                bank.Deposit(account=alice, amount=1).model_copy(update={"amount": 0}),
            ]
        )
    with pytest.raises(bank.InvalidCommand, match="also item 0"):
        b.submit_linked(
            [
                bank.Deposit(account=alice, amount=1, key="x"),
                bank.Deposit(account=alice, amount=2, key="x"),
            ]
        )
    with pytest.raises(bank.InvalidCommand, match="list of commands"):
        b.submit_linked(bank.Deposit(account=alice, amount=1))  # type: ignore[arg-type]
    assert b.stats().accepted == 0
    group = b.transact([bank.Deposit(account=alice, amount=1)] * GROUP_COMMANDS_MAX)
    assert len(group) == GROUP_COMMANDS_MAX
    assert group[-1].seq - group[0].seq == GROUP_COMMANDS_MAX - 1
    assert b.balance(alice) == GROUP_COMMANDS_MAX


def test_a_repeated_group_gets_its_receipts_and_a_partly_used_one_is_refused(
    make_ledger_bank: Callable[..., bank.Bank],
) -> None:
    b = make_ledger_bank()
    alice = b.open_account("alice").id
    shop = b.open_account("shop").id
    b.deposit(alice, 100_00)
    group = [
        bank.Transfer(source=alice, target=shop, amount=10_00, key="pay-9"),
        bank.Transfer(source=alice, target=shop, amount=1_00),  # no key: matched by position
    ]
    first = b.submit_linked(group).result(timeout=10)
    b.close()
    b = make_ledger_bank()
    assert b.transact(group) == first
    assert b.balance(alice) == 89_00
    with pytest.raises(bank.LinkedCommandFailed) as caught:
        b.transact([bank.Deposit(account=alice, amount=5, key="new"), group[0]])
    assert caught.value.index == 1
    assert isinstance(caught.value.error, bank.IdempotencyConflict)
    assert b.find("new") is None
    with pytest.raises(bank.LinkedCommandFailed) as caught:
        b.transact([group[0]])  # the group's key, but not the whole group
    assert isinstance(caught.value.error, bank.IdempotencyConflict)
    assert b.transfer(alice, shop, 10_00, key="pay-9") == first[0]  # alone: its own row
    assert b.stats().keys_in_flight == 0
