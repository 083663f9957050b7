"""Scheduler decisions: validate a command, record it once, arm its timers, announce it."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from datetime import timedelta

import asyncpg

from shared.bus import Publisher
from shared.consumer import Incoming
from shared.errors import Rejected
from shared.events import announce
from shared.logging import get_logger
from shared.schemas import FollowupRequested, TimerKind, TimerMessage, parse_inbound
from shared.store import Followup, FollowupStore
from shared.templates import TemplateError, check_template
from shared.timers import Clock, Timer
from shared.topology import DISPATCHER_DUE, PERSONALIZER_DUE

log = get_logger("followups.scheduler")


@dataclass(frozen=True)
class SchedulerDeps:
    store: FollowupStore
    timer: Timer
    publisher: Publisher
    personalize_lead: timedelta
    clock: Clock


def idempotency_key(request: FollowupRequested, incoming: Incoming) -> str:
    """The caller's key, else the AMQP message id, else the content itself: a redelivery of the
    same bytes always maps to the same follow-up."""
    if request.idempotency_key:
        return f"key:{request.idempotency_key}"
    if incoming.message_id:
        return f"message-id:{incoming.message_id}"
    return "sha256:" + hashlib.sha256(incoming.body).hexdigest()


async def arm_timers(row: Followup, deps: SchedulerDeps) -> None:
    """Both timers at once: the text is prepared ahead, and the send fires on time even if the
    personalizer is down (the dispatcher then sends the rendered template)."""
    personalize = TimerMessage(
        kind=TimerKind.PERSONALIZE,
        followup_id=row.id,
        version=row.version,
        fire_at=row.scheduled_time - deps.personalize_lead,
    )
    dispatch = TimerMessage(
        kind=TimerKind.DISPATCH,
        followup_id=row.id,
        version=row.version,
        fire_at=row.scheduled_time,
    )
    await asyncio.gather(
        deps.timer.arm(
            PERSONALIZER_DUE.name, personalize.model_dump_json().encode(), personalize.fire_at
        ),
        deps.timer.arm(DISPATCHER_DUE.name, dispatch.model_dump_json().encode(), dispatch.fire_at),
    )


async def schedule(request: FollowupRequested, incoming: Incoming, deps: SchedulerDeps) -> None:
    try:
        check_template(
            request.message_template,
            has_action_item=request.action_item_id is not None,
            has_event=request.event_id is not None,
        )
    except TemplateError as exc:
        raise Rejected("template", str(exc)) from None
    key = idempotency_key(request, incoming)
    try:
        row, created = await deps.store.insert(
            request, key, before_commit=lambda row: arm_timers(row, deps)
        )
    except asyncpg.ForeignKeyViolationError as exc:
        raise Rejected("unknown_reference", _missing_reference(exc)) from None
    bound = log.bind(followup_id=row.id, contractor_id=row.contractor_id)
    if not created:
        bound.info("duplicate request ignored", status=row.status)
        return
    bound.info(
        "follow-up scheduled",
        scheduled_time=row.scheduled_time.isoformat(),
        followup_type=row.followup_type,
    )
    await announce(deps.publisher, "followup.scheduled", row, deps.clock)


def _missing_reference(exc: asyncpg.ForeignKeyViolationError) -> str:
    constraint = exc.constraint_name or ""
    for column in ("contractor_id", "action_item_id", "event_id"):
        if column in constraint:
            return f"{column} does not exist"
    return "a referenced contractor, action item or event does not exist"


async def handle(incoming: Incoming, deps: SchedulerDeps) -> None:
    command = parse_inbound(incoming.routing_key, incoming.body, incoming.content_type)
    if isinstance(command, FollowupRequested):
        await schedule(command, incoming, deps)
    else:
        raise Rejected("not_implemented", f"{incoming.routing_key} is not handled yet")
