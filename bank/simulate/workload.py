"""Seeded, reproducible command streams: one independent stream per simulated teller.

Each teller draws from its own `random.Random`, seeded from `(seed, teller index)`,
and only that teller consumes its stream, so the sequence of commands a teller
submits is the same on every run with the same seed, whatever the thread
interleaving. The amounts never depend on live balances for the same reason:
the share of refused debits comes from the amount distribution, not from peeking
at the bank.

Amounts are `int` minor units drawn with `randint`; floats are only used to pick
accounts (the Zipf CDF), never for money.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import accumulate
from typing import Literal

from bank.commands import AnyCommand, BankCommand, Deposit, Hold, Post, Transfer, Void, Withdrawal
from bank.limits import AMOUNT_MAX

#: What a `--mix` weighs: the plain commands, holds (with their follow-up) and linked
#: payments (a payment and its fee as one atomic group).
MixKind = Literal["deposit", "withdrawal", "transfer", "hold", "linked"]
#: The names accepted in a `--mix` spec, and the kind each one means.
MIX_NAMES: dict[str, MixKind] = {
    "transfer": "transfer",
    "deposit": "deposit",
    "withdraw": "withdrawal",
    "withdrawal": "withdrawal",
    "hold": "hold",
    "linked": "linked",
}
#: What follows a hold, by the same teller once the hold is answered, with the
#: weights of each fate: a post of all of it, of part of it, a void, or nothing
#: (so that the engine expires it).
HoldFate = Literal["post", "partial", "void", "expire"]
HOLD_FATES: tuple[tuple[HoldFate, int], ...] = (
    ("post", 40),
    ("partial", 30),
    ("void", 15),
    ("expire", 15),
)
#: A linked payment's fee, in per mille of the payment (at least 1 minor unit).
FEE_PER_MILLE = 10
MIX_DEFAULT = "transfer=80,deposit=10,withdraw=10"
SKEW_DEFAULT = "uniform"
#: Bounds on the Zipf exponent: above ~10 every draw is the hottest account anyway.
ZIPF_S_MAX = 10.0
#: Share of draws that are "big tickets" (half to twice the initial balance): these
#: are what a funded account mostly refuses, so this sets the reject share.
BIG_TICKET_PERCENT = 15
#: Everyday amounts are drawn from 1 .. initial_balance // EVERYDAY_DIVISOR.
EVERYDAY_DIVISOR = 10
#: How often a transfer target is redrawn before falling back to the next account.
TARGET_REDRAWS_MAX = 16


class InvalidWorkload(ValueError):
    """A `--mix`, `--skew` or workload size is malformed (the message says which rule)."""


@dataclass(frozen=True, slots=True)
class Mix:
    """Relative weights of deposits, withdrawals, transfers, holds and linked payments
    (integers, sum > 0)."""

    deposit: int
    withdrawal: int
    transfer: int
    hold: int = 0
    linked: int = 0

    @property
    def weights(self) -> tuple[tuple[MixKind, int], ...]:
        """(kind, weight) in a fixed order, zero weights included."""
        return (
            ("deposit", self.deposit),
            ("withdrawal", self.withdrawal),
            ("transfer", self.transfer),
            ("hold", self.hold),
            ("linked", self.linked),
        )

    @property
    def two_phase(self) -> bool:
        """Whether the mix has holds or linked payments (operations beyond one command)."""
        return self.hold > 0 or self.linked > 0

    @property
    def needs_two_accounts(self) -> bool:
        """Transfers, holds and linked payments all move money between two accounts."""
        return self.transfer > 0 or self.two_phase

    def spec(self) -> str:
        """The canonical `--mix` text of this mix (parse_mix(m.spec()) == m)."""
        text = f"transfer={self.transfer},deposit={self.deposit},withdraw={self.withdrawal}"
        if self.hold:
            text += f",hold={self.hold}"
        if self.linked:
            text += f",linked={self.linked}"
        return text


def parse_mix(text: str) -> Mix:
    """Parse `transfer=80,deposit=10,withdraw=10` (any order, missing kinds weigh 0).

    Raises `InvalidWorkload` naming the bad part: an entry without `=`, an unknown
    kind, a weight that is not a non-negative integer, a kind given twice, or
    weights that are all zero.
    """
    weights: dict[MixKind, int] = {}
    entries = [part.strip() for part in text.split(",")]
    if not text.strip():
        raise InvalidWorkload(f"mix is empty: expected for example {MIX_DEFAULT!r}")
    for entry in entries:
        name, sep, value = entry.partition("=")
        name, value = name.strip().lower(), value.strip()
        if not sep or not name:
            raise InvalidWorkload(f"mix entry {entry!r} is not NAME=WEIGHT (e.g. transfer=80)")
        kind = MIX_NAMES.get(name)
        if kind is None:
            known = ", ".join(sorted(MIX_NAMES))
            raise InvalidWorkload(f"mix entry {entry!r}: unknown kind {name!r} (known: {known})")
        if not value.isdigit() or not value.isascii():
            raise InvalidWorkload(
                f"mix entry {entry!r}: weight must be a non-negative integer, got {value!r}"
            )
        if kind in weights:
            raise InvalidWorkload(f"mix entry {entry!r}: {kind} is given more than once")
        weights[kind] = int(value)
    mix = Mix(
        deposit=weights.get("deposit", 0),
        withdrawal=weights.get("withdrawal", 0),
        transfer=weights.get("transfer", 0),
        hold=weights.get("hold", 0),
        linked=weights.get("linked", 0),
    )
    if sum(w for _, w in mix.weights) == 0:
        raise InvalidWorkload(f"mix {text!r}: the weights add up to 0; give one kind a weight")
    return mix


@dataclass(frozen=True, slots=True)
class Skew:
    """How accounts are chosen: uniformly, or Zipf-skewed with exponent `s` (hot accounts)."""

    kind: Literal["uniform", "zipf"]
    s: float = 0.0

    def spec(self) -> str:
        """The canonical `--skew` text of this skew."""
        return "uniform" if self.kind == "uniform" else f"zipf:{self.s:g}"


def parse_skew(text: str) -> Skew:
    """Parse `uniform` or `zipf:S` with 0 < S <= 10 (S=1 is classic Zipf).

    Raises `InvalidWorkload` for anything else.
    """
    spec = text.strip().lower()
    if spec == "uniform":
        return Skew("uniform")
    name, sep, value = spec.partition(":")
    if name != "zipf" or not sep:
        raise InvalidWorkload(f"skew {text!r}: expected 'uniform' or 'zipf:S' (e.g. zipf:1.1)")
    try:
        s = float(value)
    except ValueError:
        raise InvalidWorkload(
            f"skew {text!r}: S in zipf:S must be a number, got {value!r}"
        ) from None
    if not math.isfinite(s) or not 0 < s <= ZIPF_S_MAX:
        raise InvalidWorkload(f"skew {text!r}: S in zipf:S must be in (0, {ZIPF_S_MAX:g}]")
    return Skew("zipf", s)


def teller_seed(seed: int, teller: int) -> str:
    """The seed of one teller's `random.Random`.

    A string, because `random.Random` hashes strings with SHA-512: stable across
    runs, platforms and `PYTHONHASHSEED`, and unrelated for neighbouring tellers.
    """
    return f"bank.simulate:{seed}:{teller}"


def split_ops(ops: int, tellers: int) -> list[int]:
    """Share `ops` among `tellers` as evenly as possible (the first ones get the remainder)."""
    if tellers < 1:
        raise InvalidWorkload(f"tellers must be at least 1, got {tellers}")
    if ops < 0:
        raise InvalidWorkload(f"ops must not be negative, got {ops}")
    base, extra = divmod(ops, tellers)
    return [base + (1 if i < extra else 0) for i in range(tellers)]


@dataclass(frozen=True, slots=True)
class HoldPlan:
    """A hold and what its teller does once the hold is answered (drawn with it)."""

    hold: Hold
    fate: HoldFate
    #: The amount of a partial post (None for the other fates).
    post_amount: int | None = None

    def follow_up(self, hold_seq: int) -> Post | Void | None:
        """The command that settles the hold at `hold_seq` (None: let it expire)."""
        if self.fate == "post":
            return Post(hold=hold_seq)
        if self.fate == "partial":
            return Post(hold=hold_seq, amount=self.post_amount)
        if self.fate == "void":
            return Void(hold=hold_seq)
        return None


@dataclass(frozen=True, slots=True)
class LinkedPayment:
    """A payment and its fee, submitted as one atomic group (`Bank.submit_linked`)."""

    payment: Transfer
    fee: Transfer

    @property
    def commands(self) -> list[AnyCommand]:
        """The group's commands, in order."""
        return [self.payment, self.fee]


