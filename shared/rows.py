"""The row model: a follow-up occurrence and the contractor, action item and event its text is
built from, as typed rows. Each select list comes from its dataclass's fields, so a renamed
column is a renamed field that strict mypy follows everywhere it is read."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from datetime import date, datetime
from typing import Any, ClassVar, Self
from uuid import UUID

import asyncpg

from shared.schemas import Status
from shared.templates import TemplateContext

# A follow-up still to send. It is cancellable at once unless its webhook call is under way; a
# cancel (or reschedule) that comes during the call is kept and decided when the call ends.
PENDING_STATUSES = (Status.SCHEDULED, Status.SENDING)


def pending(alias: str) -> str:
    return f"{alias}.status IN ('scheduled', 'sending')"


def cancellable(alias: str) -> str:
    """A pending row that can be ended now: no webhook call of it is under way."""
    return f"({pending(alias)} AND {alias}.calling_since IS NULL)"


_NAMES: dict[type, tuple[str, ...]] = {}  # each row class's field names, read once


class Columns:
    """A row dataclass read from a record by its field names. `COMPUTED` holds the fields that are
    an expression over the table (`{t}` the table's alias) rather than a column."""

    COMPUTED: ClassVar[Mapping[str, str]] = {}

    @classmethod
    def names(cls) -> tuple[str, ...]:
        names = _NAMES.get(cls)
        if names is None:
            names = _NAMES[cls] = tuple(field.name for field in fields(cls))  # type: ignore[arg-type]
        return names

    @classmethod
    def select_list(cls, alias: str, prefix: str = "") -> str:
        """Every field as `alias.name AS prefix + name`, computed ones as their expression."""
        return ", ".join(
            f"{cls.COMPUTED[name].format(t=alias) if name in cls.COMPUTED else f'{alias}.{name}'}"
            f" AS {prefix}{name}"
            for name in cls.names()
        )

    @classmethod
    def from_record(cls, record: Mapping[str, Any], prefix: str = "") -> Self:
        values = {name: record[prefix + name] for name in cls.names()}
        cls.coerce(values)
        return cls(**values)

    @classmethod
    def coerce(cls, values: dict[str, Any]) -> None:
        """Turn a record's plain values into the field types (in place)."""

    @classmethod
    def from_joined(cls, record: Mapping[str, Any], prefix: str) -> Self | None:
        """The row of a LEFT JOIN, None when it matched nothing."""
        return None if record[f"{prefix}id"] is None else cls.from_record(record, prefix)


@dataclass(frozen=True)
class Followup(Columns):
    id: int
    contractor_id: int
    action_item_id: int | None
    event_id: int | None
    scheduled_time: datetime
    followup_type: str
    message_template: str
    message_tone: str
    status: Status
    sent_at: datetime | None
    sent_by: str | None
    response_received_at: datetime | None
    response_text: str | None
    ai_should_personalize: bool
    ai_context_hints: dict[str, Any]
    skip_if_completed: bool
    is_recurring: bool
    recurrence_interval_days: int | None
    next_occurrence_id: int | None
    created_at: datetime
    updated_at: datetime
    idempotency_key: str
    send_key: UUID
    version: int
    priority: int
    requested_by: str | None
    series_id: int | None
    status_reason: str | None
    prepared_text: str | None
    prepared_version: int | None
    prepared_at: datetime | None
    text_source: str | None
    text_fallback_reason: str | None
    ai_model: str | None
    prompt_variant: str | None
    attempts: int
    next_attempt_at: datetime | None
    last_error: str | None
    claimed_at: datetime | None
    lease_until: datetime | None
    webhook_started_at: datetime | None
    lateness_ms: float | None
    deferred_until: datetime | None
    deferred_reason: str | None
    calling_since: datetime | None
    occurrence: int
    claim_id: UUID | None  # the dispatcher claim that owns the send, while `sending`
    cancel_requested_at: datetime | None  # a cancel that came during a call, decided after it
    cancel_reason: str | None
    reschedule_to: datetime | None  # likewise a reschedule
    waiting_since: datetime | None  # waiting for a place in the global send window
    # the SMS provider's latest report on the occurrence (followup.delivery_reported)
    delivery_status: str | None = None
    delivery_error_code: str | None = None
    delivery_reported_at: datetime | None = None

    @classmethod
    def coerce(cls, values: dict[str, Any]) -> None:
        values["status"] = Status(values["status"])

    @property
    def text_is_ready(self) -> bool:
        return self.prepared_text is not None and self.prepared_version == self.version


@dataclass(frozen=True)
class Contractor(Columns):
    id: int
    first_name: str | None
    last_name: str | None
    company_name: str | None
    phone: str | None
    timezone: str | None
    sms_opt_out: bool
    # a permanent delivery failure for the phone the contractor still has
    undeliverable: bool | None = None

    COMPUTED: ClassVar[Mapping[str, str]] = {
        "undeliverable": "regexp_replace({t}.undeliverable_phone, '[^0-9]', '', 'g')"
        " = regexp_replace({t}.phone, '[^0-9]', '', 'g')"
    }


@dataclass(frozen=True)
class ActionItem(Columns):
    id: int
    contractor_id: int
    title: str | None
    description: str | None
    due_date: date | datetime | None
    status: str | None

    @property
    def completed(self) -> bool:
        return self.status == "completed"


@dataclass(frozen=True)
class Event(Columns):
    id: int
    name: str | None
    event_date: date | datetime | None
    location: str | None


@dataclass(frozen=True)
class SendContext:
    """The rows a follow-up's text is built from."""

    contractor: Contractor
    action_item: ActionItem | None
    event: Event | None

    def template_context(self) -> TemplateContext:
        """The rows as the mappings templates and prompts read placeholders from."""
        return TemplateContext(
            asdict(self.contractor),
            asdict(self.action_item) if self.action_item else None,
            asdict(self.event) if self.event else None,
        )


# Joined to a follow-up `f` as c, a and e, the send context's columns prefixed c_, a_ and e_.
CONTEXT_SELECT = ", ".join(
    [
        Contractor.select_list("c", "c_"),
        ActionItem.select_list("a", "a_"),
        Event.select_list("e", "e_"),
    ]
)
CONTEXT_JOINS = """
    LEFT JOIN contractors AS c ON c.id = {f}.contractor_id
    LEFT JOIN contractor_action_items AS a ON a.id = {f}.action_item_id
    LEFT JOIN events AS e ON e.id = {f}.event_id"""


def context_from(record: Mapping[str, Any]) -> SendContext | None:
    """The send context of a record selected with CONTEXT_SELECT; None if the contractor is gone."""
    contractor = Contractor.from_joined(record, "c_")
    if contractor is None:
        return None
    return SendContext(
        contractor, ActionItem.from_joined(record, "a_"), Event.from_joined(record, "e_")
    )


def row_columns(alias: str) -> str:
    """Every column of a follow-up as `alias.name`, the fields `Followup` is built from."""
    return ", ".join(f"{alias}.{name}" for name in Followup.names())


COLUMNS = ", ".join(Followup.names())
SELECT = f"SELECT {COLUMNS} FROM contractor_followup_schedules"


@dataclass(frozen=True)
class Reference:
    """How a command names a follow-up: by id, or by the caller's idempotency key."""

    followup_id: int | None = None
    idempotency_key: str | None = None

    @property
    def stored_key(self) -> str | None:
        return f"key:{self.idempotency_key}" if self.idempotency_key else None


async def get_followup(pool: asyncpg.Pool, followup_id: int) -> Followup | None:
    record = await pool.fetchrow(f"{SELECT} WHERE id = $1", followup_id)
    return Followup.from_record(record) if record else None


async def find_followup(pool: asyncpg.Pool, reference: Reference) -> Followup | None:
    record = await pool.fetchrow(
        f"{SELECT} WHERE id = $1 OR idempotency_key = $2",
        reference.followup_id,
        reference.stored_key,
    )
    return Followup.from_record(record) if record else None
