"""Which timers a follow-up gets, on a recording publisher (no broker)."""

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest

from shared.pipeline import arm_after_lead, arm_followup, lead_timer_saves_work
from shared.rows import Followup
from shared.schemas import TimerKind, TimerMessage
from shared.timers import FIRE_AT_HEADER, WINDOW_HEADER, LevelsTimer, PluginTimer, to_epoch_ms
from shared.topology import DISPATCHER_DUE, PERSONALIZER_DUE, TIMER_DELIVER_EXCHANGE

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
LEAD = timedelta(seconds=60)
MARGIN = timedelta(milliseconds=250)


class RecordingPublisher:
    def __init__(self) -> None:
        self.published: list[dict] = []

    async def publish(
        self, body, *, exchange, routing_key, headers=None, priority=None, mandatory=True
    ):
        self.published.append(
            {
                "message": TimerMessage.model_validate_json(body),
                "exchange": exchange,
                "destination": routing_key.rsplit(".", 3)[-3:],
                "headers": headers,
            }
        )

    def destinations(self) -> list[tuple[str, TimerKind]]:
        return sorted((".".join(p["destination"]), p["message"].kind) for p in self.published)


def row(*, due: timedelta, ai: bool) -> Followup:
    values = {field.name: None for field in dataclasses.fields(Followup)}
    values.update(id=7, version=3, scheduled_time=NOW + due, ai_should_personalize=ai)
    return Followup(**values)


@pytest.fixture
def publisher() -> RecordingPublisher:
    return RecordingPublisher()


async def test_without_ai_only_the_send_timer(publisher):
    await arm_followup(
        LevelsTimer(publisher, lambda: NOW), row(due=timedelta(seconds=20), ai=False), LEAD, MARGIN
    )
    assert publisher.destinations() == [(DISPATCHER_DUE.name, TimerKind.DISPATCH)]
    [send] = publisher.published
    assert send["headers"][FIRE_AT_HEADER] == to_epoch_ms(NOW + timedelta(seconds=20) - MARGIN)


async def test_a_preparation_due_within_its_window_is_published_at_once(publisher):
    await arm_followup(
        LevelsTimer(publisher, lambda: NOW), row(due=timedelta(seconds=20), ai=True), LEAD, MARGIN
    )
    assert publisher.destinations() == [
        (DISPATCHER_DUE.name, TimerKind.DISPATCH),
        (PERSONALIZER_DUE.name, TimerKind.PERSONALIZE),
    ]
    [preparation] = [p for p in publisher.published if p["message"].kind is TimerKind.PERSONALIZE]
    assert preparation["exchange"] == TIMER_DELIVER_EXCHANGE
    assert preparation["headers"][WINDOW_HEADER] == 60_000


async def test_far_ahead_with_ai_one_lead_timer_to_the_dispatcher(publisher):
    due = timedelta(days=30, seconds=17)
    await arm_followup(LevelsTimer(publisher, lambda: NOW), row(due=due, ai=True), LEAD, MARGIN)
    [lead] = publisher.published
    assert (".".join(lead["destination"]), lead["message"].kind) == (
        DISPATCHER_DUE.name,
        TimerKind.LEAD,
    )
    # It fires around the lead time; the message carries the send's instant.
    assert lead["headers"][FIRE_AT_HEADER] == to_epoch_ms(NOW + due - LEAD)
    assert lead["message"].fire_at == NOW + due - MARGIN


async def test_the_plugin_keeps_two_timers_one_hop_each(publisher):
    due = timedelta(days=30)
    await arm_followup(PluginTimer(publisher, lambda: NOW), row(due=due, ai=True), LEAD, MARGIN)
    assert publisher.destinations() == [
        (DISPATCHER_DUE.name, TimerKind.DISPATCH),
        (PERSONALIZER_DUE.name, TimerKind.PERSONALIZE),
    ]


async def test_a_lead_timer_asks_for_the_text_now_and_arms_the_send(publisher):
    send_at = NOW + timedelta(seconds=90)
    lead = TimerMessage(kind=TimerKind.LEAD, followup_id=7, version=3, fire_at=send_at)
    await arm_after_lead(LevelsTimer(publisher, lambda: NOW), lead, LEAD, NOW)
    by_kind = {p["message"].kind: p for p in publisher.published}
    assert by_kind.keys() == {TimerKind.PERSONALIZE, TimerKind.DISPATCH}
    assert by_kind[TimerKind.PERSONALIZE]["exchange"] == TIMER_DELIVER_EXCHANGE
    send = by_kind[TimerKind.DISPATCH]
    assert send["headers"][FIRE_AT_HEADER] == to_epoch_ms(send_at)
    assert (send["message"].followup_id, send["message"].version) == (7, 3)


def test_the_lead_timer_is_chosen_only_when_it_saves_broker_work():
    timer = LevelsTimer(RecordingPublisher(), lambda: NOW)
    for due, expected in ((timedelta(seconds=20), False), (timedelta(days=30, seconds=17), True)):
        scheduled = NOW + due
        saves = lead_timer_saves_work(timer, scheduled - LEAD, scheduled - MARGIN, LEAD, NOW)
        assert saves is expected, due
