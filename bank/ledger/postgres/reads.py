"""How PostgreSQL runs the shared reads of `bank.ledger.store` (which page statement it gets).

PostgreSQL estimates the postings arm of a page (the account's postings joined to
`transfers`, filtered by "names the account") at a fraction of its real size; given
the plain compound it then sorted the account's whole range (225 ms a page on
1,000,000 rows). It gets the form that cuts the postings range at the LIMIT before the
join (`bank.ledger.postings.HISTORY_ASC_SQL`: 4-8 ms of execution).
"""

from __future__ import annotations

from typing import Final

#: History pages cut at the limit per arm, not merged from the plain compound.
MERGES_ORDERED_ARMS: Final = False
