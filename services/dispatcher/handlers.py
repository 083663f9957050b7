"""Dispatcher decisions: claim a due follow-up once, send it within the global limit, record it."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from services.dispatcher.gateway import Gateway, GatewayResult, Outcome, SmsRequest
from shared.bus import Publisher, dead_letter
from shared.consumer import Incoming
from shared.events import announce
from shared.logging import get_logger
from shared.phones import InvalidPhone, to_e164
from shared.schemas import Status, TimerKind, TimerMessage, parse_timer
from shared.store import Followup, FollowupStore
from shared.templates import TemplateContext, TemplateError, render
from shared.timers import Clock, Timer, wait_until_due
from shared.topology import DISPATCHER_DUE

log = get_logger("followups.dispatcher")

BACKOFF_BASE_SECONDS = 2.0
BACKOFF_CAP_SECONDS = 300.0
LEASE_MARGIN = timedelta(milliseconds=250)


@dataclass(frozen=True)
class DispatcherDeps:
    store: FollowupStore
    timer: Timer
    publisher: Publisher
    gateway: Gateway
    clock: Clock
    rate_limit_per_minute: int
    max_attempts: int
    lease: timedelta


def backoff(attempt: int, retry_after: float | None) -> timedelta:
    """Exponential with jitter (half fixed, half random), never shorter than Retry-After."""
    ceiling = min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2 ** (attempt - 1))
    seconds = ceiling / 2 + random.uniform(0, ceiling / 2)
    return timedelta(seconds=max(seconds, retry_after or 0.0))


async def _arm(deps: DispatcherDeps, row: Followup, fire_at: datetime, attempt: int) -> None:
    message = TimerMessage(
        kind=TimerKind.DISPATCH,
        followup_id=row.id,
        version=row.version,
        fire_at=fire_at,
        attempt=attempt,
    )
    await deps.timer.arm(DISPATCHER_DUE.name, message.model_dump_json().encode(), fire_at)


async def handle(incoming: Incoming, deps: DispatcherDeps) -> None:
    due = parse_timer(incoming.body)
    if due.kind is not TimerKind.DISPATCH:
        log.warning("timer of another kind dropped", kind=due.kind, followup_id=due.followup_id)
        return
    if not await wait_until_due(
        deps.timer, DISPATCHER_DUE.name, incoming.body, incoming.headers, deps.clock
    ):
        return
    row = await deps.store.claim(due.followup_id, due.version, deps.lease)
    if row is None:
        await _not_claimed(due, deps)
        return
    await _send(row, incoming, deps)


async def _not_claimed(due: TimerMessage, deps: DispatcherDeps) -> None:
    """Most unclaimed timers are stale (cancelled, rescheduled, already sent) and are dropped.
    A row still held under another dispatcher's lease is looked at again when the lease ends,
    so a dispatcher that died mid-send is taken over with the same Idempotency-Key."""
    row = await deps.store.get(due.followup_id)
    bound = log.bind(followup_id=due.followup_id, stage="dispatch")
    if row is None or row.version != due.version or row.status is not Status.SENDING:
        bound.info(
            "stale timer dropped",
            timer_version=due.version,
            status=row.status if row else "missing",
        )
        return
    if row.lease_until is None:
        return
    wake = row.lease_until + LEASE_MARGIN
    await _arm(deps, row, wake, due.attempt)
    bound.info(
        "follow-up held by another dispatcher; looked at again when its lease ends",
        at=wake.isoformat(),
    )


def _text(row: Followup, context: TemplateContext) -> tuple[str, str | None]:
    if row.text_is_ready and row.prepared_text:
        return row.prepared_text, None
    return render(row.message_template, context), "not_ready"


async def _send(row: Followup, incoming: Incoming, deps: DispatcherDeps) -> None:
    bound = log.bind(
        followup_id=row.id, contractor_id=row.contractor_id, stage="dispatch", attempt=row.attempts
    )
    context = await deps.store.context(row)
    if context is None:
        await _fail(row, incoming, deps, "contractor_missing")
        return
    try:
        phone = to_e164(context.contractor.get("phone"))
        text, text_note = _text(
            row, TemplateContext(context.contractor, context.action_item, context.event)
        )
    except InvalidPhone as exc:
        await _fail(row, incoming, deps, f"invalid_phone: {exc}")
        return
    except TemplateError as exc:
        await _fail(row, incoming, deps, f"template: {exc}")
        return

    slot = await deps.store.start_call(row, limit_per_minute=deps.rate_limit_per_minute)
    if slot.call_id is None:
        assert slot.frees_at is not None
        await _arm(deps, row, slot.frees_at, row.attempts)
        await deps.store.release_for_retry(
            row, next_attempt_at=slot.frees_at, error="rate_limited", count_attempt=False
        )
        bound.info("send window full; waiting in the broker", until=slot.frees_at.isoformat())
        return

    result = await deps.gateway.send(
        SmsRequest(
            phone=phone,
            message=text,
            contractor_id=row.contractor_id,
            followup_id=row.id,
            followup_type=row.followup_type,
            scheduled_time=row.scheduled_time,
            idempotency_key=str(row.send_key),
            attempt=row.attempts,
            priority=row.priority,
        )
    )
    await deps.store.record_call_end(slot.call_id, result.outcome.value, result.http_status)
    await _settle(row, result, text_note, incoming, deps)


async def _settle(
    row: Followup,
    result: GatewayResult,
    text_note: str | None,
    incoming: Incoming,
    deps: DispatcherDeps,
) -> None:
    bound = log.bind(
        followup_id=row.id,
        contractor_id=row.contractor_id,
        stage="dispatch",
        attempt=row.attempts,
        http_status=result.http_status,
    )
    if result.outcome is Outcome.SENT:
        note = (
            "console sink: not delivered to a gateway"
            if deps.gateway.sent_by != "dispatcher"
            else None
        )
        sent = await deps.store.mark_sent(
            row, sent_by=deps.gateway.sent_by, note=note, text_fallback_reason=text_note
        )
        if sent is None:
            bound.warning("sent, but the row had left 'sending' meanwhile")
            return
        bound.info(
            "follow-up sent",
            lateness_ms=sent.lateness_ms,
            sent_by=sent.sent_by,
            text_source=sent.text_source,
        )
        await announce(
            deps.publisher,
            "followup.sent",
            sent,
            deps.clock,
            attempts=sent.attempts,
            lateness_ms=sent.lateness_ms,
        )
        return
    if result.outcome is Outcome.RETRY and row.attempts < deps.max_attempts:
        retry_at = deps.clock() + backoff(row.attempts, result.retry_after)
        await _arm(deps, row, retry_at, row.attempts + 1)
        await deps.store.release_for_retry(row, next_attempt_at=retry_at, error=result.reason)
        bound.warning(
            "gateway refused for now; retrying", reason=result.reason, retry_at=retry_at.isoformat()
        )
        return
    reason = (
        result.reason
        if result.outcome is Outcome.FAILED
        else (f"gave up after {row.attempts} attempts: {result.reason}")
    )
    await _fail(row, incoming, deps, reason)


async def _fail(row: Followup, incoming: Incoming, deps: DispatcherDeps, reason: str) -> None:
    failed = await deps.store.finish(row, Status.FAILED, stage="dispatcher", reason=reason)
    if failed is None:
        return
    log.warning(
        "follow-up failed", followup_id=row.id, contractor_id=row.contractor_id, reason=reason
    )
    await dead_letter(
        deps.publisher,
        dead_letter_queue=DISPATCHER_DUE.dead_letter_queue,
        body=incoming.body,
        headers=dict(incoming.headers),
        rule="failed",
        detail=reason,
        source_routing_key=incoming.routing_key,
    )
    await announce(
        deps.publisher,
        "followup.failed",
        failed,
        deps.clock,
        reason=reason,
        attempts=failed.attempts,
    )
