#!/usr/bin/env python3
"""Card authorisations at a hot merchant: holds from many customers to one merchant.

Card tellers authorise payments (a hold of the customer's money for the merchant)
and then settle each one as a card network would: capture all of it (a post),
capture part of it (a partial post, the rest released), cancel it (a void), or
never come back (a hold with a short `expires_s`, which the engine expires).
Meanwhile other tellers make the same customers withdraw cash, which may only
use what the holds left `available`. A sampler reads every customer's
`available` throughout, under contention (switch interval 1e-6 s).

Expectations: every hold and withdrawal is refused only for insufficient funds;
every post and void of a live hold commits; no sampled `available` is below zero;
every hold is settled exactly once (post, void or expire) and the expired ones
are exactly the abandoned ones; a post or void after the expiry, or a second
settlement, is refused with HoldNotPending; held amounts are back to zero; the
merchant holds exactly the posted amounts and each customer its opening balance
minus its posts and withdrawals; money is conserved; the audit is clean.
"""

from __future__ import annotations

import random
import sys
import threading
import time
from collections import Counter
from typing import NamedTuple

from bank import BankError, Deposit, HoldNotPending, Receipt
from bank.simulate.scenario import (
    Checks,
    money,
    open_bank,
    rate,
    run_tellers,
    scenario_ledger,
    scenario_parser,
)

#: A settled hold's expiry: long enough never to fire during the run.
LONG_EXPIRY_S = 600.0
#: How many expired holds (and settled ones) are tried again, expecting HoldNotPending.
RETRIES_MAX = 20


class Authorisation(NamedTuple):
    """One card payment: its hold's answer, what the teller did next, and that answer."""

    customer: int
    fate: str
    hold: Receipt | BaseException
    settled: Receipt | BaseException | None = None


