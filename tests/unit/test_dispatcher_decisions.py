"""The dispatcher's rules, one test each, on plain rows (no broker, no database)."""

import dataclasses
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

from services.dispatcher.decisions import (
    Call,
    Defer,
    End,
    Fail,
    KeptRequestWins,
    Lost,
    RetryAt,
    Send,
    WaitForPlace,
    after_refusal,
    before_call,
    fleet_pause,
    window_answer,
)
from services.dispatcher.gateway import GatewayResult, Outcome
from services.dispatcher.send_window import CallSlot
from shared.rows import ActionItem, Contractor, Followup, SendContext
from shared.schemas import Status
from shared.settings import QuietHours
from tests.support.data import followup_row

NOW = datetime(2026, 11, 28, 17, 0, tzinfo=UTC)  # noon in New York
ZONE = ZoneInfo("America/New_York")
NIGHT = QuietHours(time(21, 0), time(8, 0))


def _row(**changes) -> Followup:
    defaults = {"scheduled_time": NOW, "message_template": "Hi {first_name}, please send the W-9."}
    return followup_row(**{**defaults, **changes})


def _context(*, item_status: str | None = None, **contractor) -> SendContext:
    person = Contractor(
        id=1,
        first_name="Ana",
        last_name="Diaz",
        company_name="Diaz Roofing",
        phone="+1 212 555 0100",
        timezone="America/New_York",
        sms_opt_out=False,
    )
    item = None
    if item_status is not None:
        item = ActionItem(1, 1, "Send the W-9", None, None, item_status)
    return SendContext(dataclasses.replace(person, **contractor), item, None)


def _decide(row: Followup, context: SendContext | None, quiet: QuietHours | None = None):
    return before_call(row, context, now=NOW, quiet_hours=quiet, zone=ZONE)


def test_a_missing_contractor_fails_and_ends_the_series():
    assert _decide(_row(), None) == End(Status.FAILED, "contractor_missing", continues=False)


def test_a_cancel_kept_during_a_dead_owners_call_wins_at_the_takeover():
    assert _decide(_row(cancel_requested_at=NOW), _context()) == KeptRequestWins()
    assert _decide(_row(reschedule_to=NOW + timedelta(hours=1)), _context()) == KeptRequestWins()


def test_an_opted_out_contractor_is_skipped_and_the_series_ends():
    decision = _decide(_row(), _context(sms_opt_out=True))
    assert decision == End(Status.SKIPPED, "opted_out", continues=False)


def test_an_undeliverable_phone_skips_the_occurrence_and_the_series_goes_on():
    decision = _decide(_row(), _context(undeliverable=True))
    assert decision == End(Status.SKIPPED, "undeliverable", continues=True)


def test_a_completed_action_item_skips_only_when_asked():
    asked = _decide(_row(skip_if_completed=True), _context(item_status="completed"))
    assert asked == End(Status.SKIPPED, "action_item_completed", continues=True)
    assert isinstance(_decide(_row(), _context(item_status="completed")), Send)
    assert isinstance(_decide(_row(skip_if_completed=True), _context(item_status="open")), Send)


def test_a_phone_that_is_no_number_fails():
    decision = _decide(_row(), _context(phone="not a phone"))
    assert isinstance(decision, End)
    assert (decision.status, decision.continues) == (Status.FAILED, True)
    assert decision.reason.startswith("invalid_phone: ")


def test_a_template_that_cannot_be_rendered_fails():
    decision = _decide(_row(message_template="Hi {nickname}"), _context())
    assert isinstance(decision, End)
    assert decision.status is Status.FAILED
    assert decision.reason.startswith("template: ")


def test_inside_quiet_hours_the_send_moves_to_their_end():
    late = NOW + timedelta(hours=10)  # 22:00 in New York
    decision = _decide(_row(scheduled_time=late), _context(), NIGHT)
    assert decision == Defer(
        datetime(2026, 11, 29, 8, 0, tzinfo=ZONE), "quiet_hours 21:00-08:00 in America/New_York"
    )
    assert isinstance(_decide(_row(), _context(), NIGHT), Send)


def test_the_prepared_text_goes_when_ready_else_the_template_says_why():
    ready = _row(prepared_text="Hi Ana!", prepared_version=1, ai_should_personalize=True)
    assert _decide(ready, _context()) == Send("+12125550100", "Hi Ana!", None)
    not_ready = _decide(_row(ai_should_personalize=True), _context())
    assert not_ready == Send("+12125550100", "Hi Ana, please send the W-9.", "not_ready")
    assert _decide(_row(), _context()) == Send("+12125550100", "Hi Ana, please send the W-9.", None)


def test_a_full_send_window_waits_for_this_follow_ups_own_place():
    frees_at = NOW + timedelta(seconds=3)
    assert window_answer(CallSlot(None, frees_at)) == WaitForPlace(frees_at)
    assert window_answer(CallSlot(7, None)) == Call(7)


def test_a_claim_lost_while_waiting_for_the_window_sends_nothing():
    assert window_answer(CallSlot(None, None, lost=True)) == Lost()


def test_a_429_pauses_the_fleet_for_its_retry_after():
    throttled = GatewayResult(Outcome.RETRY, "http_429", 429, retry_after=12.0)
    assert fleet_pause(throttled) == timedelta(seconds=12)
    assert fleet_pause(GatewayResult(Outcome.RETRY, "http_429", 429)) == timedelta(seconds=2)
    assert fleet_pause(GatewayResult(Outcome.RETRY, "http_503", 503)) is None
    assert fleet_pause(None) is None


def test_a_transient_refusal_is_retried_within_the_attempts():
    refused = GatewayResult(Outcome.RETRY, "http_503", 503, retry_after=30.0)
    verdict = after_refusal(refused, attempts=2, max_attempts=5, now=NOW, draw=0.0)
    assert verdict == RetryAt(NOW + timedelta(seconds=30), "http_503")
    quick = after_refusal(
        GatewayResult(Outcome.RETRY, "timeout"), attempts=3, max_attempts=5, now=NOW, draw=0.5
    )
    assert quick == RetryAt(NOW + timedelta(seconds=6), "timeout")  # 8 s ceiling: 4 + 0.5 * 4


def test_the_retry_cap_gives_up():
    refused = GatewayResult(Outcome.RETRY, "http_503", 503)
    verdict = after_refusal(refused, attempts=5, max_attempts=5, now=NOW, draw=0.0)
    assert verdict == Fail("gave up after 5 attempts: http_503")


def test_a_permanent_refusal_fails_at_once():
    refused = GatewayResult(Outcome.FAILED, "http_400", 400)
    assert after_refusal(refused, attempts=1, max_attempts=5, now=NOW, draw=0.0) == Fail("http_400")


def test_a_takeover_does_not_call_again_when_the_earlier_calls_outcome_is_unknown():
    assert after_refusal(None, attempts=1, max_attempts=5, now=NOW, draw=0.0) == Fail("taken_over")
