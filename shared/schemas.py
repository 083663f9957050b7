"""Wire formats: inbound commands, outbound lifecycle events and timer messages (README:
Publishing a follow-up)."""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from shared.errors import InvalidMessage
from shared.logging import get_logger
from shared.metrics import UNKNOWN_FIELDS
from shared.phones import check_e164

_log = get_logger("followups.schemas")

MAX_MESSAGE_BYTES = 16 * 1024
MAX_HINTS_BYTES = 4 * 1024
# No command needs more, and anything deeper is refused before any code walks it recursively
# (json.dumps, the jsonb codec), where a RecursionError would look like a failure worth retrying.
MAX_JSON_DEPTH = 32
# Far enough to catch a unit mix-up (seconds read as milliseconds), near enough for any real plan.
MAX_PAST = timedelta(days=365)
MAX_FUTURE = timedelta(days=3650)
# A provider's clock may run a little ahead of ours; a report from further ahead is a bad time.
REPORT_CLOCK_SLACK = timedelta(minutes=5)

PositiveId = Annotated[int, Field(gt=0, le=2**63 - 1, strict=True)]  # a PostgreSQL bigint
E164 = Annotated[str, StringConstraints(pattern=r"^\+[1-9]\d{6,14}$"), AfterValidator(check_e164)]
_RFC3339_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]")


def _rfc3339_text(value: object) -> object:
    # pydantic would also read a number (or a string of digits) as Unix seconds or milliseconds,
    # guessing the unit; the contract asks for RFC 3339 text, which leaves nothing to guess.
    if isinstance(value, datetime) or (isinstance(value, str) and _RFC3339_DATE.match(value)):
        return value
    raise ValueError("write RFC 3339 text with an offset, such as 2026-12-01T09:00:00-05:00")


Timestamp = Annotated[AwareDatetime, BeforeValidator(_rfc3339_text)]


class Status(StrEnum):
    SCHEDULED = "scheduled"
    SENDING = "sending"
    SENT = "sent"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"
    FAILED = "failed"


class _Inbound(BaseModel):
    # Unknown fields are ignored (and counted by parse_inbound): a publisher may add a field
    # before this system knows it. A change old readers would misread takes a new routing key.
    model_config = ConfigDict(extra="ignore", frozen=True, str_strip_whitespace=True)


def _check_time_window(moment: datetime, now: datetime) -> None:
    if moment < now - MAX_PAST:
        raise ValueError("scheduled_time is more than a year in the past")
    if moment > now + MAX_FUTURE:
        raise ValueError("scheduled_time is more than ten years ahead")


class FollowupRequested(_Inbound):
    idempotency_key: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = None
    contractor_id: PositiveId
    scheduled_time: Timestamp
    followup_type: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    message_template: Annotated[str, StringConstraints(min_length=1, max_length=1600)]
    message_tone: Annotated[str, StringConstraints(min_length=1, max_length=64)] = "friendly"
    action_item_id: PositiveId | None = None
    event_id: PositiveId | None = None
    ai_should_personalize: bool = False
    ai_context_hints: dict[str, Any] = Field(default_factory=dict)
    skip_if_completed: bool = False
    is_recurring: bool = False
    recurrence_interval_days: Annotated[int, Field(ge=1, le=3650, strict=True)] | None = None
    priority: Annotated[int, Field(ge=0, le=9, strict=True)] = 0
    requested_by: Annotated[str, StringConstraints(max_length=200)] | None = None

    @model_validator(mode="after")
    def _rules(self) -> Self:
        if self.skip_if_completed and self.action_item_id is None:
            raise ValueError("skip_if_completed needs action_item_id")
        if self.is_recurring and self.recurrence_interval_days is None:
            raise ValueError("is_recurring needs recurrence_interval_days")
        if len(json.dumps(self.ai_context_hints).encode()) > MAX_HINTS_BYTES:
            raise ValueError(f"ai_context_hints is larger than {MAX_HINTS_BYTES} bytes")
        _check_time_window(self.scheduled_time, datetime.now(UTC))
        return self


