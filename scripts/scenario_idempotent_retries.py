#!/usr/bin/env python3
"""A mixed day with idempotent retries: clients that time out resend the same key.

Every operation carries an idempotency key. A client waits only `--timeout-ms`
for its answer; when that runs out it submits the same command with the same
key again (the first attempt is still in flight), up to `--retries` times, then
waits for all its attempts. Some answers are "lost": the client resends a key
that already committed. A few keys are reused with a different amount (a client
bug), and after a restart of the bank a sample of keys is resent once more.

Expectations: every attempt of a key that got a receipt got the same receipt
(the same seq, the same command); each committed key appears exactly once in
the ledger (`find(key)` returns that seq, and the ledger grew by exactly the
number of committed keys); keys that never committed are not in the ledger; a
key reused with another command raises IdempotencyConflict and changes nothing;
after a restart resent keys return their original receipts and add no rows;
money is conserved; the audit is clean.
"""

from __future__ import annotations

import random
import sys
from collections import Counter
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from bank import Deposit, IdempotencyConflict, Receipt, Transfer, Withdrawal
from bank.commands import AnyCommand
from bank.simulate.scenario import (
    Checks,
    open_bank,
    outcome,
    rate,
    run_tellers,
    scenario_ledger,
    scenario_parser,
)

#: How the day is mixed (percent): deposits, withdrawals, the rest transfers.
DEPOSIT_PERCENT = 25
WITHDRAWAL_PERCENT = 25


def _command(rng: random.Random, accounts: list[int], key: str, amount_max: int) -> AnyCommand:
    amount = rng.randint(1, amount_max)
    pick = rng.randrange(100)
    if pick < DEPOSIT_PERCENT:
        return Deposit(account=rng.choice(accounts), amount=amount, key=key)
    if pick < DEPOSIT_PERCENT + WITHDRAWAL_PERCENT:
        return Withdrawal(account=rng.choice(accounts), amount=amount, key=key)
    source, target = rng.sample(accounts, 2)
    return Transfer(source=source, target=target, amount=amount, key=key)


