"""Lifecycle events announced on exchange `followups` (CONTRACT §2, outbound)."""

from __future__ import annotations

from typing import Any

from shared.bus import Publisher, publish_event
from shared.schemas import LifecycleEvent
from shared.store import Followup
from shared.timers import Clock


def lifecycle_event(name: str, row: Followup, now: Clock, **extra: Any) -> LifecycleEvent:
    return LifecycleEvent.model_validate(
        {
            "event": name,
            "followup_id": row.id,
            "contractor_id": row.contractor_id,
            "followup_type": row.followup_type,
            "status": row.status,
            "occurred_at": now(),
            "scheduled_time": row.scheduled_time,
            "requested_by": row.requested_by,
            **extra,
        }
    )


async def announce(
    publisher: Publisher, name: str, row: Followup, now: Clock, **extra: Any
) -> None:
    await publish_event(publisher, lifecycle_event(name, row, now, **extra))
