#!/usr/bin/env python3
"""Hot merchant: every customer pays the same merchant account, from many tellers at once.

Each payment is a transfer into one account, so every one of them takes that
account's lock: the worst case of contention on a single account. Customers
spend more than they have on purpose, so some payments are refused.

Expectations: every payment is answered (committed or refused for insufficient
funds, nothing else); refusals happen; the merchant's balance is exactly the
sum of the committed payments and its history holds exactly those; no
customer goes below zero and each one's balance is its opening balance minus
what it paid; money is conserved; the audit is clean.
"""

from __future__ import annotations

import random
import sys
from collections import Counter

from bank import Deposit, Receipt, Transfer
from bank.simulate.scenario import (
    Checks,
    money,
    open_bank,
    outcome,
    rate,
    run_tellers,
    scenario_ledger,
    scenario_parser,
    submit_windowed,
)


def main(argv: list[str] | None = None) -> int:
    """Run the scenario; 0 if every expectation held and the audit is clean."""
    parser = scenario_parser(__doc__ or "")
    parser.add_argument("--customers", type=int, default=200, help="paying customers")
    parser.add_argument("--payments", type=int, default=20, help="payments per customer")
    parser.add_argument("--tellers", type=int, default=8, help="teller threads")
    parser.add_argument("--window", type=int, default=16, help="payments in flight per teller")
    parser.add_argument(
        "--balance", type=int, default=100_00, help="each customer's opening balance (cents)"
    )
    parser.add_argument("--price-max", type=int, default=15_00, help="largest payment (cents)")
    args = parser.parse_args(argv)
    checks = Checks("hot-merchant", quiet=args.quiet, exit_on_hang=__name__ == "__main__")

    with scenario_ledger(args.db) as path, open_bank(path, args) as bank:
        merchant = bank.open_account("merchant").id
        customers = [bank.open_account(f"customer-{i:05d}").id for i in range(args.customers)]
        for future in bank.submit_many(Deposit(account=c, amount=args.balance) for c in customers):
            future.result()
        # One slot per teller, written only by that teller; read after the join.
        results: list[list[tuple[Transfer, Receipt | BaseException]]] = [
            [] for _ in range(args.tellers)
        ]

        def teller(index: int) -> None:
            rng = random.Random(f"hot-merchant:{args.seed}:{index}")
            mine = customers[index :: args.tellers]
            payments = [
                Transfer(source=c, target=merchant, amount=rng.randint(1, args.price_max))
                for _ in range(args.payments)
                for c in mine
            ]
            futures = submit_windowed(bank, payments, args.window)
            results[index] = [(p, outcome(f)) for p, f in zip(payments, futures, strict=True)]

        elapsed = run_tellers(args.tellers, teller, watchdog_s=args.watchdog, checks=checks)
        answered = [pair for per_teller in results for pair in per_teller]
        committed = [(p, r) for p, r in answered if isinstance(r, Receipt)]
        refused = Counter(type(r).__name__ for _, r in answered if not isinstance(r, Receipt))
        paid: Counter[int] = Counter()
        for payment, _ in committed:
            paid[payment.source] += payment.amount
        total_paid = sum(paid.values())

        checks.figure("payments", rate(len(answered), elapsed))
        checks.figure("committed / refused", f"{len(committed):,} / {sum(refused.values()):,}")
        checks.figure("merchant takings", money(total_paid))
        expected = args.customers * args.payments
        checks.expect(len(answered) == expected, f"all {expected:,} payments were answered")
        checks.expect(
            set(refused) <= {"InsufficientFunds"},
            f"payments are refused only for insufficient funds ({dict(refused)})",
        )
        checks.expect(refused["InsufficientFunds"] > 0, "customers who overspend are refused")
        checks.expect(
            bank.balance(merchant) == total_paid,
            f"the merchant holds exactly the committed payments ({money(total_paid)})",
        )
        history = list(bank.iter_history(merchant))
        checks.expect(
            sorted(r.seq for r in history) == sorted(r.seq for _, r in committed),
            f"the merchant's history is exactly the {len(committed):,} committed payments",
        )
        snapshot = bank.snapshot()
        wrong = [c for c in customers if snapshot.balances[c] != args.balance - paid[c]]
        checks.expect(
            not wrong, "each customer's balance is its opening balance minus its payments"
        )
        checks.expect(
            min(snapshot.balances[c] for c in customers) >= 0, "no customer went below zero"
        )
        checks.conserved(bank)
        return checks.finish(bank)


if __name__ == "__main__":
    sys.exit(main())
