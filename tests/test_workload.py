"""The workload is reproducible per teller, parses --mix/--skew strictly, refuses realistically."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bank import Deposit, Transfer, Withdrawal
from bank.commands import AnyCommand
from bank.simulate.workload import (
    MIX_DEFAULT,
    InvalidWorkload,
    Mix,
    Skew,
    WorkloadSpec,
    parse_mix,
    parse_skew,
    split_ops,
)

ACCOUNTS = tuple(range(1, 101))


def _spec(seed: int = 7, *, mix: str = MIX_DEFAULT, skew: str = "uniform") -> WorkloadSpec:
    return WorkloadSpec(ACCOUNTS, parse_mix(mix), parse_skew(skew), seed, 100_000)


def test_same_seed_gives_each_teller_the_same_commands() -> None:
    a, b = _spec(seed=42), _spec(seed=42)
    for teller in range(8):
        assert a.stream(teller).take_commands(500) == b.stream(teller).take_commands(500)


def test_a_tellers_commands_do_not_depend_on_how_the_others_are_consumed() -> None:
    """Interleaving-independence: each teller owns its stream; consume them in any order."""
    spec = _spec(seed=3)
    alone = [spec.stream(t).take_commands(300) for t in range(8)]
    streams = [spec.stream(t) for t in range(8)]
    got: list[list[AnyCommand]] = [[] for _ in range(8)]
    shuffler = random.Random(99)
    while any(len(g) < 300 for g in got):
        t = shuffler.randrange(8)
        if len(got[t]) < 300:
            got[t].extend(streams[t].take_commands(min(shuffler.randint(1, 40), 300 - len(got[t]))))
    assert got == alone


def test_different_seeds_and_different_tellers_differ() -> None:
    assert _spec(seed=1).stream(0).take_commands(50) != _spec(seed=2).stream(0).take_commands(50)
    spec = _spec(seed=1)
    assert spec.stream(0).take_commands(50) != spec.stream(1).take_commands(50)


def test_mix_is_followed() -> None:
    commands = _spec(mix="transfer=60,deposit=30,withdraw=10").stream(0).take_commands(20_000)
    kinds = Counter(type(c) for c in commands)
    assert abs(kinds[Transfer] / 20_000 - 0.6) < 0.02
    assert abs(kinds[Deposit] / 20_000 - 0.3) < 0.02
    assert abs(kinds[Withdrawal] / 20_000 - 0.1) < 0.02
    only = _spec(mix="deposit=1").stream(0).take_commands(200)
    assert all(isinstance(c, Deposit) for c in only)


def test_commands_are_valid_and_amounts_are_ints() -> None:
    for command in _spec(skew="zipf:2").stream(0).take_commands(5_000):
        assert type(command.amount) is int
        assert 1 <= command.amount <= 200_000
        if isinstance(command, Transfer):
            assert command.source != command.target
            assert {command.source, command.target} <= set(ACCOUNTS)
        else:
            assert command.account in ACCOUNTS


def test_zipf_makes_hot_accounts_and_uniform_does_not() -> None:
    def first_account(c: AnyCommand) -> int:
        return c.source if isinstance(c, Transfer) else c.account

    hot = Counter(first_account(c) for c in _spec(skew="zipf:1.2").stream(0).take_commands(20_000))
    flat = Counter(first_account(c) for c in _spec(skew="uniform").stream(0).take_commands(20_000))
    assert hot.most_common(1)[0][0] == ACCOUNTS[0]
    assert hot[ACCOUNTS[0]] > 10 * hot[ACCOUNTS[-1]] + 100
    assert max(flat.values()) < 3 * min(flat.values())


def test_a_very_hot_account_still_gets_distinct_transfer_targets() -> None:
    spec = WorkloadSpec((1, 2), parse_mix("transfer=1"), parse_skew("zipf:10"), 0, 1000)
    assert all(
        c.source != c.target for c in spec.stream(0).take_commands(2_000) if isinstance(c, Transfer)
    )


def test_reject_share_is_realistic_when_replayed_sequentially() -> None:
    """Replayed in order against funded accounts, 5-20% of debits are refused."""
    spec = WorkloadSpec(tuple(range(1, 1001)), parse_mix(MIX_DEFAULT), Skew("uniform"), 1, 100_000)
    balances = dict.fromkeys(spec.accounts, spec.initial_balance)
    streams = [spec.stream(t) for t in range(16)]
    debits = refused = 0
    for i in range(40_000):
        command = streams[i % 16].take_commands(1)[0]
        if isinstance(command, Deposit):
            balances[command.account] += command.amount
            continue
        debits += 1
        source = command.source if isinstance(command, Transfer) else command.account
        if balances[source] < command.amount:
            refused += 1
            continue
        balances[source] -= command.amount
        if isinstance(command, Transfer):
            balances[command.target] += command.amount
    assert 0.05 <= refused / debits <= 0.20


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("transfer=80,deposit=10,withdraw=10", Mix(deposit=10, withdrawal=10, transfer=80)),
        (" Deposit = 1 , withdrawal=2 ", Mix(deposit=1, withdrawal=2, transfer=0)),
        ("transfer=5", Mix(deposit=0, withdrawal=0, transfer=5)),
    ],
)
def test_parse_mix(text: str, expected: Mix) -> None:
    assert parse_mix(text) == expected
    assert parse_mix(expected.spec()) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("transfer", "NAME=WEIGHT"),
        ("=5", "NAME=WEIGHT"),
        ("loan=5", "unknown kind 'loan'"),
        ("transfer=-1", "non-negative integer"),
        ("transfer=1.5", "non-negative integer"),
        ("transfer=", "non-negative integer"),
        ("transfer=1,transfer=2", "more than once"),
        ("withdraw=1,withdrawal=2", "more than once"),
        ("transfer=0,deposit=0", "add up to 0"),
        ("transfer=80,,deposit=20", "NAME=WEIGHT"),
    ],
)
def test_bad_mix_specs_are_refused_clearly(text: str, message: str) -> None:
    with pytest.raises(InvalidWorkload, match=message):
        parse_mix(text)


def test_parse_skew() -> None:
    assert parse_skew("uniform") == Skew("uniform")
    assert parse_skew("zipf:1.1") == Skew("zipf", 1.1)
    assert parse_skew(" ZIPF:2 ").spec() == "zipf:2"


@pytest.mark.parametrize(
    "text", ["", "zipf", "zipf:", "zipf:x", "zipf:0", "zipf:-1", "zipf:nan", "zipf:inf", "pareto:1"]
)
def test_bad_skew_specs_are_refused(text: str) -> None:
    with pytest.raises(InvalidWorkload, match="skew"):
        parse_skew(text)


def test_bad_workload_shapes_are_refused() -> None:
    with pytest.raises(InvalidWorkload, match="at least 2 accounts"):
        WorkloadSpec((1,), parse_mix("transfer=1"), Skew("uniform"), 0, 10)
    with pytest.raises(InvalidWorkload, match="at least one account"):
        WorkloadSpec((), parse_mix("deposit=1"), Skew("uniform"), 0, 10)
    WorkloadSpec((1,), parse_mix("deposit=1,transfer=0"), Skew("uniform"), 0, 10)


@given(st.integers(0, 10**6), st.integers(1, 300))
def test_split_ops_shares_everything_evenly(ops: int, tellers: int) -> None:
    shares = split_ops(ops, tellers)
    assert len(shares) == tellers
    assert sum(shares) == ops
    assert max(shares) - min(shares) <= 1
