"""Scheduler decisions: validate a command, record it once, arm its timers, announce it."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import timedelta

import asyncpg

from services.scheduler.repository import SchedulerStore
from shared.batching import linger_for
from shared.bus import Publisher
from shared.consumer import Incoming
from shared.deliveries import DeliveryStore, ReportOutcome
from shared.errors import Rejected
from shared.events import announce, announce_rate_change
from shared.logging import get_logger
from shared.metrics import DELIVERY_REPORTS
from shared.phones import match_digits
from shared.pipeline import arm_followup
from shared.rows import Followup, Reference
from shared.schemas import (
    CancelRequested,
    DeliveryReported,
    FollowupRequested,
    RescheduleRequested,
    ResponseReceived,
    Status,
    parse_inbound,
)
from shared.templates import TemplateError, check_template
from shared.timers import Clock, Timer

log = get_logger("followups.scheduler")

# A request whose send is seconds away may wait this long for others to be stored with it.
INTAKE_LINGER_SECONDS = 0.2


@dataclass(frozen=True)
class SchedulerDeps:
    store: SchedulerStore
    timer: Timer
    publisher: Publisher
    personalize_lead: timedelta
    dispatch_margin: timedelta
    clock: Clock
    deliveries: DeliveryStore


def idempotency_key(request: FollowupRequested, incoming: Incoming) -> str:
    """The caller's key, else the AMQP message id, else the content itself: a redelivery of the
    same bytes always maps to the same follow-up."""
    if request.idempotency_key:
        return f"key:{request.idempotency_key}"
    if incoming.message_id:
        return f"message-id:{incoming.message_id}"
    return "sha256:" + hashlib.sha256(incoming.body).hexdigest()


def arm_timers(row: Followup, deps: SchedulerDeps) -> Awaitable[None]:
    return arm_followup(deps.timer, row, deps.personalize_lead, deps.dispatch_margin)


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
    spare = request.scheduled_time - deps.dispatch_margin - deps.clock()
    try:
        row, created = await deps.store.insert(
            request, key, linger=linger_for(spare, INTAKE_LINGER_SECONDS)
        )
    except asyncpg.ForeignKeyViolationError as exc:
        raise Rejected("unknown_reference", _missing_reference(exc)) from None
    bound = log.bind(followup_id=row.id, contractor_id=row.contractor_id)
    if not created:
        if incoming.redelivered and row.status is Status.SCHEDULED:
            # Stored, but this service may have stopped before its timers were armed or its event
            # went out: both again (a timer twice is harmless, and so is an event twice to a
            # reader keyed on the follow-up; none would leave it to the sweep, or unannounced).
            await arm_timers(row, deps)
            bound.info("redelivered request: timers armed and announced again")
            await announce(deps.publisher, "followup.scheduled", row, deps.clock)
            return
        bound.info("duplicate request ignored", status=row.status)
        return
    if row.status is Status.SCHEDULED:
        await arm_timers(row, deps)
    if row.status is Status.SKIPPED:
        bound.info("follow-up skipped", reason=row.status_reason)
        await announce(
            deps.publisher, "followup.skipped", row, deps.clock, reason=row.status_reason
        )
        return
    if row.status is Status.CANCELLED:
        bound.info("its cancel came first; recorded as cancelled")
        await announce(
            deps.publisher, "followup.cancelled", row, deps.clock, reason=row.status_reason
        )
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


OPT_OUT_WORDS = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT"})
OPT_IN_WORDS = frozenset({"START", "UNSTOP"})


def opt_change(text: str) -> bool | None:
    """Carrier keywords count only as the whole reply (so "stop by at 5" is not an opt-out)."""
    word = text.strip().strip(".!").upper()
    if word in OPT_OUT_WORDS:
        return True
    if word in OPT_IN_WORDS:
        return False
    return None


async def cancel(command: CancelRequested, deps: SchedulerDeps) -> None:
    reference = Reference(command.followup_id, command.idempotency_key)
    rows = await deps.store.cancel(reference, command.reason or "cancel_requested")
    if not rows:
        current = await deps.store.find(reference)
        log.info(
            "nothing to cancel now" if current else "cancel kept for a request not yet seen",
            followup_id=command.followup_id,
            status=current.status if current else "missing",
        )
        return
    for row in rows:
        if row.status is Status.SENDING:
            log.info(
                "webhook call under way; the cancel is kept and wins unless the call is accepted",
                followup_id=row.id,
                contractor_id=row.contractor_id,
            )
            continue
        log.info("follow-up cancelled", followup_id=row.id, contractor_id=row.contractor_id)
        await announce(
            deps.publisher, "followup.cancelled", row, deps.clock, reason=row.status_reason
        )


async def reschedule(command: RescheduleRequested, deps: SchedulerDeps) -> None:
    reference = Reference(command.followup_id, command.idempotency_key)
    row = await deps.store.reschedule(reference, command.scheduled_time)
    if row is not None and row.status is Status.SCHEDULED:
        # Also when the time was already the new one: a redelivered command may find the move
        # stored but its timers never armed.
        await arm_timers(row, deps)
    if row is None:
        log.info("nothing pending to reschedule", followup_id=command.followup_id)
        return
    if row.status is Status.SENDING:
        log.info(
            "webhook call under way; the new time is kept and wins unless the call is accepted",
            followup_id=row.id,
            contractor_id=row.contractor_id,
        )
        return
    log.info(
        "follow-up rescheduled",
        followup_id=row.id,
        contractor_id=row.contractor_id,
        scheduled_time=row.scheduled_time.isoformat(),
        version=row.version,
    )
    await announce(deps.publisher, "followup.scheduled", row, deps.clock)


async def record_response(command: ResponseReceived, deps: SchedulerDeps) -> None:
    outcome = await deps.store.record_response(
        contractor_id=command.contractor_id,
        phone_digits=match_digits(command.phone) if command.phone else None,
        followup_id=command.followup_id,
        text=command.text,
        received_at=command.received_at or deps.clock(),
        opt_out=opt_change(command.text),
    )
    if outcome.contractor_id is None:
        raise Rejected("unknown_reference", "no contractor with that id or phone")
    bound = log.bind(contractor_id=outcome.contractor_id)
    if outcome.opt_change is not None:
        bound.info(
            "contractor opted out" if outcome.opt_change else "contractor opted back in",
            cancelled=len(outcome.cancelled),
        )
    for row in outcome.cancelled:
        await announce(deps.publisher, "followup.cancelled", row, deps.clock, reason="opted_out")
    if outcome.recorded_on is None:
        bound.info("response with no sent follow-up to attach it to")
        return
    bound.info("response recorded", followup_id=outcome.recorded_on.id)
    await announce(deps.publisher, "followup.response_recorded", outcome.recorded_on, deps.clock)


async def record_delivery(report: DeliveryReported, deps: SchedulerDeps) -> None:
    recorded = await deps.deliveries.record(report)
    row = recorded.row
    if row is None or recorded.outcome is None:
        raise Rejected("unknown_reference", "no follow-up occurrence has that idempotency_key")
    DELIVERY_REPORTS.labels(report.status.value, recorded.outcome.value).inc()
    bound = log.bind(
        followup_id=row.id,
        contractor_id=row.contractor_id,
        delivery_status=report.status.value,
        error_code=report.error_code,
    )
    if recorded.outcome in (ReportOutcome.STALE, ReportOutcome.DUPLICATE):
        bound.info(
            "delivery report older than the one recorded; kept out", outcome=recorded.outcome
        )
        return
    if recorded.outcome is ReportOutcome.NOT_SENT:
        bound.warning(
            "delivery report for an occurrence that is not sent; recorded", status=row.status
        )
    else:
        bound.info("delivery report recorded")
    await announce(
        deps.publisher,
        "followup.delivery_recorded",
        row,
        deps.clock,
        delivery_status=report.status,
        error_code=report.error_code,
    )
    if recorded.undeliverable:
        bound.warning(
            "contractor's phone can't take an SMS; their pending follow-ups are skipped until it"
            " changes",
            skipped=len(recorded.skipped),
        )
    for skipped in recorded.skipped:
        await announce(
            deps.publisher, "followup.skipped", skipped, deps.clock, reason="undeliverable"
        )
    if recorded.rate_change is not None:
        await announce_rate_change(deps.publisher, recorded.rate_change, row, deps.clock)


async def handle(incoming: Incoming, deps: SchedulerDeps) -> None:
    command = parse_inbound(incoming.routing_key, incoming.body, incoming.content_type)
    if isinstance(command, FollowupRequested):
        await schedule(command, incoming, deps)
    elif isinstance(command, CancelRequested):
        await cancel(command, deps)
    elif isinstance(command, RescheduleRequested):
        await reschedule(command, deps)
    elif isinstance(command, ResponseReceived):
        await record_response(command, deps)
    elif isinstance(command, DeliveryReported):
        await record_delivery(command, deps)
