#!/usr/bin/env python3
"""Ring of transfers: A->B->C->...->A and back, from many tellers at once.

Half the tellers pass money clockwise round a ring of accounts, the other half
anticlockwise, each starting at a different place, some through the blocking
API and some keeping a window of futures in flight. A naive engine that locks
a transfer's source and then its target deadlocks here (A->B holds A and wants
B while B->A holds B and wants A); one that locks in a global order does not.

Expectations: every teller finishes within the watchdog (else every thread's
stack is dumped); each account is funded for the worst interleaving, so
nothing is refused; every account sends and receives the same total, so each
ends with exactly its opening balance; the ledger grew by exactly the number
of transfers; money is conserved; the audit is clean.
"""

from __future__ import annotations

import sys
from collections import Counter

from bank import Deposit, Receipt, Transfer
from bank.simulate.scenario import (
    Checks,
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
    parser.add_argument("--accounts", type=int, default=16, help="accounts in the ring")
    parser.add_argument("--rounds", type=int, default=20, help="times each teller goes round")
    parser.add_argument("--tellers", type=int, default=16, help="teller threads")
    parser.add_argument("--window", type=int, default=8, help="in flight per windowed teller")
    parser.add_argument("--amount", type=int, default=1_00, help="each transfer (cents)")
    args = parser.parse_args(argv)
    checks = Checks("ring", quiet=args.quiet, exit_on_hang=__name__ == "__main__")
    if args.accounts < 2:
        parser.error("--accounts: a ring needs at least 2 accounts")

    with scenario_ledger(args.db) as path, open_bank(path, args) as bank:
        ring = [bank.open_account(f"ring-{i:04d}").id for i in range(args.accounts)]
        # Enough that even if one account sent everything before receiving anything,
        # nothing would be refused: then every balance must come back exactly.
        opening = args.tellers * args.rounds * args.amount
        for future in bank.submit_many(Deposit(account=a, amount=opening) for a in ring):
            future.result()
        seq_before = bank.snapshot().seq
        n = len(ring)
        refused: list[Counter[str]] = [Counter() for _ in range(args.tellers)]

        def teller(index: int) -> None:
            step = 1 if index % 2 == 0 else -1  # clockwise or anticlockwise
            offset = index * n // args.tellers
            transfers = [
                Transfer(
                    source=ring[(offset + k) % n],
                    target=ring[(offset + k + step) % n],
                    amount=args.amount,
                )
                for _ in range(args.rounds)
                for k in range(n)
            ]
            if index % 4 >= 2:  # blocking calls, one at a time
                for t in transfers:
                    try:
                        bank.transfer(t.source, t.target, t.amount)
                    except Exception as exc:
                        refused[index][type(exc).__name__] += 1
            else:
                for future in submit_windowed(bank, transfers, args.window):
                    result = outcome(future)
                    if not isinstance(result, Receipt):
                        refused[index][type(result).__name__] += 1

        elapsed = run_tellers(args.tellers, teller, watchdog_s=args.watchdog, checks=checks)
        total = args.tellers * args.rounds * n
        all_refused = sum(refused, Counter())
        checks.figure("ring transfers", rate(total, elapsed))
        shown = f" (refused: {dict(all_refused)})" if all_refused else ""
        checks.expect(not all_refused, f"no transfer was refused{shown}")
        snapshot = bank.snapshot()
        checks.expect(
            all(snapshot.balances[a] == opening for a in ring),
            "every account ends with exactly its opening balance",
        )
        grown = snapshot.seq - seq_before
        checks.expect(grown == total, f"the ledger grew by exactly {total:,} transfers ({grown:,})")
        checks.conserved(bank)
        return checks.finish(bank)


if __name__ == "__main__":
    sys.exit(main())
