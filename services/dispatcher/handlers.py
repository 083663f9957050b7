"""Dispatcher decisions: claim a due follow-up once, check it is still wanted and allowed, send
it within the global limit, record the outcome (and the next occurrence of a recurring one).
A cancel or reschedule that comes while the call is under way is decided when the call ends."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from datetime import timedelta
from zoneinfo import ZoneInfo

from services.dispatcher.gateway import Gateway, GatewayResult, Outcome, SmsRequest
from services.dispatcher.repository import DispatchRepository, GiveUp, Retry, Settlement
from shared.bus import Publisher, dead_letter
from shared.calendar import quiet_until, zone_for
from shared.consumer import Incoming
from shared.db import persist
from shared.events import announce, announce_rate_change
from shared.faults import crash_point
from shared.logging import get_logger
from shared.metrics import (
    MESSAGES,
    RATE_LIMIT_WAITS,
    RETRIES,
    SEND_LATENESS,
    SEND_RATE,
    SENDS,
    TIMER_LATENESS,
)
from shared.phones import InvalidPhone, to_e164
from shared.pipeline import arm_after_lead, arm_dispatch, arm_followup, series_plan
from shared.schemas import Status, TimerKind, TimerMessage, parse_timer
from shared.send_rate import DEFAULT_MIN_PER_MINUTE, DEFAULT_RECOVERY_DELIVERIES, RatePolicy
from shared.settings import QuietHours
from shared.store import Context, Followup, NextOccurrence
from shared.templates import TemplateContext, TemplateError, render
from shared.timers import Clock, Timer, remaining, sleep_until, wait_until_due
from shared.topology import DISPATCHER_DUE

log = get_logger("followups.dispatcher")

BACKOFF_BASE_SECONDS = 2.0
BACKOFF_CAP_SECONDS = 300.0
LEASE_MARGIN = timedelta(milliseconds=250)


@dataclass(frozen=True)
class DispatcherDeps:
    repository: DispatchRepository
    timer: Timer
    publisher: Publisher
    gateway: Gateway
    clock: Clock
    rate_limit_per_minute: int
    max_attempts: int
    # How long a claim holds without its owner renewing it: longer than a webhook call, so a
    # live dispatcher is never taken over; renewed while waiting for a call place.
    lease: timedelta
    personalize_lead: timedelta
    quiet_hours: QuietHours | None
    default_zone: ZoneInfo
    margin: timedelta
    calls_in_flight: asyncio.Semaphore
    # the adaptive send rate: rate_limit_per_minute is its ceiling
    rate_floor: int = DEFAULT_MIN_PER_MINUTE
    recovery_deliveries: int = DEFAULT_RECOVERY_DELIVERIES

    @property
    def rate_policy(self) -> RatePolicy:
        return RatePolicy(self.rate_limit_per_minute, self.rate_floor, self.recovery_deliveries)


def backoff(attempt: int, retry_after: float | None) -> timedelta:
    """Exponential with jitter (half fixed, half random), never shorter than Retry-After."""
    ceiling = min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2 ** (attempt - 1))
    seconds = ceiling / 2 + random.uniform(0, ceiling / 2)
    return timedelta(seconds=max(seconds, retry_after or 0.0))


async def handle(incoming: Incoming, deps: DispatcherDeps) -> None:
    due = parse_timer(incoming.body)
    if due.kind is TimerKind.PERSONALIZE:
        log.warning("timer of another kind dropped", kind=due.kind, followup_id=due.followup_id)
        return
    if due.kind is TimerKind.DISPATCH:
        TIMER_LATENESS.observe(max(0.0, -remaining(incoming.headers, deps.clock()).total_seconds()))
    if not await wait_until_due(
        deps.timer, DISPATCHER_DUE.name, incoming.body, incoming.headers, deps.clock
    ):
        return
    if due.kind is TimerKind.LEAD:
        await arm_after_lead(deps.timer, due, deps.personalize_lead, deps.clock())
        return
    claimed = await deps.repository.claim(due.followup_id, due.version, deps.lease, deps.margin)
    if claimed is None:
        await _not_claimed(due, deps)
        return
    await _dispatch(*claimed, incoming, deps)


async def _not_claimed(due: TimerMessage, deps: DispatcherDeps) -> None:
    """Most unclaimed timers are stale (cancelled, rescheduled, already sent) and are dropped.
    A row still held under another dispatcher's lease is looked at again when the lease ends,
    so a dispatcher that died mid-send is taken over with the same Idempotency-Key."""
    row = await deps.repository.get(due.followup_id)
    bound = log.bind(followup_id=due.followup_id, stage="dispatch")
    if row is None or row.version != due.version or row.status is not Status.SENDING:
        MESSAGES.labels("dispatcher", "stale").inc()
        bound.debug(
            "stale timer dropped",
            timer_version=due.version,
            status=row.status if row else "missing",
        )
        return
    if row.lease_until is None:
        return
    wake = row.lease_until + LEASE_MARGIN
    await arm_dispatch(deps.timer, row, wake, due.attempt)
    bound.info(
        "follow-up held by another dispatcher; looked at again when its lease ends",
        at=wake.isoformat(),
    )


async def _dispatch(
    row: Followup, context: Context | None, incoming: Incoming, deps: DispatcherDeps
) -> None:
    if context is None:
        await _end(row, incoming, deps, Status.FAILED, "contractor_missing", plan=None)
        return
    zone, bad_zone = zone_for(context.contractor.get("timezone"), deps.default_zone)
    if bad_zone:
        log.warning(
            "contractor time zone unusable; using the default",
            contractor_id=row.contractor_id,
            default=str(deps.default_zone),
        )
    plan = series_plan(row, zone, deps.timer, deps.personalize_lead, deps.margin, deps.clock())
    if row.cancel_requested_at is not None or row.reschedule_to is not None:
        # Taken over from a dispatcher that died during its call, with a cancel or reschedule
        # kept meanwhile: that call's outcome is unknown, and the request wins.
        await _settle_unsent(PreparedSend(row, "", "", None, plan, incoming), None, None, deps)
        return
    if context.contractor.get("sms_opt_out"):
        await _end(row, incoming, deps, Status.SKIPPED, "opted_out", plan=None)
        return
    if context.contractor.get("undeliverable"):
        # Until the contractor's phone changes; a series goes on, to send once it has.
        await _end(row, incoming, deps, Status.SKIPPED, "undeliverable", plan=plan)
        return
    if row.skip_if_completed and (context.action_item or {}).get("status") == "completed":
        await _end(row, incoming, deps, Status.SKIPPED, "action_item_completed", plan=plan)
        return
    try:
        phone = to_e164(context.contractor.get("phone"))
        text, text_note = _text(row, context)
    except InvalidPhone as exc:
        await _end(row, incoming, deps, Status.FAILED, f"invalid_phone: {exc}", plan=plan)
        return
    except TemplateError as exc:
        await _end(row, incoming, deps, Status.FAILED, f"template: {exc}", plan=plan)
        return
    window_end = quiet_until(max(deps.clock(), row.scheduled_time), deps.quiet_hours, zone)
    if window_end is not None:
        await arm_dispatch(deps.timer, row, window_end, row.attempts)
        await deps.repository.release_for_retry(
            row,
            next_attempt_at=window_end,
            error="quiet_hours",
            count_attempt=False,
            deferred_reason=f"quiet_hours {deps.quiet_hours} in {zone.key}",
        )
        MESSAGES.labels("dispatcher", "deferred_quiet_hours").inc()
        log.info(
            "inside quiet hours; moved to the end of the window",
            followup_id=row.id,
            contractor_id=row.contractor_id,
            until=window_end.isoformat(),
        )
        return
    await _call(PreparedSend(row, phone, text, text_note, plan, incoming), deps)


def _text(row: Followup, context: Context) -> tuple[str, str | None]:
    """The prepared text; else the template, rendered here: for a follow-up that asked for AI
    that is a fallback (`not_ready`), for one that did not it is the plan."""
    if row.text_is_ready and row.prepared_text:
        return row.prepared_text, None
    template_context = TemplateContext(context.contractor, context.action_item, context.event)
    rendered = render(row.message_template, template_context)
    return rendered, "not_ready" if row.ai_should_personalize else None


@dataclass(frozen=True)
class PreparedSend:
    """A claimed occurrence that passed every check, with its recipient and text."""

    row: Followup
    phone: str
    text: str
    text_note: str | None  # set when the template went out because the text was not ready
    plan: NextOccurrence | None
    incoming: Incoming


async def _call(send: PreparedSend, deps: DispatcherDeps) -> None:
    # Claimed and checked ahead of time; now the exact instant. Never before it.
    await sleep_until(send.row.scheduled_time, deps.clock)
    if not await _take_place(send.row, deps):
        MESSAGES.labels("dispatcher", "cancelled_before_call").inc()
        log.info(
            "cancelled, moved or taken over while waiting for a call place", followup_id=send.row.id
        )
        return
    try:
        await _call_now(send, deps)
    finally:
        deps.calls_in_flight.release()


async def _take_place(row: Followup, deps: DispatcherDeps) -> bool:
    """Wait for one of this process's call places, renewing the claim's lease meanwhile: a
    follow-up queued behind slow calls is still owned, and no other dispatcher takes it over.
    False when the claim was lost (cancelled, moved) while waiting."""
    renew_every = deps.lease.total_seconds() / 3
    while True:
        try:
            async with asyncio.timeout(renew_every):
                await deps.calls_in_flight.acquire()
        except TimeoutError:
            if not await deps.repository.renew(row, deps.lease):
                return False
        else:
            return True


async def _call_now(send: PreparedSend, deps: DispatcherDeps) -> None:
    row = send.row
    bound = log.bind(followup_id=row.id, contractor_id=row.contractor_id, attempt=row.attempts)
    slot = await deps.repository.start_call(
        row, limit_per_minute=deps.rate_limit_per_minute, lease=deps.lease
    )
    if slot.limit_per_minute is not None:
        SEND_RATE.set(slot.limit_per_minute)
    if slot.lost:
        MESSAGES.labels("dispatcher", "cancelled_before_call").inc()
        bound.info("cancelled or moved while being claimed; not sent")
        return
    if slot.call_id is None:
        assert slot.frees_at is not None
        # The instant of this follow-up's own place in the window (its turn by priority, then
        # due time), so each place that frees up is offered to one waiting follow-up.
        wake = slot.frees_at
        await arm_dispatch(deps.timer, row, wake, row.attempts)
        await deps.repository.release_for_retry(
            row, next_attempt_at=wake, error="rate_limited", count_attempt=False, waiting=True
        )
        RATE_LIMIT_WAITS.inc()
        bound.info(
            "send window full; waiting in the broker for its place",
            until=wake.isoformat(),
            priority=row.priority,
        )
        return
    SEND_LATENESS.observe(max(0.0, (deps.clock() - row.scheduled_time).total_seconds()))
    result = await deps.gateway.send(
        SmsRequest(
            phone=send.phone,
            message=send.text,
            contractor_id=row.contractor_id,
            followup_id=row.id,
            followup_type=row.followup_type,
            scheduled_time=row.scheduled_time,
            idempotency_key=str(row.send_key),
            attempt=row.attempts,
            priority=row.priority,
        )
    )
    SENDS.labels(result.outcome.value).inc()
    crash_point("after_webhook")
    call_id = slot.call_id

    async def _record() -> None:
        if result.outcome is Outcome.SENT:
            await _settle_sent(send, result, call_id, deps)
        else:
            await _settle_unsent(send, result, call_id, deps)

    # The call has happened: a lost connection now must not run the whole message again.
    await persist(_record)


async def _settle_sent(
    send: PreparedSend, result: GatewayResult, call_id: int, deps: DispatcherDeps
) -> None:
    row = send.row
    bound = log.bind(
        followup_id=row.id,
        contractor_id=row.contractor_id,
        attempt=row.attempts,
        http_status=result.http_status,
    )
    real = deps.gateway.sent_by == "dispatcher"
    outcome = await deps.repository.mark_sent(
        row,
        call_id=call_id,
        http_status=result.http_status,
        sent_by=deps.gateway.sent_by,
        note=None if real else "console sink: not delivered to a gateway",
        text_fallback_reason=send.text_note,
        next_occurrence=send.plan,
    )
    sent = outcome.row
    if sent is None:
        bound.warning("sent, but this dispatcher's claim was lost meanwhile")
        return
    MESSAGES.labels("dispatcher", "sent").inc()
    bound.info(
        "follow-up sent",
        lateness_ms=sent.lateness_ms,
        sent_by=sent.sent_by,
        text_source=sent.text_source,
    )
    if outcome.too_late is not None:
        bound.warning(
            f"{outcome.too_late} came during the call the gateway accepted: too late, recorded",
            series_ended=outcome.too_late == "cancel" and row.is_recurring,
        )
    await announce(
        deps.publisher,
        "followup.sent",
        sent,
        deps.clock,
        attempts=sent.attempts,
        lateness_ms=sent.lateness_ms,
        next_occurrence_id=sent.next_occurrence_id,
    )
    await _announce_next(outcome.following, deps)


async def _settle_unsent(
    send: PreparedSend, result: GatewayResult | None, call_id: int | None, deps: DispatcherDeps
) -> None:
    """No accepted call (`result` None: taken over, the earlier call's outcome unknown): a kept
    cancel or reschedule wins; else retry within the attempts, or fail."""
    row = send.row
    bound = log.bind(
        followup_id=row.id,
        contractor_id=row.contractor_id,
        attempt=row.attempts,
        http_status=result.http_status if result else None,
    )
    if result is not None and result.outcome is Outcome.RETRY and result.http_status == 429:
        pause = timedelta(seconds=result.retry_after or BACKOFF_BASE_SECONDS)
        change = await deps.repository.pause_gateway(
            deps.clock() + pause, "http_429", policy=deps.rate_policy, followup_id=row.id
        )
        bound.warning("gateway asked the fleet to slow down", pause_seconds=pause.seconds)
        if change is not None:
            await announce_rate_change(deps.publisher, change, row, deps.clock)
    then: Retry | GiveUp
    if result is None:
        then = GiveUp("taken_over", send.plan)
    elif result.outcome is Outcome.RETRY and row.attempts < deps.max_attempts:
        retry_at = deps.clock() + backoff(row.attempts, result.retry_after)

        async def _arm_retry() -> None:
            await arm_dispatch(deps.timer, row, retry_at, row.attempts + 1)

        then = Retry(retry_at, result.reason, _arm_retry)
    elif result.outcome is Outcome.RETRY:
        then = GiveUp(f"gave up after {row.attempts} attempts: {result.reason}", send.plan)
    else:
        then = GiveUp(result.reason, send.plan)

    async def _arm_moved(moved: Followup) -> None:
        await arm_followup(deps.timer, moved, deps.personalize_lead, deps.margin)

    settled = await deps.repository.settle_unsent(
        row,
        call_id=call_id,
        outcome=result.outcome.value if result else "unknown",
        http_status=result.http_status if result else None,
        then=then,
        arm_moved=_arm_moved,
    )
    if settled.kind is Settlement.LOST:
        bound.warning("call not accepted, and this dispatcher's claim was lost meanwhile")
    elif settled.kind is Settlement.RETRY:
        assert isinstance(then, Retry)
        RETRIES.inc()
        bound.warning(
            "gateway refused for now; retrying",
            reason=then.reason,
            retry_at=then.at.isoformat(),
        )
    elif settled.kind is Settlement.CANCELLED and settled.row is not None:
        MESSAGES.labels("dispatcher", "cancelled_after_call").inc()
        bound.info(
            "cancel kept during the call wins: not retried", reason=settled.row.status_reason
        )
        await announce(
            deps.publisher,
            "followup.cancelled",
            settled.row,
            deps.clock,
            reason=settled.row.status_reason,
        )
    elif settled.kind is Settlement.RESCHEDULED and settled.row is not None:
        MESSAGES.labels("dispatcher", "rescheduled_after_call").inc()
        bound.info(
            "reschedule kept during the call wins: moved, not retried",
            scheduled_time=settled.row.scheduled_time.isoformat(),
            version=settled.row.version,
        )
        await announce(deps.publisher, "followup.scheduled", settled.row, deps.clock)
    elif settled.kind is Settlement.FAILED and settled.row is not None:
        assert isinstance(then, GiveUp)
        await _announce_end(settled.row, settled.following, send.incoming, deps, then.reason)


async def _announce_next(following: Followup | None, deps: DispatcherDeps) -> None:
    if following is not None and following.status is Status.SCHEDULED:
        await announce(deps.publisher, "followup.scheduled", following, deps.clock)


async def _end(
    row: Followup,
    incoming: Incoming,
    deps: DispatcherDeps,
    status: Status,
    reason: str,
    *,
    plan: NextOccurrence | None,
) -> None:
    ended, following = await deps.repository.finish(row, status, reason, plan)
    if ended is None:
        return
    await _announce_end(ended, following, incoming, deps, reason)


async def _announce_end(
    ended: Followup,
    following: Followup | None,
    incoming: Incoming,
    deps: DispatcherDeps,
    reason: str,
) -> None:
    status = ended.status
    MESSAGES.labels("dispatcher", status.value).inc()
    log.warning(
        f"follow-up {status.value}",
        followup_id=ended.id,
        contractor_id=ended.contractor_id,
        reason=reason,
    )
    if status is Status.FAILED:
        await dead_letter(
            deps.publisher,
            dead_letter_queue=DISPATCHER_DUE.dead_letter_queue,
            body=incoming.body,
            headers=dict(incoming.headers),
            rule="failed",
            detail=reason,
            source_routing_key=incoming.routing_key,
        )
    event = "followup.failed" if status is Status.FAILED else "followup.skipped"
    await announce(
        deps.publisher,
        event,
        ended,
        deps.clock,
        reason=reason,
        attempts=ended.attempts,
        next_occurrence_id=ended.next_occurrence_id,
    )
    await _announce_next(following, deps)
