"""Claims this dispatcher process took and let go of mid-send because of a transient failure (a
lost database connection between the claim and the call, say).

The delivery is run again in this process (`shared.consumer`), or comes back from the broker, and
finds its row still `sending` under a live lease: its own. Without this record it could only
wait for the lease to run out, as if another dispatcher held the row, and the send would go out
a whole lease late. With it the claim is taken again at once, as a takeover would take it: the
same Idempotency-Key, so a call that did reach the gateway is not made twice.
"""

from __future__ import annotations

from collections import OrderedDict
from uuid import UUID

# A claim id is never reused, so an entry whose delivery went to another replica can only fail
# to match; the bound keeps such leftovers from growing without end.
MAX_HELD = 4096


class ResumableClaims:
    def __init__(self, limit: int = MAX_HELD) -> None:
        self._claims: OrderedDict[int, UUID] = OrderedDict()
        self._limit = limit

    def keep(self, followup_id: int, claim_id: UUID) -> None:
        self._claims[followup_id] = claim_id
        self._claims.move_to_end(followup_id)
        while len(self._claims) > self._limit:
            self._claims.popitem(last=False)

    def held(self, followup_id: int) -> UUID | None:
        return self._claims.get(followup_id)

    def forget(self, followup_id: int) -> None:
        self._claims.pop(followup_id, None)

    def __len__(self) -> int:
        return len(self._claims)
