"""The dispatcher's rules as pure functions over plain data: what to do with a claimed
occurrence before its call (end it, let a kept cancel or reschedule win, defer it for quiet
hours, or send it), what the send window's answer means, and what follows a call the gateway did
not accept (pause the fleet on a 429, retry within the attempts, give up). The handlers carry the
decisions out; none of this touches the broker or the database."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from services.dispatcher.gateway import GatewayResult, Outcome
from services.dispatcher.send_window import CallSlot
from shared.calendar import quiet_until
from shared.occurrences import action_item_done, render_template
from shared.phones import InvalidPhone, to_e164
from shared.retry_policy import backoff, gives_up, throttle_pause
from shared.rows import Followup, SendContext
from shared.schemas import Status
from shared.settings import QuietHours
from shared.templates import TemplateError

# ---- before the call ----------------------------------------------------------------------


@dataclass(frozen=True)
class End:
    """End the occurrence unsent; `continues`: a recurring one goes on with its next."""

    status: Status
    reason: str
    continues: bool


@dataclass(frozen=True)
class KeptRequestWins:
    """Taken over from a dispatcher that died during its call, with a cancel or reschedule kept
    meanwhile: that call's outcome is unknown, and the request wins."""


@dataclass(frozen=True)
class Defer:
    """Inside the contractor's quiet hours: move the send to their end (not an attempt)."""

    until: datetime
    reason: str


@dataclass(frozen=True)
class Send:
    phone: str
    text: str
    text_note: str | None  # set when the template went out because the text was not ready


def text_to_send(row: Followup, context: SendContext) -> tuple[str, str | None]:
    """The prepared text; else the template, rendered here: for a follow-up that asked for AI
    that is a fallback (`not_ready`), for one that did not it is the plan."""
    if row.text_is_ready and row.prepared_text:
        return row.prepared_text, None
    rendered = render_template(row, context)
    return rendered, "not_ready" if row.ai_should_personalize else None


def before_call(
    row: Followup,
    context: SendContext | None,
    *,
    now: datetime,
    quiet_hours: QuietHours | None,
    zone: ZoneInfo,
) -> End | KeptRequestWins | Defer | Send:
    """The checks of a claimed occurrence, in order; the first that applies decides."""
    if context is None:
        return End(Status.FAILED, "contractor_missing", continues=False)
    if row.cancel_requested_at is not None or row.reschedule_to is not None:
        return KeptRequestWins()
    if context.contractor.sms_opt_out:
        return End(Status.SKIPPED, "opted_out", continues=False)
    if context.contractor.undeliverable:
        # Until the contractor's phone changes; a series goes on, to send once it has.
        return End(Status.SKIPPED, "undeliverable", continues=True)
    if action_item_done(row, context):
        return End(Status.SKIPPED, "action_item_completed", continues=True)
    try:
        phone = to_e164(context.contractor.phone)
        text, text_note = text_to_send(row, context)
    except InvalidPhone as exc:
        return End(Status.FAILED, f"invalid_phone: {exc}", continues=True)
    except TemplateError as exc:
        return End(Status.FAILED, f"template: {exc}", continues=True)
    window_end = quiet_until(max(now, row.scheduled_time), quiet_hours, zone)
    if window_end is not None:
        return Defer(window_end, f"quiet_hours {quiet_hours} in {zone.key}")
    return Send(phone, text, text_note)


# ---- the send window ----------------------------------------------------------------------


@dataclass(frozen=True)
class Lost:
    """Cancelled or moved while being claimed: nothing to send."""


@dataclass(frozen=True)
class WaitForPlace:
    """The window is full: wait in the broker until this follow-up's own place frees up (its
    turn by priority, then due time), so each place is offered to one waiting follow-up."""

    until: datetime


@dataclass(frozen=True)
class Call:
    call_id: int


def window_answer(slot: CallSlot) -> Lost | WaitForPlace | Call:
    if slot.lost:
        return Lost()
    if slot.call_id is None:
        assert slot.frees_at is not None
        return WaitForPlace(slot.frees_at)
    return Call(slot.call_id)


# ---- after a call the gateway did not accept ----------------------------------------------


def fleet_pause(result: GatewayResult | None) -> timedelta | None:
    """A 429 pauses every dispatcher's calls (and slows the adaptive rate)."""
    if result is None or result.outcome is not Outcome.RETRY or result.http_status != 429:
        return None
    return throttle_pause(result.retry_after)


@dataclass(frozen=True)
class RetryAt:
    at: datetime
    reason: str


@dataclass(frozen=True)
class Fail:
    reason: str


def after_refusal(
    result: GatewayResult | None, *, attempts: int, max_attempts: int, now: datetime, draw: float
) -> RetryAt | Fail:
    """`result` None: taken over, the earlier call's outcome unknown, so not tried again. A
    transient refusal is retried within the attempts (after `backoff`, `draw` its random part),
    then given up; a permanent one fails at once."""
    if result is None:
        return Fail("taken_over")
    if result.outcome is Outcome.RETRY and not gives_up(attempts, max_attempts):
        return RetryAt(now + backoff(attempts, result.retry_after, draw), result.reason)
    if result.outcome is Outcome.RETRY:
        return Fail(f"gave up after {attempts} attempts: {result.reason}")
    return Fail(result.reason)
