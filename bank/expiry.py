"""The expiry timer: one thread that writes the `expire` row of every hold whose time ran out.

It sleeps on the hold book's condition until the nearest deadline (by the bank's
clock), a nearer deadline, a controllable clock's advance or `close()`, and never
longer than `HOLD_TIMER_WAIT_S_MAX`: no polling loop, and every wait is bounded.
Each due hold is expired like a worker applies a command (its accounts locked in id
order, the row staged under the writer's lock, whose clock reading decides: a hold
whose deadline that reading has not reached is put back). At open, the first look
expires every hold whose deadline passed while the bank was closed.

The timer is not what makes expiry exact: a post or void is refused once the
timestamp its row would get is at or past the deadline, whether or not the
`expire` row was written yet.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping

from bank.account import Account
from bank.clock import Clock
from bank.groups import expire_due
from bank.holds import HoldBook
from bank.ledger.writer import LedgerWriter
from bank.limits import HOLD_TIMER_WAIT_S_MAX

log = logging.getLogger(__name__)


class ExpiryTimer(threading.Thread):
    """Expires due holds until `stop()`; the bank counts it as one of its workers (the
    writer stops only after it has ended)."""

    def __init__(
        self,
        accounts: Mapping[int, Account],
        holds: HoldBook,
        writer: LedgerWriter,
        clock: Clock,
        on_exit: Callable[[], None] | None = None,
    ) -> None:
        # A daemon for the same reason as the workers (see `bank.worker.Worker`).
        super().__init__(name="bank-hold-timer", daemon=True)
        self.on_exit = on_exit
        self._accounts = accounts
        self._holds = holds
        self._writer = writer
        self._clock = clock
        clock.subscribe(holds.wake)

    def stop(self) -> None:
        """End the thread at its next look."""
        self._holds.close()

    def run(self) -> None:
        try:
            book = self._holds
            while True:
                due = book.wait_due(self._clock.now_us(), HOLD_TIMER_WAIT_S_MAX)
                if due is None:
                    return
                for hold in due:
                    try:
                        if not expire_due(self._accounts, book, self._writer, hold):
                            book.reschedule(hold)
                    except Exception:
                        # A bug: logged, and left for the next open (no post can succeed
                        # after the deadline meanwhile: the sequencer refuses it).
                        log.error("expiring hold %s failed", hold.seq, exc_info=True)
        finally:
            if self.on_exit is not None:
                self.on_exit()
