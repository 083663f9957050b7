"""Every PostgreSQL advisory lock followups takes, in one place.

Each is the two-key form `pg_advisory_lock(namespace, key)` (also `pg_try_advisory_lock`,
`pg_advisory_xact_lock`): the namespace is followups' own, so no lock of another application on
the same database can collide with one of ours, and each use has its own key.
"""

from __future__ import annotations

from typing import NamedTuple

NAMESPACE = 0x4655  # "FU"


class AdvisoryLock(NamedTuple):
    namespace: int
    key: int


# The global send window, taken for the length of one transaction per webhook call.
SEND_WINDOW = AdvisoryLock(NAMESPACE, 1)
# The one active repair sweeper in the fleet, held by a session of its own.
REPAIR_SWEEP = AdvisoryLock(NAMESPACE, 2)
