"""The hash chain: the canonical bytes of each ledger row and how rows link.

This is part of the public schema (auditors may re-implement it):

    transfers.hash      = sha256_hex(prev + "\\n" + f"{seq}|{kind}|{debit}|{credit}|{amount}|{ts_us}|{key}")
    account_events.hash = sha256_hex(prev + "\\n" + f"{seq}|{account_id}|{kind}|{overdraft_limit}|{transfer_seq}|{ts_us}|{name}")

`prev` is the previous row's hash in the same table (by seq), or `GENESIS` for
the first row; `key` is "" for NULL (keys are never empty); the free text
(key, name) is last so a "|" inside it cannot shift the other fields. UTF-8.
"""

from __future__ import annotations

from hashlib import sha256
from typing import Final

GENESIS: Final = "0" * 64


def transfer_hash(
    prev: str,
    seq: int,
    kind: str,
    debit: int,
    credit: int,
    amount: int,
    ts_us: int,
    key: str | None,
) -> str:
    """Hash of one `transfers` row chained to `prev`."""
    text = f"{prev}\n{seq}|{kind}|{debit}|{credit}|{amount}|{ts_us}|{key or ''}"
    return sha256(text.encode()).hexdigest()


def account_event_hash(
    prev: str,
    seq: int,
    account_id: int,
    kind: str,
    overdraft_limit: int,
    transfer_seq: int,
    ts_us: int,
    name: str,
) -> str:
    """Hash of one `account_events` row chained to `prev`."""
    text = f"{prev}\n{seq}|{account_id}|{kind}|{overdraft_limit}|{transfer_seq}|{ts_us}|{name}"
    return sha256(text.encode()).hexdigest()
