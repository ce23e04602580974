"""The head of a ledger: where both hash chains end, as one value to record and pin.

    <seq>:<transfers hash>/<event seq>:<account_events hash>
    e.g. 1200:5f3c…(64 hex)/45:9ab1…(64 hex)

`seq` is the last transfer's seq and its hash, `event seq` the last account
event's seq and its hash (0 and 64 zeros for an empty chain). Each hash covers
its whole chain, so pinning this value pins every transfer and every account
event: a row deleted from, appended to or re-hashed at the end of either chain
changes it. `bank audit` prints it; `--expect-head` takes it back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from bank.errors import InvalidExpectedHead

#: How a head is written, for messages.
HEAD_FORMAT: Final = "SEQ:HASH/EVENT_SEQ:EVENT_HASH"
_SEQ_MAX: Final = 2**63 - 1
_HEAD: Final = re.compile(
    r"(0|[1-9][0-9]{0,18}):([0-9a-f]{64})/(0|[1-9][0-9]{0,18}):([0-9a-f]{64})"
)
_BARE_HASH: Final = re.compile(r"[0-9a-fA-F]{64}")
_SHOWN_CHARS_MAX: Final = 40


@dataclass(frozen=True, slots=True)
class Head:
    """The end of both chains: the last transfer (`seq`, `hash`) and event (`event_seq`, `event_hash`)."""

    seq: int
    hash: str
    event_seq: int
    event_hash: str

    def __str__(self) -> str:
        return f"{self.seq}:{self.hash}/{self.event_seq}:{self.event_hash}"


def parse_head(text: str) -> Head:
    """The `Head` written as `text` (surrounding whitespace ignored).

    Raises `InvalidExpectedHead` for anything else. A bare 64-hex transfers hash
    (what `--expect-head` took before both chains were pinned) is refused rather
    than accepted: it leaves account events unpinned, and an auditor who thinks
    the ledger is pinned would miss a forged or rewritten last event.
    """
    if not isinstance(text, str):
        raise InvalidExpectedHead(
            f"expect_head must be a text of the form {HEAD_FORMAT}, not {type(text).__name__}"
        )
    value = text.strip()
    match = _HEAD.fullmatch(value)
    if match is None:
        if _BARE_HASH.fullmatch(value):
            raise InvalidExpectedHead(
                "expect_head is a bare transfers hash, which pins only the transfers chain: "
                f"pass the head that `bank audit` prints ({HEAD_FORMAT}) to pin both chains"
            )
        shown = value if len(value) <= _SHOWN_CHARS_MAX else value[: _SHOWN_CHARS_MAX - 1] + "…"
        raise InvalidExpectedHead(
            f"expect_head {shown!r} is not a head: expected {HEAD_FORMAT} "
            "(decimal seqs, 64 lowercase hex digits), as `bank audit` prints it"
        )
    seq, hash_, event_seq, event_hash = match.groups()
    if int(seq) > _SEQ_MAX or int(event_seq) > _SEQ_MAX:
        raise InvalidExpectedHead("expect_head has a seq beyond signed 64 bits")
    return Head(int(seq), hash_, int(event_seq), event_hash)
