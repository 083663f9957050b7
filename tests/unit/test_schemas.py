import json
from datetime import UTC, datetime, timedelta

import pytest
from structlog.testing import capture_logs

import shared.schemas
from shared.errors import InvalidMessage
from shared.metrics import UNKNOWN_FIELDS
from shared.schemas import (
    MAX_MESSAGE_BYTES,
    CancelRequested,
    FollowupRequested,
    LifecycleEvent,
    ResponseReceived,
    TimerMessage,
    parse_inbound,
    parse_timer,
)


def request(**overrides):
    body = {
        "contractor_id": 7,
        "scheduled_time": (datetime.now(UTC) + timedelta(minutes=5)).isoformat(),
        "followup_type": "check_in",
        "message_template": "Hi {first_name}",
    }
    body.update(overrides)
    return json.dumps(body).encode()


def nested(depth: int) -> dict[str, object]:
    value: dict[str, object] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def test_valid_request_takes_defaults():
    parsed = parse_inbound("followup.requested", request(), "application/json")
    assert isinstance(parsed, FollowupRequested)
    assert parsed.message_tone == "friendly"
    assert parsed.priority == 0
    assert parsed.ai_context_hints == {}
    assert parsed.scheduled_time.tzinfo is not None


def _unknown(command: str, field: str) -> float:
    return UNKNOWN_FIELDS.labels(command, field)._value.get()


def test_an_unknown_field_is_ignored_counted_and_logged_once(monkeypatch):
    monkeypatch.setattr(shared.schemas, "_unknown_seen", set())
    before = _unknown("followup.requested", "send_via")
    with capture_logs() as logs:
        for _ in range(3):
            parsed = parse_inbound("followup.requested", request(send_via="pigeon"), None)
    assert isinstance(parsed, FollowupRequested)
    assert "send_via" not in parsed.model_dump()
    assert _unknown("followup.requested", "send_via") == before + 3
    assert [(log["event"], log["field"]) for log in logs] == [("unknown field ignored", "send_via")]


@pytest.mark.parametrize("name", ["Send-Via", "!" + "x" * 41, "naïve", "", "a.b"])
def test_an_unknown_field_outside_the_label_pattern_is_counted_as_other(monkeypatch, name):
    monkeypatch.setattr(shared.schemas, "_unknown_seen", set())
    before = _unknown("followup.cancel_requested", "other")
    parse_inbound(
        "followup.cancel_requested", json.dumps({"followup_id": 1, name: 1}).encode(), None
    )
    assert _unknown("followup.cancel_requested", "other") == before + 1


def test_a_long_unknown_field_name_is_truncated_to_forty_characters(monkeypatch):
    monkeypatch.setattr(shared.schemas, "_unknown_seen", set())
    name = "a" * 60
    before = _unknown("followup.cancel_requested", "a" * 40)
    parse_inbound(
        "followup.cancel_requested", json.dumps({"followup_id": 1, name: 1}).encode(), None
    )
    assert _unknown("followup.cancel_requested", "a" * 40) == before + 1


def test_the_unknown_field_labels_are_bounded(monkeypatch):
    monkeypatch.setattr(shared.schemas, "_unknown_seen", set())
    names = ["f_" + "".join(chr(97 + int(d)) for d in f"{i:03d}") for i in range(80)]
    before = _unknown("followup.response_received", "other")
    with capture_logs() as logs:
        for name in names:
            body = {"contractor_id": 1, "text": "hi", name: True}
            parse_inbound("followup.response_received", json.dumps(body).encode(), None)
    assert len(shared.schemas._unknown_seen) == shared.schemas.MAX_UNKNOWN_FIELD_LABELS + 1
    assert _unknown("followup.response_received", "other") == before + 30
    assert len(logs) == shared.schemas.MAX_UNKNOWN_FIELD_LABELS + 1


def test_an_unknown_field_does_not_hide_a_bad_known_one():
    with pytest.raises(InvalidMessage) as caught:
        parse_inbound("followup.requested", request(send_via="pigeon", priority=10), None)
    assert caught.value.rule == "schema"
    assert "priority" in caught.value.detail