class _ByReference(_Inbound):
    followup_id: PositiveId | None = None
    idempotency_key: Annotated[str, StringConstraints(min_length=1, max_length=200)] | None = None

    @model_validator(mode="after")
    def _one_reference(self) -> Self:
        if (self.followup_id is None) == (self.idempotency_key is None):
            raise ValueError("give exactly one of followup_id or idempotency_key")
        return self


class CancelRequested(_ByReference):
    reason: Annotated[str, StringConstraints(max_length=500)] | None = None


class RescheduleRequested(_ByReference):
    scheduled_time: Timestamp

    @model_validator(mode="after")
    def _window(self) -> Self:
        _check_time_window(self.scheduled_time, datetime.now(UTC))
        return self


class ResponseReceived(_Inbound):
    contractor_id: PositiveId | None = None
    phone: E164 | None = None
    text: Annotated[str, StringConstraints(max_length=1600)]
    received_at: Timestamp | None = None
    followup_id: PositiveId | None = None

    @model_validator(mode="after")
    def _sender(self) -> Self:
        if self.contractor_id is None and self.phone is None:
            raise ValueError("give contractor_id or phone")
        return self


class DeliveryStatus(StrEnum):
    DELIVERED = "delivered"
    UNDELIVERED = "undelivered"
    FAILED = "failed"


class DeliveryReported(_Inbound):
    """The gateway's word on one occurrence, from the SMS provider's status callback."""

    # The webhook call's Idempotency-Key: the occurrence's send key.
    idempotency_key: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    status: DeliveryStatus
    error_code: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = None
    provider: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = None
    reported_at: Timestamp

    @model_validator(mode="after")
    def _window(self) -> Self:
        now = datetime.now(UTC)
        if self.reported_at < now - MAX_PAST:
            raise ValueError("reported_at is more than a year in the past")
        if self.reported_at > now + REPORT_CLOCK_SLACK:
            raise ValueError("reported_at is in the future")
        return self


INBOUND: dict[str, type[_Inbound]] = {
    "followup.requested": FollowupRequested,
    "followup.cancel_requested": CancelRequested,
    "followup.reschedule_requested": RescheduleRequested,
    "followup.response_received": ResponseReceived,
    "followup.delivery_reported": DeliveryReported,
}


_FIELD_LABEL = re.compile(r"[a-z_]{1,40}")
# Distinct field names kept as labels per process; any further one is counted as "other", so
# a publisher sending random names can't grow the metric without bound.
MAX_UNKNOWN_FIELD_LABELS = 50
_unknown_seen: set[tuple[str, str]] = set()


def _note_unknown_fields(routing_key: str, schema: type[_Inbound], data: dict[str, Any]) -> None:
    """Count the fields `schema` does not know, and log each name the first time it is seen."""
    for name in data.keys() - schema.model_fields.keys():
        label = name[:40] if _FIELD_LABEL.fullmatch(name[:40]) else "other"
        if (routing_key, label) not in _unknown_seen:
            if len(_unknown_seen) >= MAX_UNKNOWN_FIELD_LABELS:
                label = "other"
            if (routing_key, label) not in _unknown_seen:
                _unknown_seen.add((routing_key, label))
                _log.info("unknown field ignored", command=routing_key, field=label)
        UNKNOWN_FIELDS.labels(routing_key, label).inc()


def _first_error(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False, include_input=False)[:3]:
        where = ".".join(str(p) for p in error["loc"]) or "message"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


def _unfit(data: object) -> InvalidMessage | None:
    """What PostgreSQL text and jsonb refuse, and nesting beyond MAX_JSON_DEPTH. Found here, the
    sender is told at once; found later, the message would be retried until the delivery limit."""
    pending: list[tuple[object, int]] = [(data, 1)]
    while pending:  # a loop, not recursion: the body may be nested as deep as json allows
        value, depth = pending.pop()
        if isinstance(value, dict | list) and depth > MAX_JSON_DEPTH:
            return InvalidMessage(
                "too_deep", f"nested more than {MAX_JSON_DEPTH} levels; flatten the body"
            )
        if isinstance(value, dict):
            pending.extend((key, depth) for key in value)
            pending.extend((item, depth + 1) for item in value.values())
        elif isinstance(value, list):
            pending.extend((item, depth + 1) for item in value)
        elif isinstance(value, str):
            if "\x00" in value:
                return _unstorable("a NUL character (\\u0000)")
            if not value.isascii():
                try:
                    value.encode()
                except UnicodeEncodeError:
                    return _unstorable("an unpaired UTF-16 surrogate")
        elif isinstance(value, float) and not math.isfinite(value):
            return _unstorable("NaN or Infinity")
    return None


