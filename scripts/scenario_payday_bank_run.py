#!/usr/bin/env python3
"""Payday, then a bank run: mass deposits, then mass withdrawals until the money runs out.

Payday: every account receives its salary, deposited by many tellers at once.
Bank run: every teller then tries to withdraw from every account, many times,
asking for far more than was paid in, so withdrawals must be refused once an
account's funds run out. Finally every account is swept to exactly zero and
one more cent is refused.

Expectations: after payday each account holds exactly its salary; during the
run nothing but insufficient funds is refused, and refusals happen; no account
pays out more than it received, and each one's balance is its salary minus its
committed withdrawals; every refusal was justified (an account's final balance
is below the smallest amount it refused: balances only fall during a run);
after the sweep every balance, @cash included, is zero; the audit is clean.
"""

from __future__ import annotations

import random
import sys
from collections import Counter, defaultdict

from bank import Deposit, InsufficientFunds, Receipt, Withdrawal
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
    parser.add_argument("--accounts", type=int, default=100, help="accounts paid and then run on")
    parser.add_argument("--salary", type=int, default=2_500_00, help="salary per account (cents)")
    parser.add_argument("--tellers", type=int, default=8, help="teller threads")
    parser.add_argument("--window", type=int, default=8, help="operations in flight per teller")
    parser.add_argument(
        "--attempts",
        type=int,
        default=3,
        help="withdrawal attempts per teller per account during the run",
    )
    args = parser.parse_args(argv)
    checks = Checks("payday-bank-run", quiet=args.quiet, exit_on_hang=__name__ == "__main__")

    with scenario_ledger(args.db) as path, open_bank(path, args) as bank:
        accounts = [bank.open_account(f"worker-{i:05d}").id for i in range(args.accounts)]

        # -- payday ---------------------------------------------------------------------
        def payday(index: int) -> None:
            mine = accounts[index :: args.tellers]
            futures = submit_windowed(
                bank, (Deposit(account=a, amount=args.salary) for a in mine), args.window
            )
            for future in futures:
                future.result()

        elapsed = run_tellers(args.tellers, payday, watchdog_s=args.watchdog, checks=checks)
        checks.figure("payday deposits", rate(len(accounts), elapsed))
        paid_in = bank.snapshot()
        checks.expect(
            all(paid_in.balances[a] == args.salary for a in accounts),
            f"after payday every account holds exactly its salary ({money(args.salary)})",
        )

        # -- the run ----------------------------------------------------------------------
        results: list[list[tuple[Withdrawal, Receipt | BaseException]]] = [
            [] for _ in range(args.tellers)
        ]
        low, high = max(1, args.salary // 10), max(1, args.salary // 4)

        def run_on_the_bank(index: int) -> None:
            rng = random.Random(f"bank-run:{args.seed}:{index}")
            order = [a for a in accounts for _ in range(args.attempts)]
            rng.shuffle(order)
            asks = [Withdrawal(account=a, amount=rng.randint(low, high)) for a in order]
            futures = submit_windowed(bank, asks, args.window)
            results[index] = [(w, outcome(f)) for w, f in zip(asks, futures, strict=True)]

        elapsed = run_tellers(
            args.tellers, run_on_the_bank, watchdog_s=args.watchdog, checks=checks
        )
        answered = [pair for per_teller in results for pair in per_teller]
        withdrawn: Counter[int] = Counter()
        smallest_refused: dict[int, int] = defaultdict(lambda: args.salary + 1)
        refused: Counter[str] = Counter()
        for ask, result in answered:
            if isinstance(result, Receipt):
                withdrawn[ask.account] += ask.amount
            else:
                refused[type(result).__name__] += 1
                smallest_refused[ask.account] = min(smallest_refused[ask.account], ask.amount)
        checks.figure("bank run withdrawals", rate(len(answered), elapsed))
        checks.figure(
            "committed / refused", f"{len(answered) - refused.total():,} / {refused.total():,}"
        )
        checks.figure(
            "paid out / paid in",
            f"{money(withdrawn.total())} / {money(args.salary * len(accounts))}",
        )
        checks.expect(
            set(refused) <= {"InsufficientFunds"},
            f"withdrawals are refused only for insufficient funds ({dict(refused)})",
        )
        checks.expect(
            refused["InsufficientFunds"] > 0, "withdrawals are refused once funds run out"
        )
        checks.expect(
            all(withdrawn[a] <= args.salary for a in accounts),
            "no account paid out more than it received",
        )
        after = bank.snapshot()
        checks.expect(
            all(after.balances[a] == args.salary - withdrawn[a] for a in accounts),
            "each balance is the salary minus the committed withdrawals",
        )
        unjustified = [a for a in accounts if after.balances[a] >= smallest_refused[a]]
        checks.expect(
            not unjustified,
            "every refusal was justified: no account still holds an amount it refused"
            + (f" ({len(unjustified)} do)" if unjustified else ""),
        )

        # -- sweep to zero --------------------------------------------------------------------
        left = bank.snapshot().balances
        sweep = [Withdrawal(account=a, amount=left[a]) for a in accounts if left[a] > 0]
        for future in submit_windowed(bank, sweep, 64):
            future.result()
        checks.expect(
            all(bank.balance(a) == 0 for a in accounts), "the sweep leaves every account at zero"
        )
        try:
            bank.withdraw(accounts[0], 1)
            checks.expect(False, "one more cent from an empty account is refused")
        except InsufficientFunds:
            checks.expect(True, "one more cent from an empty account is refused")
        checks.expect(
            bank.balance(0) == 0, "@cash is back to zero: every cent paid in was paid out once"
        )
        checks.conserved(bank)
        return checks.finish(bank)


if __name__ == "__main__":
    sys.exit(main())