#: One operation of a teller: a plain command, a planned hold, a linked payment, or
#: (sent by the teller after its hold's answer, never drawn) a post or a void.
Op = BankCommand | HoldPlan | LinkedPayment


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    """Everything that determines the commands: accounts, mix, skew, amounts and seed."""

    accounts: tuple[int, ...]
    mix: Mix
    skew: Skew
    seed: int
    initial_balance: int
    #: The holds' `expires_s` (None: holds never expire; an "expire" fate then stays open).
    hold_expiry_s: float | None = None

    def __post_init__(self) -> None:
        if not self.accounts:
            raise InvalidWorkload("the workload needs at least one account")
        if self.mix.needs_two_accounts and len(self.accounts) < 2:
            raise InvalidWorkload(
                "transfers, holds and linked payments need at least 2 accounts "
                "(or give them weight 0)"
            )
        if type(self.initial_balance) is not int or self.initial_balance < 0:
            raise InvalidWorkload(
                f"initial balance must be a non-negative int, got {self.initial_balance!r}"
            )

    def stream(self, teller: int) -> TellerStream:
        """The command stream of teller number `teller` (0-based)."""
        return TellerStream(self, teller)


class TellerStream:
    """An endless, reproducible sequence of commands for one teller.

    Not thread-safe on purpose: exactly one teller consumes it. Every draw is one
    `random()` scaled to its range (`_below`): `randrange` and `randint` are Python
    functions around it, and five of them per operation cost the simulator 3 us of
    its teller's time for each operation the engine applies in about 15.
    """

    def __init__(self, spec: WorkloadSpec, teller: int) -> None:
        self.spec = spec
        self.teller = teller
        self._rng = random.Random(teller_seed(spec.seed, teller))
        self._random = self._rng.random
        kinds = [kind for kind, weight in spec.mix.weights if weight > 0]
        self._kinds: list[MixKind] = kinds
        self._fate_cdf = list(accumulate(w for _, w in HOLD_FATES))
        self._kind_cdf = list(accumulate(w for _, w in spec.mix.weights if w > 0))
        n = len(spec.accounts)
        self._account_cdf: list[float] | None = None
        if spec.skew.kind == "zipf":
            # Rank k (1-based) weighs 1/k**s; the first account in `accounts` is hottest.
            self._account_cdf = list(accumulate(1.0 / (k**spec.skew.s) for k in range(1, n + 1)))
        # Everyday amounts are small against the opening balance; big tickets are not.
        unit = max(spec.initial_balance, 100)
        self._everyday_max = max(1, unit // EVERYDAY_DIVISOR)
        self._big_min = max(1, unit // 2)
        self._big_max = min(AMOUNT_MAX, 2 * unit)

    def __iter__(self) -> Iterator[Op]:
        while True:
            yield self.next()

    def _below(self, n: int) -> int:
        """A uniform int in 0..n-1 (n >= 1). `random()` is below 1 - 2**-53, so for n below
        2**53 the product rounds below n; the bias is at most n / 2**53."""
        return int(self._random() * n)

    def _account(self) -> int:
        accounts = self.spec.accounts
        if self._account_cdf is None:
            return accounts[int(self._random() * len(accounts))]
        x = self._random() * self._account_cdf[-1]
        i = bisect.bisect_right(self._account_cdf, x)
        return accounts[min(i, len(accounts) - 1)]

    def _amount(self) -> int:
        draw = self._random
        if draw() * 100 < BIG_TICKET_PERCENT:
            low = self._big_min
            return low + int(draw() * (self._big_max - low + 1))
        return 1 + int(draw() * self._everyday_max)

    def next(self) -> Op:
        """The next operation of this teller."""
        kinds = self._kind_cdf
        kind = self._kinds[bisect.bisect_right(kinds, int(self._random() * kinds[-1]))]
        if kind == "deposit":
            return Deposit(account=self._account(), amount=self._amount())
        if kind == "withdrawal":
            return Withdrawal(account=self._account(), amount=self._amount())
        source, target = self._pair()
        amount = self._amount()
        if kind == "hold":
            fate = HOLD_FATES[bisect.bisect_right(self._fate_cdf, self._below(100))][0]
            hold = Hold(
                source=source, target=target, amount=amount, expires_s=self.spec.hold_expiry_s
            )
            partial = 1 + self._below(amount) if fate == "partial" else None
            return HoldPlan(hold, fate, partial)
        if kind == "linked":
            accounts = self.spec.accounts
            # The fee goes to the first simulation account (the bank's own), or its
            # neighbour when that one pays.
            house = accounts[0] if source != accounts[0] else accounts[1]
            fee = max(1, amount * FEE_PER_MILLE // 1000)
            return LinkedPayment(
                Transfer(source=source, target=target, amount=amount),
                Transfer(source=source, target=house, amount=fee),
            )
        return Transfer(source=source, target=target, amount=amount)

    def _pair(self) -> tuple[int, int]:
        """A source and a different target account."""
        source = self._account()
        target = self._account()
        for _ in range(TARGET_REDRAWS_MAX):
            if target != source:
                break
            target = self._account()
        if target == source:
            # A very hot account keeps drawing itself: take its neighbour, still reproducible.
            accounts = self.spec.accounts
            target = accounts[(accounts.index(source) + 1) % len(accounts)]
        return source, target

    def take(self, n: int) -> list[Op]:
        """The next `n` operations."""
        return [self.next() for _ in range(n)]

    def take_commands(self, n: int) -> list[AnyCommand]:
        """The next `n` operations of a mix without holds or linked payments."""
        if self.spec.mix.two_phase:
            raise InvalidWorkload("this mix has holds or linked payments: use take()")
        return [op for op in self.take(n) if isinstance(op, (Deposit, Withdrawal, Transfer))]
