"""How SQLite runs the shared reads of `bank.ledger.store` (which page statement it gets).

SQLite merges a compound SELECT whose arms are each delivered in the ORDER BY's order
(`MERGE (UNION ALL)`) and stops at the LIMIT, so a history page is the plain compound
of the postings arm and the tail arm: no sort, and the tail read only as far as the
page needs (`bank.ledger.postings.MERGED_HISTORY_ASC_SQL`).
"""

from __future__ import annotations

from typing import Final

#: History pages as one plain compound that the planner merges as it reads.
MERGES_ORDERED_ARMS: Final = True
