"""Arming the pipeline's timers for a follow-up row (used by the scheduler, the dispatcher and the
repair sweep).

A follow-up's send timer fires `margin` before `scheduled_time` (the dispatcher waits for the
exact instant itself). One that asks for AI also needs its text prepared about `lead` ahead,
which may happen up to another `lead` earlier: that slack lets the preparation timer take fewer
hops, and a preparation that is due within it is published at once.

For a follow-up far ahead, two long timers cost twice the broker's work. Then one timer of kind
`lead` goes to the dispatcher instead: when it fires it asks the personalizer for the text and
arms the short send timer. Either way the send never waits for the personalizer: if that is
down or slow, the dispatcher renders the template itself.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from shared.calendar import next_occurrence
from shared.metrics import TIMERS_ARMED
from shared.occurrences import NextOccurrence
from shared.rows import Followup
from shared.schemas import TimerKind, TimerMessage
from shared.timers import Timer, wanted_ms
from shared.topology import DISPATCHER_DUE, PERSONALIZER_DUE


async def arm(
    timer: Timer,
    destination: str,
    message: TimerMessage,
    *,
    at: datetime | None = None,
    window: timedelta = timedelta(0),
) -> None:
    """`at`: when the timer fires, if not at the message's own `fire_at`."""
    body = message.model_dump_json().encode()
    await timer.arm(destination, body, at or message.fire_at, window=window)
    TIMERS_ARMED.labels(timer.backend.value, destination).inc()


def _message(row: Followup, kind: TimerKind, fire_at: datetime, attempt: int = 1) -> TimerMessage:
    return TimerMessage(
        kind=kind, followup_id=row.id, version=row.version, fire_at=fire_at, attempt=attempt
    )


async def arm_dispatch(timer: Timer, row: Followup, fire_at: datetime, attempt: int) -> None:
    await arm(timer, DISPATCHER_DUE.name, _message(row, TimerKind.DISPATCH, fire_at, attempt))


async def arm_preparation(timer: Timer, row: Followup, lead: timedelta) -> None:
    prepare_at = row.scheduled_time - lead
    message = _message(row, TimerKind.PERSONALIZE, prepare_at)
    await arm(timer, PERSONALIZER_DUE.name, message, window=lead)


def _ms(span: timedelta) -> int:
    return max(0, int(span.total_seconds() * 1000))


def lead_timer_saves_work(
    timer: Timer, prepare_at: datetime, send_at: datetime, lead: timedelta, now: datetime
) -> bool:
    """True when one `lead` timer (then a preparation published at once and a send timer of at
    most two leads) costs the broker less than a preparation timer and a send timer from now."""
    preparation = timer.work(wanted_ms(prepare_at, now), _ms(lead))
    apart = preparation + timer.work(wanted_ms(send_at, now), 0)
    together = preparation + 1 + timer.work(_ms(send_at - prepare_at + lead), 0)
    return together < apart


async def arm_followup(timer: Timer, row: Followup, lead: timedelta, margin: timedelta) -> None:
    send_at = row.scheduled_time - margin
    if not row.ai_should_personalize:
        await arm_dispatch(timer, row, send_at, attempt=1)
        return
    prepare_at = row.scheduled_time - lead
    if lead_timer_saves_work(timer, prepare_at, send_at, lead, timer.now()):
        message = _message(row, TimerKind.LEAD, send_at)
        await arm(timer, DISPATCHER_DUE.name, message, at=prepare_at, window=lead)
        return
    await asyncio.gather(
        arm_preparation(timer, row, lead), arm_dispatch(timer, row, send_at, attempt=1)
    )


async def arm_after_lead(timer: Timer, due: TimerMessage, lead: timedelta, now: datetime) -> None:
    """A `lead` timer fired: the text is wanted now, the send at the message's `fire_at`."""
    preparation = due.model_copy(update={"kind": TimerKind.PERSONALIZE, "fire_at": now})
    send = due.model_copy(update={"kind": TimerKind.DISPATCH})
    await asyncio.gather(
        arm(timer, PERSONALIZER_DUE.name, preparation, window=lead),
        arm(timer, DISPATCHER_DUE.name, send),
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