def _unstorable(problem: str) -> InvalidMessage:
    return InvalidMessage("unstorable_value", f"the body holds {problem}; remove it")


def _check_content_type(content_type: str | None) -> None:
    """application/json, with at most a charset parameter, which must then be UTF-8."""
    if not content_type:
        return
    media_type, *parameters = (part.strip() for part in content_type.split(";"))
    if media_type.lower() != "application/json":
        raise InvalidMessage("content_type", f"{content_type!r}; send application/json")
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset" and value.strip().strip('"').lower() != "utf-8":
            raise InvalidMessage("content_type", f"{content_type!r}; the charset must be utf-8")


def parse_inbound(routing_key: str, body: bytes, content_type: str | None) -> _Inbound:
    """Validate one inbound message; InvalidMessage names the rule that failed."""
    if len(body) > MAX_MESSAGE_BYTES:
        raise InvalidMessage("too_large", f"{len(body)} bytes; the limit is {MAX_MESSAGE_BYTES}")
    schema = INBOUND.get(routing_key)
    if schema is None:
        raise InvalidMessage("unknown_routing_key", f"{routing_key!r} is not a followups command")
    _check_content_type(content_type)
    try:
        data = json.loads(body)
    # ValueError covers bad UTF-8, bad JSON and integers too long to convert; RecursionError,
    # nesting too deep for the decoder. Either way the sender must fix the body.
    except (ValueError, RecursionError) as exc:
        raise InvalidMessage(
            "malformed_json", f"not valid UTF-8 JSON ({exc.__class__.__name__})"
        ) from None
    if not isinstance(data, dict):
        raise InvalidMessage("malformed_json", "the body must be a JSON object")
    problem = _unfit(data)
    if problem is not None:
        raise problem
    _note_unknown_fields(routing_key, schema, data)
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise InvalidMessage("schema", _first_error(exc)) from None


class LifecycleEvent(BaseModel):
    """What the system publishes on exchange `followups`: never a phone number or message text."""

    model_config = ConfigDict(frozen=True)

    event: Literal[
        "followup.scheduled",
        "followup.sent",
        "followup.skipped",
        "followup.cancelled",
        "followup.failed",
        "followup.response_recorded",
        "followup.delivery_recorded",
        "followup.send_rate_changed",
    ]
    followup_id: int
    contractor_id: int
    followup_type: str
    status: Status
    occurred_at: datetime
    scheduled_time: datetime | None = None
    reason: str | None = None
    attempts: int | None = None
    lateness_ms: float | None = None
    next_occurrence_id: int | None = None
    requested_by: str | None = None
    delivery_status: DeliveryStatus | None = None
    error_code: str | None = None
    # followup.send_rate_changed: the new rate, the one before it and why
    limit_per_minute: int | None = None
    previous_limit_per_minute: int | None = None
    cause: str | None = None


class TimerKind(StrEnum):
    PERSONALIZE = "personalize"
    DISPATCH = "dispatch"
    # A dispatcher timer for a follow-up far ahead: at its lead time the dispatcher asks for the
    # text and arms the send (fire_at is the send's instant).
    LEAD = "lead"


class TimerMessage(BaseModel):
    """What a timer carries: the row and the version it was armed for, never the content."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: TimerKind
    followup_id: PositiveId
    version: Annotated[int, Field(ge=1)]
    fire_at: AwareDatetime
    attempt: Annotated[int, Field(ge=1)] = 1


def parse_timer(body: bytes) -> TimerMessage:
    try:
        return TimerMessage.model_validate_json(body)
    except ValidationError as exc:
        raise InvalidMessage("timer_schema", _first_error(exc)) from None
