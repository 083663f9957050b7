"""Property tests: whatever arrives, the edge answers with InvalidMessage or a valid command, and a
template accepted at scheduling time always renders at send time."""

from __future__ import annotations

import json
import math
from datetime import UTC, date, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from shared.errors import InvalidMessage
from shared.schemas import INBOUND, MAX_MESSAGE_BYTES, parse_inbound
from shared.templates import (
    PLACEHOLDERS,
    TemplateContext,
    TemplateError,
    check_template,
    placeholders,
    render,
)

# Deterministic and quick: the same examples on every run, nothing stored between runs.
FUZZ = settings(
    max_examples=150,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

ROUTING_KEYS = st.one_of(st.sampled_from(sorted(INBOUND)), st.text(max_size=40))
CONTENT_TYPES = st.one_of(
    st.none(), st.sampled_from(["application/json", "", "text/plain"]), st.text(max_size=30)
)
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**62, max_value=2**80),
    st.floats(),
    st.text(max_size=50),
    st.sampled_from(["\x00", "a\x00b", "\ud800", "x\udfffy"]),  # PostgreSQL refuses these
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)


def _parse(routing_key: str, body: bytes, content_type: str | None) -> None:
    """The property itself: a model comes back, or InvalidMessage with a rule and a reason."""
    try:
        outcome: object = parse_inbound(routing_key, body, content_type)
    except InvalidMessage as exc:
        outcome = exc
    if isinstance(outcome, InvalidMessage):
        assert outcome.rule
        assert outcome.detail
    else:
        assert isinstance(outcome, INBOUND[routing_key])
        _assert_storable(outcome.model_dump())


def _assert_storable(value: Any) -> None:
    """Whatever the edge accepts, PostgreSQL can store: else it would fail at INSERT, retried."""
    if isinstance(value, dict):
        for key, item in value.items():
            _assert_storable(key)
            _assert_storable(item)
    elif isinstance(value, list):
        for item in value:
            _assert_storable(item)
    elif isinstance(value, str):
        assert "\x00" not in value
        value.encode()
    elif isinstance(value, bool):
        pass
    elif isinstance(value, int):
        assert -(2**63) <= value < 2**63
    elif isinstance(value, float):
        assert math.isfinite(value)


@FUZZ
@given(routing_key=ROUTING_KEYS, body=st.binary(max_size=2048), content_type=CONTENT_TYPES)
@example("followup.requested", b"[" * 5000, "application/json")
@example("followup.requested", b'{"a":' * 3000, "application/json")
@example("followup.requested", b'{"contractor_id": ' + b"9" * 5000 + b"}", None)
@example("followup.requested", b"\xff\xfe{}", None)
@example("followup.requested", b" " * (MAX_MESSAGE_BYTES + 1), None)
@example("followup.requested", b"NaN", None)
def test_arbitrary_bytes(routing_key: str, body: bytes, content_type: str | None) -> None:
    _parse(routing_key, body, content_type)


@FUZZ
@given(
    routing_key=st.sampled_from(sorted(INBOUND)),
    data=st.dictionaries(st.text(max_size=30), JSON_VALUES, max_size=8),
)
def test_arbitrary_json_objects(routing_key: str, data: dict[str, Any]) -> None:
    _parse(routing_key, json.dumps(data).encode(), "application/json")


def _moment(offset: timedelta) -> str:
    return (datetime.now(UTC) + offset).isoformat()


VALID: dict[str, dict[str, Any]] = {
    "followup.requested": {
        "idempotency_key": "fuzz-1",
        "contractor_id": 7,
        "scheduled_time": _moment(timedelta(hours=1)),
        "followup_type": "check_in",
        "message_template": "Hi {first_name}, about {action_item}.",
        "action_item_id": 3,
        "event_id": None,
        "ai_should_personalize": True,
        "ai_context_hints": {"tone": "warm"},
        "skip_if_completed": True,
        "is_recurring": True,
        "recurrence_interval_days": 7,
        "priority": 5,
        "requested_by": "ai_concierge",
    },
    "followup.cancel_requested": {"followup_id": 4, "reason": "done"},
    "followup.reschedule_requested": {
        "idempotency_key": "fuzz-1",
        "scheduled_time": _moment(timedelta(days=2)),
    },
    "followup.response_received": {"phone": "+14155552671", "text": "STOP", "followup_id": 4},
}

TIMESTAMPS = st.one_of(
    st.datetimes().map(datetime.isoformat),  # naive
    st.datetimes(timezones=st.timezones()).map(datetime.isoformat),
    st.datetimes(
        min_value=datetime(1, 1, 2),
        max_value=datetime(9999, 12, 30),
        timezones=st.just(UTC),
    ).map(lambda moment: moment.isoformat().replace("+00:00", "Z")),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.text(max_size=40),
)


