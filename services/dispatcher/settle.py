"""The end of a send: record a call the gateway accepted (sent, and the next occurrence of a
recurring one) or one it did not (a kept cancel or reschedule wins, else a retry or the end as
failed), and end an occurrence before any call; then the log line, the metrics and the events.

After a call, each write runs again across lost database connections (`persist`): the call has
happened, and running the whole message again would make another. The timers and events after
a write are outside it: run again, a committed write would find its claim gone and arm or
announce nothing; failing instead, the message runs again and its redelivery repairs arm and
announce what is missing."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from datetime import timedelta

from services.dispatcher.decisions import RetryAt, after_refusal, fleet_pause
from services.dispatcher.deps import DispatcherDeps, PreparedSend
from services.dispatcher.gateway import GatewayResult
from services.dispatcher.ports import GiveUp, Retry, Settlement
from shared.bus import dead_letter
from shared.consumer import Incoming
from shared.db import persist
from shared.events import announce, announce_rate_change
from shared.faults import crash_point
from shared.logging import get_logger
from shared.metrics import MESSAGES, RETRIES
from shared.occurrences import (
    Ending,
    NextOccurrence,
    announce_ending,
    announce_next,
    end_occurrence,
)
from shared.pipeline import arm_dispatch, arm_followup
from shared.rows import Followup
from shared.schemas import Status
from shared.topology import DISPATCHER_DUE

log = get_logger("followups.dispatcher")

# The call is made and its place given back: its record may wait this long for others to be
# recorded with it (only the event and the ack wait for it).
RECORD_LINGER_SECONDS = 0.05


async def settle_sent(
    send: PreparedSend,
    result: GatewayResult,
    call_id: int,
    deps: DispatcherDeps,
    *,
    post_lateness: timedelta,
) -> None:
    row = send.row
    bound = log.bind(
        followup_id=row.id,
        contractor_id=row.contractor_id,
        attempt=row.attempts,
        http_status=result.http_status,
    )
    real = deps.gateway.sent_by == "dispatcher"
    outcome = await persist(
        lambda: deps.repository.mark_sent(
            row,
            call_id=call_id,
            post_lateness=post_lateness,
            http_status=result.http_status,
            sent_by=deps.gateway.sent_by,
            note=None if real else "console sink: not delivered to a gateway",
            text_fallback_reason=send.text_note,
            next_occurrence=send.plan,
            linger=RECORD_LINGER_SECONDS,
        )
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
    await announce_sent(sent, deps)
    await announce_next(outcome.following, deps.publisher, deps.clock)


async def settle_unsent(
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
    pause = fleet_pause(result)
    if pause is not None:
        until = deps.clock() + pause
        change = await persist(
            lambda: deps.repository.pause_gateway(
                until, "http_429", policy=deps.rate_policy, followup_id=row.id
            )
        )
        bound.warning("gateway asked the fleet to slow down", pause_seconds=pause.seconds)
        if change is not None:
            await announce_rate_change(deps.publisher, change, row, deps.clock)
    then: Retry | GiveUp
    verdict = after_refusal(
        result,
        attempts=row.attempts,
        max_attempts=deps.max_attempts,
        now=deps.clock(),
        draw=random.random(),
    )
    if isinstance(verdict, RetryAt):
        then = Retry(verdict.at, verdict.reason)
    else:
        then = GiveUp(verdict.reason, send.plan)
    settled = await persist(
        lambda: deps.repository.settle_unsent(
            row,
            call_id=call_id,
            outcome=result.outcome.value if result else "unknown",
            http_status=result.http_status if result else None,
            then=then,
        )
    )
    if settled.kind in (Settlement.RETRY, Settlement.RESCHEDULED):
        # Armed after the commit, so a timer due at once finds the row released. Should this
        # process stop first, the delivery being handled comes again and arms them
        # (`services.dispatcher.handlers._not_claimed`).
        crash_point("settled_unarmed")
    if settled.kind is Settlement.LOST:
        bound.warning("call not accepted, and this dispatcher's claim was lost meanwhile")
    elif settled.kind is Settlement.RETRY:
        assert isinstance(then, Retry)
        await arm_dispatch(deps.timer, row, then.at, row.attempts + 1)
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
        await arm_followup(deps.timer, settled.row, deps.personalize_lead, deps.margin)
        MESSAGES.labels("dispatcher", "rescheduled_after_call").inc()
        bound.info(
            "reschedule kept during the call wins: moved, not retried",
            scheduled_time=settled.row.scheduled_time.isoformat(),
            version=settled.row.version,
        )
        await announce(deps.publisher, "followup.scheduled", settled.row, deps.clock)
    elif settled.kind is Settlement.FAILED:
        assert isinstance(then, GiveUp)
        await announce_ending(
            Ending(settled.row, settled.following),
            deps.publisher,
            deps.clock,
            reason=then.reason,
            on_ended=_on_ended(send.incoming, deps, then.reason),
            with_attempts=True,
        )


async def end(
    row: Followup,
    incoming: Incoming,
    deps: DispatcherDeps,
    status: Status,
    reason: str,
    *,
    plan: NextOccurrence | None,
) -> None:
    """End a claimed follow-up before any call (skipped, failed)."""
    await end_occurrence(
        deps.repository,
        row,
        status,
        reason=reason,
        plan=plan,
        publisher=deps.publisher,
        clock=deps.clock,
        claim_id=row.claim_id,
        on_ended=_on_ended(incoming, deps, reason),
        with_attempts=True,
    )


def _on_ended(
    incoming: Incoming, deps: DispatcherDeps, reason: str
) -> Callable[[Followup], Awaitable[None]]:
    """The dispatcher's part of an ending: its count, its log line, and a failure's dead letter."""

    async def _ended(ended: Followup) -> None:
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

    return _ended


async def announce_sent(sent: Followup, deps: DispatcherDeps) -> None:
    await announce(
        deps.publisher,
        "followup.sent",
        sent,
        deps.clock,
        attempts=sent.attempts,
        lateness_ms=sent.lateness_ms,
        next_occurrence_id=sent.next_occurrence_id,
    )
