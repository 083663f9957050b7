"""Scheduler decisions on fakes that subclass the real ports (no broker, no database)."""

import dataclasses
import json
from datetime import UTC, datetime, timedelta

import pytest

from services.scheduler.handlers import (
    INTAKE_LINGER_SECONDS,
    SchedulerDeps,
    handle,
    idempotency_key,
    opt_change,
)
from services.scheduler.repository import ResponseOutcome, SchedulerStore
from shared.consumer import Incoming
from shared.deliveries import CarrierCodes, DeliveryStore
from shared.errors import Rejected
from shared.rows import Followup, Reference
from shared.schemas import FollowupRequested, Status
from shared.send_rate import RatePolicy
from shared.timers import LevelsTimer

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def _row(status: Status = Status.SCHEDULED) -> Followup:
    values = {field.name: None for field in dataclasses.fields(Followup)}
    values.update(
        id=9,
        version=1,
        contractor_id=1,
        status=status,
        scheduled_time=NOW + timedelta(hours=1),
        ai_should_personalize=False,
        followup_type="t",
    )
    return Followup(**values)


class FakeStore(SchedulerStore):
    def __init__(self) -> None:
        super().__init__()
        self.cancelled: list[tuple[Reference, str]] = []
        self.responses: list[dict] = []
        self.stored: Followup | None = None
        self.lingers: list[float] = []

    async def insert(self, request, key, *, linger=0.0):
        self.lingers.append(linger)
        if self.stored is not None:
            return self.stored, False
        self.stored = _row()
        return self.stored, True

    async def cancel(self, reference, reason):
        self.cancelled.append((reference, reason))
        return []

    async def find(self, reference):
        return None

    async def record_response(self, **kwargs):
        self.responses.append(kwargs)
        return ResponseOutcome(None, None, [], kwargs["opt_out"])


class FakePublisher:
    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    def timers(self) -> list[str]:
        return [key for key, _ in self.published if key.endswith(".due")]

    async def publish(
        self, body, *, exchange, routing_key, headers=None, priority=None, mandatory=True
    ):
        self.published.append((routing_key, body))


@pytest.fixture
def deps():
    publisher = FakePublisher()
    return SchedulerDeps(
        store=FakeStore(),
        timer=LevelsTimer(publisher, lambda: NOW),
        publisher=publisher,
        personalize_lead=timedelta(seconds=60),
        dispatch_margin=timedelta(milliseconds=250),
        clock=lambda: NOW,
        deliveries=DeliveryStore(None, RatePolicy(10), CarrierCodes(frozenset(), frozenset())),
    )


def _request(**extra) -> FollowupRequested:
    return FollowupRequested.model_validate(
        {
            "contractor_id": 1,
            "scheduled_time": (datetime.now(UTC) + timedelta(hours=1)).isoformat(),
            "followup_type": "t",
            "message_template": "Hi",
            **extra,
        }
    )


def test_idempotency_key_prefers_the_callers_key_then_the_message_id_then_the_content():
    body = b'{"a": 1}'
    assert (
        idempotency_key(_request(idempotency_key="k"), Incoming(body, "r", message_id="m"))
        == "key:k"
    )
    assert idempotency_key(_request(), Incoming(body, "r", message_id="m")) == "message-id:m"
    by_content = idempotency_key(_request(), Incoming(body, "r"))
    assert by_content.startswith("sha256:")
    assert by_content == idempotency_key(_request(), Incoming(body, "r", redelivered=True))


@pytest.mark.parametrize(
    ("text", "change"),
    [
        ("STOP", True),
        (" stop ", True),
        ("Unsubscribe.", True),
        ("quit!", True),
        ("START", False),
        ("unstop", False),
        ("stop by at 5", None),
        ("Thanks!", None),
        ("", None),
    ],
)
def test_only_a_whole_reply_is_an_opt_out_keyword(text, change):
    assert opt_change(text) is change


async def test_cancel_is_routed_with_its_reason(deps):
    body = json.dumps({"idempotency_key": "abc", "reason": "moved"}).encode()
    await handle(Incoming(body, "followup.cancel_requested"), deps)
    assert deps.store.cancelled == [(Reference(None, "abc"), "moved")]
    assert deps.store.cancelled[0][0].stored_key == "key:abc"


async def test_a_response_from_an_unknown_sender_is_rejected(deps):
    body = json.dumps({"phone": "+14155552671", "text": "STOP"}).encode()
    with pytest.raises(Rejected) as caught:
        await handle(Incoming(body, "followup.response_received"), deps)
    assert caught.value.rule == "unknown_reference"
    assert deps.store.responses[0]["opt_out"] is True
    assert "4155552671" not in caught.value.detail


def _requested(
    redelivered: bool = False, scheduled_time: datetime = NOW + timedelta(hours=1)
) -> Incoming:
    body = json.dumps(
        {
            "idempotency_key": "once",
            "contractor_id": 1,
            "scheduled_time": scheduled_time.isoformat(),
            "followup_type": "t",
            "message_template": "Hi",
        }
    ).encode()
    return Incoming(body, "followup.requested", redelivered=redelivered)


async def test_timers_are_armed_once_the_row_is_stored(deps):
    await handle(_requested(), deps)
    [send] = deps.publisher.timers()
    assert send.endswith(".followups.dispatcher.due")


async def test_a_request_with_time_to_spare_may_wait_for_company_and_one_due_now_may_not(deps):
    await handle(_requested(), deps)
    deps.store.stored = None
    await handle(_requested(scheduled_time=NOW), deps)
    assert deps.store.lingers == [INTAKE_LINGER_SECONDS, 0.0]


async def test_a_duplicate_request_arms_nothing(deps):
    await handle(_requested(), deps)
    await handle(_requested(), deps)
    assert len(deps.publisher.timers()) == 1


async def test_a_redelivered_request_arms_its_timers_again_and_announces_it(deps):
    # The first delivery stored the row, then the service stopped before it armed the timers
    # or published its event.
    deps.store.stored = _row()
    await handle(_requested(redelivered=True), deps)
    assert len(deps.publisher.timers()) == 1
    assert [key for key, _ in deps.publisher.published if key == "followup.scheduled"] == [
        "followup.scheduled"
    ]


async def test_a_duplicate_request_is_not_announced_again(deps):
    await handle(_requested(), deps)
    await handle(_requested(), deps)
    assert [key for key, _ in deps.publisher.published].count("followup.scheduled") == 1


async def test_a_redelivered_request_for_a_row_that_moved_on_arms_nothing(deps):
    deps.store.stored = _row(Status.SENT)
    await handle(_requested(redelivered=True), deps)
    assert deps.publisher.timers() == []