@st.composite
def near_valid(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A valid command with one to three fields dropped, retyped or added."""
    routing_key = draw(st.sampled_from(sorted(VALID)))
    body = dict(VALID[routing_key])
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        field = draw(st.sampled_from([*sorted(body), "unexpected"]))
        action = draw(st.sampled_from(["drop", "value", "timestamp", "long_text"]))
        if action == "drop":
            body.pop(field, None)
        elif action == "value":
            body[field] = draw(JSON_VALUES)
        elif action == "timestamp":
            body[field] = draw(TIMESTAMPS)
        else:
            body[field] = draw(st.text(min_size=190, max_size=1700))
    return routing_key, body


@FUZZ
@given(command=near_valid())
@example(("followup.requested", {**VALID["followup.requested"], "contractor_id": 2**70}))
@example(("followup.requested", {**VALID["followup.requested"], "ai_context_hints": [1]}))
@example(("followup.requested", {**VALID["followup.requested"], "contractor_id": 2**63}))
@example(("followup.requested", {**VALID["followup.requested"], "message_template": "a\x00"}))
@example(("followup.requested", {**VALID["followup.requested"], "followup_type": "\ud800"}))
@example(("followup.requested", {**VALID["followup.requested"], "ai_context_hints": {"\udc00": 1}}))
@example(("followup.requested", {**VALID["followup.requested"], "ai_context_hints": {"x": 1e400}}))
@example(("followup.requested", {**VALID["followup.requested"], "scheduled_time": 1_800_000_000}))
@example(("followup.requested", {**VALID["followup.requested"], "scheduled_time": "1800000000"}))
@example(("followup.response_received", {"contractor_id": 1, "text": "STOP\x00"}))
@example(("followup.response_received", {"phone": "+1 415 555 2671", "text": "hi"}))
def test_near_valid_commands(command: tuple[str, dict[str, Any]]) -> None:
    routing_key, body = command
    _parse(routing_key, json.dumps(body).encode(), "application/json")


def test_the_valid_commands_used_above_are_accepted() -> None:
    for routing_key, body in VALID.items():
        assert isinstance(
            parse_inbound(routing_key, json.dumps(body).encode(), None), INBOUND[routing_key]
        )


# Templates: arbitrary text, with placeholders (known, unknown, malformed) mixed in often.
TEMPLATE_PIECES = st.one_of(
    st.text(max_size=20),
    st.sampled_from(sorted(PLACEHOLDERS)).map(lambda name: "{" + name + "}"),
    st.sampled_from(
        [
            "{",
            "}",
            "{{",
            "}}",
            "{}",
            "{0}",
            "{first_name!r}",
            "{first_name:>10}",
            "{first_name.upper}",
            "{event_name[0]}",
            "{first_name:{last_name}}",
            "{ first_name }",
        ]
    ),
)
TEMPLATES = st.lists(TEMPLATE_PIECES, max_size=8).map("".join)
CELL = st.one_of(
    st.none(), st.text(max_size=30), st.integers(), st.dates(), st.datetimes(), st.booleans()
)


def _row(columns: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional={column: CELL for column in columns})


def _needs(source: str) -> set[str]:
    return {name for name, (where, _) in PLACEHOLDERS.items() if where == source}


def _columns(source: str) -> list[str]:
    return sorted({column for where, column in PLACEHOLDERS.values() if where == source})


CONTEXTS = st.builds(
    TemplateContext,
    contractor=_row(_columns("contractor")),
    action_item=st.one_of(st.none(), _row(_columns("action_item"))),
    event=st.one_of(st.none(), _row(_columns("event"))),
)


@FUZZ
@given(template=TEMPLATES, has_action_item=st.booleans(), has_event=st.booleans())
def test_template_checks_raise_only_template_error(
    template: str, has_action_item: bool, has_event: bool
) -> None:
    try:
        names = placeholders(template)
    except TemplateError:
        return
    assert names <= PLACEHOLDERS.keys()
    try:
        check_template(template, has_action_item=has_action_item, has_event=has_event)
    except TemplateError:
        return
    assert not (names & _needs("action_item")) or has_action_item
    assert not (names & _needs("event")) or has_event


@FUZZ
@given(template=TEMPLATES, context=CONTEXTS)
def test_a_template_accepted_at_scheduling_time_renders_at_send_time(
    template: str, context: TemplateContext
) -> None:
    try:
        check_template(
            template,
            has_action_item=context.action_item is not None,
            has_event=context.event is not None,
        )
    except TemplateError:
        return
    text = render(template, context)
    assert isinstance(text, str)


@FUZZ
@given(template=st.text(max_size=200), context=CONTEXTS)
@example("{first_name}", TemplateContext({"first_name": date(2026, 1, 2)}))
def test_render_raises_only_template_error(template: str, context: TemplateContext) -> None:
    try:
        text = render(template, context)
    except TemplateError:
        return
    assert isinstance(text, str)
