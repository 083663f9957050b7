"""Dispatcher decisions: claim a due follow-up once, check it is still wanted and allowed, send
it within the global limit, record the outcome (and the next occurrence of a recurring one).
A cancel or reschedule that comes while the call is under way is decided when the call ends."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime, timedelta

from services.dispatcher.decisions import (
    Defer,
    End,
    KeptRequestWins,
    Lost,
    WaitForPlace,
    before_call,
    window_answer,
)
from services.dispatcher.deps import DispatcherDeps, PreparedSend
from services.dispatcher.gateway import GatewayResult, Outcome, SmsRequest
from services.dispatcher.settle import announce_sent, end, settle_sent, settle_unsent
from shared.batching import linger_for
from shared.consumer import Incoming
from shared.faults import crash_point
from shared.logging import get_logger
from shared.metrics import (
    MESSAGES,
    RATE_LIMIT_WAITS,
    SEND_LATENESS,
    SEND_RATE,
    SENDS,
    TIMER_LATENESS,
)
from shared.occurrences import contractor_zone, is_stale
from shared.pipeline import arm_after_lead, arm_dispatch, arm_followup, series_plan
from shared.retry_policy import TRANSIENT
from shared.rows import Followup, SendContext
from shared.schemas import Status, TimerKind, TimerMessage, parse_timer
from shared.timers import remaining, sleep_until, wait_until_due
from shared.topology import DISPATCHER_DUE

__all__ = ["DispatcherDeps", "handle"]

log = get_logger("followups.dispatcher")

LEASE_MARGIN = timedelta(milliseconds=250)
# A claim taken well ahead of its send may wait this long for others to be claimed with it.
CLAIM_LINGER_SECONDS = 0.05


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
    held = deps.resumable.held(due.followup_id)
    # A send timer fires `margin` ahead of the send; a timer that comes late leaves less.
    spare = due.fire_at + deps.margin - deps.clock()
    claimed = await deps.repository.claim(
        due.followup_id,
        due.version,
        deps.lease,
        deps.margin,
        resume=held,
        linger=linger_for(spare, CLAIM_LINGER_SECONDS),
    )
    deps.resumable.forget(due.followup_id)
    if claimed is None:
        await _not_claimed(due, incoming, deps)
        return
    row, context = claimed
    if held is not None:
        MESSAGES.labels("dispatcher", "claim_taken_back").inc()
        log.info(
            "claim let go of by a transient failure taken back",
            followup_id=row.id,
            attempt=row.attempts,
        )
    try:
        await _dispatch(row, context, incoming, deps)
    except TRANSIENT:
        # The claim may still be this process's, under a live lease: the next run of this
        # delivery takes it back at once instead of waiting the lease out.
        assert row.claim_id is not None
        deps.resumable.keep(row.id, row.claim_id)
        raise


async def _not_claimed(due: TimerMessage, incoming: Incoming, deps: DispatcherDeps) -> None:
    """Most unclaimed timers are stale (cancelled, rescheduled, already sent) and are dropped.
    A row still held under another dispatcher's lease is looked at again when the lease ends,
    so a dispatcher that died mid-send is taken over with the same Idempotency-Key; one that
    died between releasing a row (to wait, to retry, to its new time) and arming its timers
    has them armed here."""
    row = await deps.repository.get(due.followup_id)
    bound = log.bind(followup_id=due.followup_id, stage="dispatch")
    if row is not None and _own_send_unannounced(row, due, incoming):
        # This timer's send committed, then the dispatcher stopped (or its event could not be
        # published) before `followup.sent` went out: announce it now. An event twice is
        # harmless to a reader keyed on the follow-up; none would leave the publisher guessing.
        bound.info("redelivered timer of a sent follow-up: announced again")
        await announce_sent(row, deps)
        return
    if row is not None and _timers_may_be_unarmed(row, due, incoming):
        if row.version == due.version:
            wake = _due_instant(row, deps.margin)
            await arm_dispatch(deps.timer, row, wake, due.attempt)
            bound.info(
                "redelivered timer of a follow-up not due yet: armed again", at=wake.isoformat()
            )
        else:
            await arm_followup(deps.timer, row, deps.personalize_lead, deps.margin)
            bound.info(
                "redelivered timer of a follow-up moved meanwhile: its timers armed again",
                version=row.version,
                scheduled_time=row.scheduled_time.isoformat(),
            )
        return
    if row is None or is_stale(row, due, Status.SENDING):
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
    row: Followup, context: SendContext | None, incoming: Incoming, deps: DispatcherDeps
) -> None:
    zone, bad_zone = (
        contractor_zone(context, deps.default_zone) if context else (deps.default_zone, False)
    )
    if bad_zone:
        log.warning(
            "contractor time zone unusable; using the default",
            contractor_id=row.contractor_id,
            default=str(deps.default_zone),
        )
    plan = series_plan(row, zone, deps.timer, deps.personalize_lead, deps.margin, deps.clock())
    decision = before_call(row, context, now=deps.clock(), quiet_hours=deps.quiet_hours, zone=zone)
    if isinstance(decision, End):
        next_plan = plan if decision.continues else None
        await end(row, incoming, deps, decision.status, decision.reason, plan=next_plan)
    elif isinstance(decision, KeptRequestWins):
        await settle_unsent(PreparedSend(row, "", "", None, plan, incoming), None, None, deps)
    elif isinstance(decision, Defer):
        if not await _wait_in_broker(
            row, decision.until, deps, error="quiet_hours", deferred_reason=decision.reason
        ):
            return
        MESSAGES.labels("dispatcher", "deferred_quiet_hours").inc()
        log.info(
            "inside quiet hours; moved to the end of the window",
            followup_id=row.id,
            contractor_id=row.contractor_id,
            until=decision.until.isoformat(),
        )
    else:
        send = PreparedSend(row, decision.phone, decision.text, decision.text_note, plan, incoming)
        await _call(send, deps)


async def _call(send: PreparedSend, deps: DispatcherDeps) -> None:
    # Claimed and checked ahead of time. The call's start is a round trip to the database, under
    # the send window's lock; taken a little ahead, it leaves only the POST for the instant.
    await sleep_until(send.row.scheduled_time - deps.call_lead, deps.clock)
    if not await _take_place(send.row, deps):
        MESSAGES.labels("dispatcher", "cancelled_before_call").inc()
        log.info(
            "cancelled, moved or taken over while waiting for a call place", followup_id=send.row.id
        )
        return
    try:
        made = await _call_now(send, deps)
    finally:
        # The place bounds calls in flight; recording the outcome needs none, and holding it
        # through the record and the event would make every other due send wait for them.
        deps.calls_in_flight.release()
    if made is None:
        return
    if made.result.outcome is Outcome.SENT:
        await settle_sent(send, made.result, made.call_id, deps, post_lateness=made.post_lateness)
    else:
        await settle_unsent(send, made.result, made.call_id, deps)


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


@dataclass(frozen=True)
class _Made:
    result: GatewayResult
    call_id: int
    # How late the POST left, by a clock that never reads ahead of the database's.
    post_lateness: timedelta


async def _call_now(send: PreparedSend, deps: DispatcherDeps) -> _Made | None:
    """Take this follow-up's place in the send window and make the call, or None when no call
    was made (lost, or waiting for a place)."""
    row = send.row
    bound = log.bind(followup_id=row.id, contractor_id=row.contractor_id, attempt=row.attempts)
    slot = await deps.repository.start_call(
        row, limit_per_minute=deps.rate_limit_per_minute, lease=deps.lease
    )
    if slot.limit_per_minute is not None:
        SEND_RATE.set(slot.limit_per_minute)
    place = window_answer(slot)
    if isinstance(place, Lost):
        MESSAGES.labels("dispatcher", "cancelled_before_call").inc()
        bound.info("cancelled or moved while being claimed; not sent")
        return None
    if isinstance(place, WaitForPlace):
        wake = place.until
        if not await _wait_in_broker(row, wake, deps, error="rate_limited", waiting=True):
            return None
        RATE_LIMIT_WAITS.inc()
        bound.info(
            "send window full; waiting in the broker for its place",
            until=wake.isoformat(),
            priority=row.priority,
        )
        return None
    # The exact instant, never before it: the clock never reads ahead of the database's.
    await sleep_until(row.scheduled_time, deps.clock)
    post_lateness = max(timedelta(0), deps.clock() - row.scheduled_time)
    SEND_LATENESS.observe(post_lateness.total_seconds())
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
    return _Made(result, place.call_id, post_lateness)


async def _wait_in_broker(
    row: Followup,
    until: datetime,
    deps: DispatcherDeps,
    *,
    error: str,
    deferred_reason: str | None = None,
    waiting: bool = False,
) -> bool:
    """Give the claim back and arm the wake for `until`; False when the claim was lost meanwhile
    (cancelled, moved) and nothing is armed. Released first: a wake due at once (a place that
    frees now, quiet hours that end now) comes within milliseconds, and finding the row still
    claimed it would wait out the whole lease. Should the process stop between the two, the
    delivery being handled comes again and arms the wake (`_timers_may_be_unarmed`)."""
    released = await deps.repository.release_for_retry(
        row,
        next_attempt_at=until,
        error=error,
        count_attempt=False,
        deferred_reason=deferred_reason,
        waiting=waiting,
    )
    if not released:
        MESSAGES.labels("dispatcher", "cancelled_before_call").inc()
        log.info("cancelled or moved while being released; not sent", followup_id=row.id)
        return False
    crash_point("released_to_wait")
    await arm_dispatch(deps.timer, row, until, row.attempts)
    return True


def _timers_may_be_unarmed(row: Followup, due: TimerMessage, incoming: Incoming) -> bool:
    """A dispatcher released this row and stopped before it armed the timer for what comes
    next: a wake (a place in the send window, the end of quiet hours), a retry, or, at a newer
    version, the new time of a reschedule kept during its call. The timer it was handling comes
    again. Arming once more is harmless (a reschedule by the scheduler armed its own); the
    sweep would find the row only after its grace."""
    return (
        incoming.redelivered
        and due.kind is TimerKind.DISPATCH
        and row.status is Status.SCHEDULED
        and row.version >= due.version
    )


def _due_instant(row: Followup, margin: timedelta) -> datetime:
    send_at = row.scheduled_time - margin
    if row.next_attempt_at is None:
        return send_at
    return max(send_at, row.next_attempt_at)


def _own_send_unannounced(row: Followup, due: TimerMessage, incoming: Incoming) -> bool:
    return (
        incoming.redelivered
        and due.kind is TimerKind.DISPATCH
        and row.status is Status.SENT
        and row.version == due.version
    )