def main(argv: list[str] | None = None) -> int:
    """Run the scenario; 0 if every expectation held and the audit is clean."""
    parser = scenario_parser(__doc__ or "")
    parser.add_argument("--ops", type=int, default=1_000, help="keyed operations in all")
    parser.add_argument("--tellers", type=int, default=8, help="client threads")
    parser.add_argument("--accounts", type=int, default=20, help="customer accounts")
    parser.add_argument("--balance", type=int, default=200_00, help="opening balance (cents)")
    parser.add_argument("--amount-max", type=int, default=150_00, help="largest amount (cents)")
    parser.add_argument(
        "--timeout-ms", type=float, default=1.0, help="client timeout before a retry"
    )
    parser.add_argument("--retries", type=int, default=3, help="retries per operation at most")
    parser.add_argument(
        "--lost-percent", type=int, default=10, help="share of answers lost (key resent)"
    )
    parser.add_argument("--conflicts", type=int, default=5, help="keys reused with another amount")
    parser.add_argument("--resend-after-restart", type=int, default=50, help="keys resent")
    args = parser.parse_args(argv)
    checks = Checks("idempotent-retries", quiet=args.quiet, exit_on_hang=__name__ == "__main__")
    if args.accounts < 2:
        parser.error("--accounts: transfers need at least 2 accounts")

    with scenario_ledger(args.db) as path:
        with open_bank(path, args) as bank:
            accounts = [bank.open_account(f"client-{i:04d}").id for i in range(args.accounts)]
            for future in bank.submit_many(
                Deposit(account=a, amount=args.balance) for a in accounts
            ):
                future.result()
            seq_before = bank.snapshot().seq
            quotas = [
                args.ops // args.tellers + (i < args.ops % args.tellers)
                for i in range(args.tellers)
            ]
            # Per teller: key -> (command, every attempt's answer); written by that teller only.
            answers: list[dict[str, tuple[AnyCommand, list[Receipt | BaseException]]]] = [
                {} for _ in range(args.tellers)
            ]
            attempts = [Counter[str]() for _ in range(args.tellers)]

            def client(index: int) -> None:
                rng = random.Random(f"retries:{args.seed}:{index}")
                for i in range(quotas[index]):
                    key = f"t{index}-op{i}"
                    command = _command(rng, accounts, key, args.amount_max)
                    futures: list[Future[Receipt]] = [bank.submit(command)]
                    for _ in range(args.retries):
                        try:
                            futures[-1].exception(timeout=args.timeout_ms / 1000)
                            break
                        except FutureTimeout:  # no answer in time: resend, same key
                            attempts[index]["timeout retry"] += 1
                            futures.append(bank.submit(command))
                    results = [outcome(f) for f in futures]  # waits for every attempt
                    if any(isinstance(r, Receipt) for r in results) and (
                        rng.randrange(100) < args.lost_percent
                    ):
                        attempts[index]["lost-answer resend"] += 1
                        results.append(outcome(bank.submit(command)))
                    answers[index][key] = (command, results)

            elapsed = run_tellers(args.tellers, client, watchdog_s=args.watchdog, checks=checks)
            day = {k: v for per_teller in answers for k, v in per_teller.items()}
            resent = sum(attempts, Counter[str]())
            committed: dict[str, Receipt] = {}
            split: list[str] = []
            refused: Counter[str] = Counter()
            for key, (command, results) in day.items():
                receipts = {r for r in results if isinstance(r, Receipt)}
                for r in results:
                    if not isinstance(r, Receipt):
                        refused[type(r).__name__] += 1
                if len(receipts) > 1 or any(r.signature() != command.signature() for r in receipts):
                    split.append(key)
                if receipts:
                    committed[key] = next(iter(receipts))
            checks.figure("keyed operations", rate(len(day), elapsed))
            checks.figure("resent", f"{dict(resent)}")
            checks.figure("committed keys / refusals", f"{len(committed):,} / {dict(refused)}")
            checks.expect(len(day) == args.ops, f"all {args.ops:,} keyed operations were answered")
            checks.expect(resent.total() > 0, "keys were resent (timeouts and lost answers)")
            checks.expect(
                not split,
                "every attempt of a key got the same receipt for the same command"
                + (f" ({len(split)} keys did not, e.g. {split[:3]})" if split else ""),
            )
            checks.expect(
                set(refused) <= {"InsufficientFunds"},
                f"attempts are refused only for insufficient funds ({dict(refused)})",
            )
            misfiled = [k for k in day if bank.find(k) != committed.get(k)]
            checks.expect(
                not misfiled,
                "find(key) returns the committed receipt, or None for keys never committed"
                + (f" ({len(misfiled)} keys do not)" if misfiled else ""),
            )
            grown = bank.snapshot().seq - seq_before
            checks.expect(
                grown == len(committed),
                f"each committed key is in the ledger exactly once ({grown:,} new rows for "
                f"{len(committed):,} committed keys)",
            )

            # A client bug: the same key with a different amount.
            seq_now = bank.snapshot().seq
            conflicts = 0
            for key in sorted(committed)[: args.conflicts]:
                command, _ = day[key]
                changed = type(command)(**{**command.model_dump(), "amount": command.amount + 1})
                try:
                    bank.submit(changed).result()
                except IdempotencyConflict:
                    conflicts += 1
            tried = min(args.conflicts, len(committed))
            checks.expect(
                conflicts == tried and bank.snapshot().seq == seq_now,
                f"a key reused with another amount raises IdempotencyConflict ({conflicts}/"
                f"{tried}) and adds no row",
            )
            checks.conserved(bank)
            seq_closed = bank.snapshot().seq

        # Restart: the keys survive in the ledger, not in memory.
        with open_bank(path, args) as bank:
            sample = sorted(committed)[: args.resend_after_restart]
            again = [bank.submit(day[k][0]) for k in sample]
            same = sum(1 for k, f in zip(sample, again, strict=True) if outcome(f) == committed[k])
            checks.expect(
                same == len(sample) and bank.snapshot().seq == seq_closed,
                f"after a restart {same}/{len(sample)} resent keys return their original "
                "receipt and add no row",
            )
            checks.conserved(bank)
            return checks.finish(bank)


if __name__ == "__main__":
    sys.exit(main())