def main(argv: list[str] | None = None) -> int:
    """Run the scenario; 0 if every expectation held and the audit is clean."""
    parser = scenario_parser(__doc__ or "")
    parser.add_argument("--customers", type=int, default=100, help="card holders")
    parser.add_argument("--auths", type=int, default=10, help="authorisations per card teller")
    parser.add_argument("--tellers", type=int, default=12, help="card teller threads")
    parser.add_argument("--withdrawers", type=int, default=4, help="cash withdrawal threads")
    parser.add_argument("--withdrawals", type=int, default=20, help="withdrawals per withdrawer")
    parser.add_argument(
        "--expiry", type=float, default=0.3, help="expires_s of the abandoned holds (seconds)"
    )
    parser.add_argument(
        "--balance", type=int, default=100_00, help="each customer's opening balance (cents)"
    )
    parser.add_argument("--price-max", type=int, default=40_00, help="largest payment (cents)")
    args = parser.parse_args(argv)
    checks = Checks("card-auth", quiet=args.quiet, exit_on_hang=__name__ == "__main__")
    previous_interval = sys.getswitchinterval()

    with scenario_ledger(args.db) as path, open_bank(path, args) as bank:
        merchant = bank.open_account("merchant").id
        customers = [bank.open_account(f"card-{i:05d}").id for i in range(args.customers)]
        for future in bank.submit_many(Deposit(account=c, amount=args.balance) for c in customers):
            future.result()
        # One slot per thread, written only by that thread; read after the join.
        auths: list[list[Authorisation]] = [[] for _ in range(args.tellers)]
        cash: list[list[tuple[int, Receipt | BaseException]]] = [
            [] for _ in range(args.withdrawers)
        ]
        lowest: list[int] = []  # the sampler's lowest available per sweep
        workers_left = [args.tellers + args.withdrawers]
        left_lock = threading.Lock()
        done = threading.Event()
        if workers_left[0] == 0:
            done.set()

        def finished() -> None:
            with left_lock:
                workers_left[0] -= 1
                if workers_left[0] == 0:
                    done.set()

        def card_teller(index: int) -> None:
            rng = random.Random(f"card-auth:{args.seed}:{index}")
            for _ in range(args.auths):
                customer = customers[rng.randrange(len(customers))]
                amount = rng.randint(1, args.price_max)
                fate = rng.choice(("post", "partial", "void", "expire"))
                expiry = args.expiry if fate == "expire" else LONG_EXPIRY_S
                try:
                    hold = bank.hold(customer, merchant, amount, expires_s=expiry)
                except BankError as exc:
                    auths[index].append(Authorisation(customer, fate, exc))
                    continue
                settled: Receipt | BaseException | None = None
                try:
                    if fate == "post":
                        settled = bank.post(hold.seq)
                    elif fate == "partial":
                        settled = bank.post(hold.seq, max(1, amount // 2))
                    elif fate == "void":
                        settled = bank.void(hold.seq)
                except BankError as exc:
                    settled = exc
                auths[index].append(Authorisation(customer, fate, hold, settled))

        def withdrawer(index: int) -> None:
            rng = random.Random(f"card-auth-cash:{args.seed}:{index}")
            for _ in range(args.withdrawals):
                customer = customers[rng.randrange(len(customers))]
                try:
                    answer: Receipt | BaseException = bank.withdraw(
                        customer, rng.randint(1, args.balance // 2)
                    )
                except BankError as exc:
                    answer = exc
                cash[index].append((customer, answer))

        def sampler() -> None:
            while not done.is_set():
                lowest.append(min(bank.account(c).available for c in customers))

        def work(index: int) -> None:
            if index == 0:
                sampler()
                return
            try:
                if index <= args.tellers:
                    card_teller(index - 1)
                else:
                    withdrawer(index - 1 - args.tellers)
            finally:
                finished()

        sys.setswitchinterval(1e-6)
        try:
            elapsed = run_tellers(
                1 + args.tellers + args.withdrawers,
                work,
                watchdog_s=args.watchdog,
                checks=checks,
            )
        finally:
            sys.setswitchinterval(previous_interval)
        answered = [a for per_teller in auths for a in per_teller]
        holds = [a for a in answered if isinstance(a.hold, Receipt)]
        withdrawals = [pair for per_thread in cash for pair in per_thread]
        refused = Counter(
            type(a.hold).__name__ for a in answered if not isinstance(a.hold, Receipt)
        )
        refused.update(type(r).__name__ for _, r in withdrawals if not isinstance(r, Receipt))
        checks.figure("operations", rate(len(answered) + len(withdrawals), elapsed))
        checks.figure("holds / refused", f"{len(holds):,} / {len(answered) - len(holds):,}")
        checks.figure("available samples", f"{len(lowest):,} sweeps of {len(customers):,}")
        checks.expect(
            len(answered) == args.tellers * args.auths
            and len(withdrawals) == args.withdrawers * args.withdrawals,
            "every authorisation and withdrawal was answered",
        )
        checks.expect(
            set(refused) <= {"InsufficientFunds"},
            f"holds and withdrawals are refused only for insufficient funds ({dict(refused)})",
        )
        unsettled = [a for a in holds if a.fate != "expire" and not isinstance(a.settled, Receipt)]
        checks.expect(
            not unsettled, f"every post and void of a live hold commits ({unsettled[:3]})"
        )
        checks.expect(
            bool(lowest) and min(lowest) >= 0,
            f"no sampled available went below zero (lowest {min(lowest, default=0)})",
        )

        # The abandoned holds expire on the engine's clock: wait for them, bounded.
        deadline = time.monotonic() + args.expiry + min(args.watchdog, 30.0)
        while time.monotonic() < deadline and any(bank.account(c).held for c in customers):
            time.sleep(0.02)
        checks.expect(
            all(bank.account(c).held == 0 for c in customers),
            "held amounts are back to zero once every hold is settled or expired",
        )
        rows = list(bank.iter_history(merchant))
        hold_seqs = {r.seq for r in rows if r.kind == "hold"}
        settled_by = Counter(r.hold_seq for r in rows if r.kind in ("post", "void", "expire"))
        expired = {r.hold_seq for r in rows if r.kind == "expire" and r.hold_seq is not None}
        abandoned = {
            a.hold.seq for a in holds if a.fate == "expire" and isinstance(a.hold, Receipt)
        }
        checks.expect(
            hold_seqs == {a.hold.seq for a in holds if isinstance(a.hold, Receipt)},
            f"the merchant's ledger has exactly the {len(holds):,} committed holds",
        )
        checks.expect(
            set(settled_by) == hold_seqs and set(settled_by.values()) <= {1},
            "every hold is settled exactly once (post, void or expire)",
        )
        checks.expect(
            expired == abandoned, f"exactly the {len(abandoned):,} abandoned holds expired"
        )
        again = sorted(expired)[:RETRIES_MAX] + sorted(hold_seqs - expired)[:RETRIES_MAX]
        refusals: Counter[str] = Counter()
        for i, seq in enumerate(again):
            try:
                bank.post(seq) if i % 2 == 0 else bank.void(seq)
                refusals["committed"] += 1
            except HoldNotPending:
                refusals["HoldNotPending"] += 1
            except BankError as exc:
                refusals[type(exc).__name__] += 1
        checks.expect(
            set(refusals) <= {"HoldNotPending"},
            f"a post or void after expiry or settlement is refused ({dict(refusals)})",
        )

        posted: Counter[int] = Counter()
        for r in rows:
            if r.kind == "post":
                posted[r.debit_account] += r.amount
        withdrawn: Counter[int] = Counter()
        for customer, answer in withdrawals:
            if isinstance(answer, Receipt):
                withdrawn[customer] += answer.amount
        total_posted = sum(posted.values())
        checks.figure("merchant takings", money(total_posted))
        checks.expect(
            bank.balance(merchant) == total_posted,
            f"the merchant holds exactly the posted amounts ({money(total_posted)})",
        )
        snapshot = bank.snapshot()
        wrong = [
            c for c in customers if snapshot.balances[c] != args.balance - posted[c] - withdrawn[c]
        ]
        checks.expect(
            not wrong, "each customer's balance is its opening balance minus posts and withdrawals"
        )
        checks.conserved(bank)
        return checks.finish(bank)


if __name__ == "__main__":
    sys.exit(main())
