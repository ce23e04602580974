"""The ledger writer: the sequencer (staging under the writer's lock) and the pipeline
thread (group commits through a backend's `BatchWriter`), composed.

`bank.ledger.sequencer` fixes seq, timestamps and chain hashes; `bank.ledger.pipeline`
writes, commits and answers; the backend's batch writer (e.g.
`bank.ledger.sqlite.writer`) knows only rows. See those modules for the why.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from bank.answers import Answer
from bank.ledger.backend import BatchWriter, OwnerLock
from bank.ledger.pipeline import KeyReleaser, Pipeline, WriterStats, settle
from bank.ledger.sequencer import GroupRow, Sequencer
from bank.limits import COMMIT_BATCH_OPS_MAX
from bank.records import Receipt

__all__ = ["KeyReleaser", "LedgerWriter", "WriterStats", "settle"]


class LedgerWriter(Pipeline):
    """Single writer of the ledger: stage (on the callers' threads), group commit, answer.

    `open_writer` makes the writer thread's `BatchWriter` (called on that thread, e.g.
    `lambda: backend.batch_writer(engine)`); `owner`, when given, is asked before every
    commit whether this process still owns the ledger.
    """

    # The sequencer's bound methods, set per instance: a worker's call costs no extra frame.
    stage_transfer: Callable[[str, int, int, int, str | None, Answer, int, int], None]
    stage_rejection: Callable[[Answer, BaseException, str | None], None]
    stage_account_event: Callable[[str, int, str, int, Future[Any]], None]
    stage_two_phase: Callable[
        [
            str,
            int,
            int,
            int,
            str | None,
            Answer,
            int,
            int,
            int | None,
            int | None,
            int | None,
            int | None,
        ],
        Receipt | None,
    ]
    stage_group: Callable[[Sequence[GroupRow], Answer], list[Receipt] | int]
    position: Callable[[], tuple[int, int]]

    def __init__(
        self,
        open_writer: Callable[[], BatchWriter],
        claims: KeyReleaser,
        *,
        seq: int,
        head_hash: str,
        event_seq: int,
        event_head_hash: str,
        owner: OwnerLock | None = None,
        commit_ops_max: int = COMMIT_BATCH_OPS_MAX,
        on_exit: Callable[[], None] | None = None,
        now_us: Callable[[], int] | None = None,
        last_ts_us: int = 0,
    ) -> None:
        sequencer = Sequencer(
            seq=seq,
            head_hash=head_hash,
            event_seq=event_seq,
            event_head_hash=event_head_hash,
            now_us=now_us,
            last_ts_us=last_ts_us,
        )
        super().__init__(
            sequencer,
            open_writer,
            claims,
            owner=owner,
            commit_ops_max=commit_ops_max,
            on_exit=on_exit,
        )
        self.sequencer = sequencer
        self.stage_transfer = sequencer.stage_transfer
        self.stage_rejection = sequencer.stage_rejection
        self.stage_account_event = sequencer.stage_account_event
        self.stage_two_phase = sequencer.stage_two_phase
        self.stage_group = sequencer.stage_group
        self.position = sequencer.position