def test_offset_other_than_utc_is_kept_as_the_same_instant():
    parsed = parse_inbound(
        "followup.requested", request(scheduled_time="2030-01-01T09:00:00-05:00"), None
    )
    assert parsed.scheduled_time == datetime(2030, 1, 1, 14, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("routing_key", "body", "content_type", "rule"),
    [
        ("followup.requested", request(scheduled_time="2030-01-01T09:00:00"), None, "schema"),
        ("followup.requested", request(contractor_id="7"), None, "schema"),
        ("followup.requested", request(contractor_id=True), None, "schema"),
        ("followup.requested", request(contractor_id=0), None, "schema"),
        ("followup.requested", request(priority=10), None, "schema"),
        ("followup.requested", request(message_template=""), None, "schema"),
        ("followup.requested", request(message_template="x" * 1601), None, "schema"),
        ("followup.requested", request(followup_type="t" * 65), None, "schema"),
        ("followup.requested", request(idempotency_key="k" * 201), None, "schema"),
        ("followup.requested", request(skip_if_completed=True), None, "schema"),
        ("followup.requested", request(is_recurring=True), None, "schema"),
        (
            "followup.requested",
            request(is_recurring=True, recurrence_interval_days=0),
            None,
            "schema",
        ),
        ("followup.requested", request(scheduled_time="1999-01-01T00:00:00Z"), None, "schema"),
        ("followup.requested", request(scheduled_time="2090-01-01T00:00:00Z"), None, "schema"),
        ("followup.requested", request(ai_context_hints={"note": "x" * 5000}), None, "schema"),
        ("followup.requested", b"{not json", None, "malformed_json"),
        ("followup.requested", b"\xff\xfe", None, "malformed_json"),
        ("followup.requested", b"[1, 2]", None, "malformed_json"),
        ("followup.requested", request(), "text/plain", "content_type"),
        ("followup.requested", b" " * (MAX_MESSAGE_BYTES + 1), None, "too_large"),
        ("followup.deleted", request(), None, "unknown_routing_key"),
        ("followup.cancel_requested", b"{}", None, "schema"),
        (
            "followup.cancel_requested",
            b'{"followup_id": 1, "idempotency_key": "a"}',
            None,
            "schema",
        ),
        ("followup.response_received", b'{"text": "yes"}', None, "schema"),
        ("followup.response_received", b'{"phone": "555-1234", "text": "yes"}', None, "schema"),
        # The E.164 pattern matches, but no country has code 999: libphonenumber can't read it.
        ("followup.response_received", b'{"phone": "+999123456", "text": "yes"}', None, "schema"),
        ("followup.requested", request(), "application/json; charset=latin-1", "content_type"),
        ("followup.requested", request(), "application/jsonx", "content_type"),
        ("followup.requested", request(), "text/json; charset=utf-8", "content_type"),
        ("followup.requested", request(ai_context_hints=nested(40)), None, "too_deep"),
    ],
)
def test_bad_messages_name_the_rule(routing_key, body, content_type, rule):
    with pytest.raises(InvalidMessage) as caught:
        parse_inbound(routing_key, body, content_type)
    assert caught.value.rule == rule
    assert caught.value.detail


def test_error_detail_never_echoes_the_input():
    with pytest.raises(InvalidMessage) as caught:
        parse_inbound("followup.requested", request(contractor_id="+14155552671"), None)
    assert "4155552671" not in caught.value.detail


def test_cancel_and_response_accept_either_reference():
    assert isinstance(
        parse_inbound("followup.cancel_requested", b'{"idempotency_key": "abc"}', None),
        CancelRequested,
    )
    parsed = parse_inbound(
        "followup.response_received", b'{"phone": "+14155552671", "text": "STOP"}', None
    )
    assert isinstance(parsed, ResponseReceived)


def test_lifecycle_event_has_no_phone_or_text_fields():
    fields = set(LifecycleEvent.model_fields)
    assert {"followup_id", "contractor_id", "followup_type", "status", "occurred_at"} <= fields
    assert not fields & {"phone", "message", "text", "message_template", "prepared_text"}


def test_timer_message_round_trip_and_rejects_junk():
    message = TimerMessage(
        kind="dispatch", followup_id=3, version=2, fire_at=datetime(2030, 1, 1, tzinfo=UTC)
    )
    assert parse_timer(message.model_dump_json().encode()) == message
    with pytest.raises(InvalidMessage) as caught:
        parse_timer(b'{"kind": "dispatch"}')
    assert caught.value.rule == "timer_schema"


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "",
        "application/json",
        "application/json; charset=utf-8",
        'Application/JSON; Charset="UTF-8"',
        "application/json;charset=utf-8; profile=followups",
    ],
)
def test_json_content_types_are_accepted(content_type):
    assert isinstance(
        parse_inbound("followup.requested", request(), content_type), FollowupRequested
    )


def test_nesting_up_to_the_limit_is_accepted_and_one_more_level_is_refused():
    # The body is level 1, the hints object level 2.
    ok = parse_inbound("followup.requested", request(ai_context_hints=nested(31)), None)
    assert isinstance(ok, FollowupRequested)
    with pytest.raises(InvalidMessage) as caught:
        parse_inbound("followup.requested", request(ai_context_hints=nested(32)), None)
    assert caught.value.rule == "too_deep"
    # Lists count as levels too: hints at 2, then 30 lists down to level 32.
    lists = json.loads("[" * 30 + "]" * 30)
    ok = parse_inbound("followup.requested", request(ai_context_hints={"a": lists}), None)
    assert isinstance(ok, FollowupRequested)
    with pytest.raises(InvalidMessage) as caught:
        parse_inbound("followup.requested", request(ai_context_hints={"a": [lists]}), None)
    assert caught.value.rule == "too_deep"


def _outcome_from_stack_depth(frames: int, body: bytes) -> str:
    if frames:
        return _outcome_from_stack_depth(frames - 1, body)
    try:
        parse_inbound("followup.requested", body, None)
    except InvalidMessage as exc:
        return exc.rule
    return "parsed"


@pytest.mark.parametrize("frames", [0, 200, 500, 800])
def test_no_nesting_ever_escapes_as_a_recursion_error(frames):
    """However deep the caller's stack (a service's is deeper than a test's), a nested body is
    either parsed or refused with a rule, never a RecursionError that would be retried."""
    deadline = datetime.now(UTC) + timedelta(minutes=5)
    outcomes = set()
    for depth in range(1, 1000, 3):
        body = (
            b'{"contractor_id": 7, "scheduled_time": "%s", "followup_type": "x",'
            b' "message_template": "Hi", "ai_context_hints": {"a": %s%s}}'
            % (deadline.isoformat().encode(), b"[" * depth, b"]" * depth)
        )
        outcomes.add(_outcome_from_stack_depth(frames, body))
    assert outcomes <= {"parsed", "too_deep", "malformed_json"}
    assert {"parsed", "too_deep"} <= outcomes
