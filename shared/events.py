"""Lifecycle events announced on exchange `followups` (README: Publishing a follow-up, outcomes)."""

from __future__ import annotations

from typing import Any

from shared.bus import Publisher, publish_event
from shared.logging import get_logger
from shared.metrics import SEND_RATE
from shared.rows import Followup
from shared.schemas import LifecycleEvent
from shared.send_rate_store import RateChange
from shared.timers import Clock

log = get_logger("followups.send_rate")


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


async def announce_rate_change(
    publisher: Publisher, change: RateChange, row: Followup, now: Clock
) -> None:
    """A new adaptive send rate: the gauge, a log line and `followup.send_rate_changed` (for the
    follow-up whose report or 429 caused it)."""
    SEND_RATE.set(change.limit_per_minute)
    log.warning(
        "send rate changed",
        followup_id=row.id,
        limit_per_minute=change.limit_per_minute,
        previous_limit_per_minute=change.previous_limit,
        cause=change.cause,
    )
    await announce(
        publisher,
        "followup.send_rate_changed",
        row,
        now,
        limit_per_minute=change.limit_per_minute,
        previous_limit_per_minute=change.previous_limit,
        cause=change.cause,
    )
