"""Arming the pipeline's timers for a follow-up row (used by the scheduler and the dispatcher)."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from shared.calendar import next_occurrence
from shared.metrics import TIMERS_ARMED
from shared.schemas import TimerKind, TimerMessage
from shared.store import Followup, NextOccurrence
from shared.timers import Timer
from shared.topology import DISPATCHER_DUE, PERSONALIZER_DUE


async def arm(timer: Timer, destination: str, message: TimerMessage) -> None:
    await timer.arm(destination, message.model_dump_json().encode(), message.fire_at)
    TIMERS_ARMED.labels(timer.backend.value, destination).inc()


async def arm_dispatch(timer: Timer, row: Followup, fire_at: datetime, attempt: int) -> None:
    message = TimerMessage(
        kind=TimerKind.DISPATCH,
        followup_id=row.id,
        version=row.version,
        fire_at=fire_at,
        attempt=attempt,
    )
    await arm(timer, DISPATCHER_DUE.name, message)


async def arm_followup(timer: Timer, row: Followup, lead: timedelta, margin: timedelta) -> None:
    """Both timers at once: the text is prepared ahead, and the send fires on time even if the
    personalizer is down (the dispatcher then sends the rendered template). The send timer
    fires `margin` early: the dispatcher waits for the exact instant itself."""
    personalize = TimerMessage(
        kind=TimerKind.PERSONALIZE,
        followup_id=row.id,
        version=row.version,
        fire_at=row.scheduled_time - lead,
    )
    await asyncio.gather(
        arm(timer, PERSONALIZER_DUE.name, personalize),
        arm_dispatch(timer, row, row.scheduled_time - margin, attempt=1),
    )


def series_plan(
    row: Followup, zone: ZoneInfo, timer: Timer, lead: timedelta, margin: timedelta, now: datetime
) -> NextOccurrence | None:
    """How a recurring follow-up continues once this occurrence ends (sent, skipped, failed)."""
    if not row.is_recurring or row.recurrence_interval_days is None:
        return None

    async def _arm(following: Followup) -> None:
        await arm_followup(timer, following, lead, margin)

    when = next_occurrence(row.scheduled_time, row.recurrence_interval_days, zone, now)
    return NextOccurrence(scheduled_time=when, arm=_arm)
