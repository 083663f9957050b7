"""Delivery reports and the adaptive send rate against the real database (and broker, for the
scheduler's events): reports in and out of order, unknown keys, the rate under the send window's
lock, the 429 signal, and numbers that can't take an SMS."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from services.dispatcher.repository import DispatchRepository
from services.scheduler.handlers import SchedulerDeps, handle
from shared.consumer import Incoming
from shared.deliveries import CarrierCodes, DeliveryStore
from shared.errors import Rejected
from shared.send_rate import RatePolicy
from shared.send_rate_store import current_rate, recent_changes
from shared.timers import utcnow
from tests.support.data import add_contractor

LEASE = timedelta(seconds=30)
MARGIN = timedelta(milliseconds=250)
POLICY = RatePolicy(ceiling=8, floor=2, recovery_deliveries=2)
CODES = CarrierCodes(throttle=frozenset({"30007"}), undeliverable=frozenset({"30005"}))


class RecordingPublisher:
    def __init__(self) -> None:
        self.events: list[dict] = []

    async def publish(self, body, *, exchange, routing_key, headers=None, mandatory=True, **_):
        if not routing_key.endswith(".due") and not routing_key.startswith("followups."):
            self.events.append(json.loads(body))

    def named(self, name: str) -> list[dict]:
        return [e for e in self.events if e.get("event") == name]


@pytest.fixture
def events() -> RecordingPublisher:
    return RecordingPublisher()


@pytest.fixture
def deps(pool, store, levels_timer, events) -> SchedulerDeps:
    return SchedulerDeps(
        store=store,
        timer=levels_timer,
        publisher=events,
        personalize_lead=timedelta(seconds=60),
        dispatch_margin=MARGIN,
        clock=utcnow,
        deliveries=DeliveryStore(pool, POLICY, CODES),
    )


async def add_followup(pool, contractor: int, *, status: str = "sent", key: str) -> dict:
    record = await pool.fetchrow(
        """INSERT INTO contractor_followup_schedules
               (contractor_id, scheduled_time, followup_type, message_template, idempotency_key,
                status, sent_at)
           VALUES ($1, now() + CASE WHEN $3 = 'sent' THEN interval '-1 minute'
                                    ELSE interval '1 hour' END,
                   'check_in', 'Hi {first_name}', $2, $3,
                   CASE WHEN $3 = 'sent' THEN now() END)
           RETURNING id, send_key""",
        contractor,
        f"key:{key}",
        status,
    )
    return dict(record)


def report(send_key, status: str, seconds_ago: float, code: str | None = None) -> Incoming:
    body = {
        "idempotency_key": str(send_key),
        "status": status,
        "reported_at": (datetime.now(UTC) - timedelta(seconds=seconds_ago)).isoformat(),
        "provider": "twilio",
    }
    if code is not None:
        body["error_code"] = code
    return Incoming(body=json.dumps(body).encode(), routing_key="followup.delivery_reported")


async def delivery(pool, followup_id: int) -> tuple:
    row = await pool.fetchrow(
        """SELECT delivery_status, delivery_error_code FROM contractor_followup_schedules
           WHERE id = $1""",
        followup_id,
    )
    return row["delivery_status"], row["delivery_error_code"]


async def test_reports_in_order_are_recorded_with_a_transition_and_an_event(pool, deps, events):
    contractor = await add_contractor(pool)
    sent = await add_followup(pool, contractor, key="a")
    await handle(report(sent["send_key"], "undelivered", 20, "30008"), deps)
    await handle(report(sent["send_key"], "delivered", 10), deps)
    assert await delivery(pool, sent["id"]) == ("delivered", None)
    transitions = await pool.fetch(
        "SELECT stage, detail FROM followup_transitions WHERE followup_id = $1 ORDER BY id",
        sent["id"],
    )
    assert [(t["stage"], t["detail"]["delivery_status"]) for t in transitions] == [
        ("gateway", "undelivered"),
        ("gateway", "delivered"),
    ]
    recorded = events.named("followup.delivery_recorded")
    assert [(e["delivery_status"], e.get("error_code")) for e in recorded] == [
        ("undelivered", "30008"),
        ("delivered", None),
    ]
    assert all(e["followup_id"] == sent["id"] and "phone" not in e for e in recorded)


async def test_out_of_order_the_later_report_wins_and_a_repeat_changes_nothing(pool, deps, events):
    contractor = await add_contractor(pool)
    sent = await add_followup(pool, contractor, key="b")
    later = report(sent["send_key"], "delivered", 5)
    await handle(later, deps)
    await handle(report(sent["send_key"], "failed", 30, "30008"), deps)
    await handle(later, deps)
    assert await delivery(pool, sent["id"]) == ("delivered", None)
    assert len(events.named("followup.delivery_recorded")) == 1
    details = await pool.fetch(
        "SELECT detail FROM followup_transitions WHERE followup_id = $1 ORDER BY id", sent["id"]
    )
    assert ["superseded_by" in d["detail"] for d in details] == [False, True]


async def test_a_report_for_an_occurrence_not_sent_is_recorded(pool, deps, events):
    contractor = await add_contractor(pool)
    pending = await add_followup(pool, contractor, status="sending", key="c")
    await handle(report(pending["send_key"], "delivered", 1), deps)
    assert await delivery(pool, pending["id"]) == ("delivered", None)
    assert events.named("followup.delivery_recorded")[0]["status"] == "sending"


@pytest.mark.parametrize("key", [str(uuid.uuid4()), "not-a-send-key"])
async def test_an_unknown_key_is_an_unknown_reference(pool, deps, key):
    with pytest.raises(Rejected) as caught:
        await handle(report(key, "delivered", 1), deps)
    assert caught.value.rule == "unknown_reference"


async def test_throttling_reports_halve_the_rate_once_per_window_and_deliveries_raise_it(
    pool, deps, events
):
    contractor = await add_contractor(pool)
    sent = [await add_followup(pool, contractor, key=f"t-{n}") for n in range(4)]
    await handle(report(sent[0]["send_key"], "undelivered", 3, "30007"), deps)
    await handle(report(sent[1]["send_key"], "failed", 2, "30007"), deps)
    assert await current_rate(pool, POLICY.ceiling) == 4, "two signals in one window: once"
    changed = events.named("followup.send_rate_changed")
    assert [(e["limit_per_minute"], e["cause"]) for e in changed] == [(4, "error_code 30007")]
    assert changed[0]["previous_limit_per_minute"] == 8
    # A window after the halving, two deliveries in a row raise it by one.
    await pool.execute("UPDATE send_rate SET throttled_at = throttled_at - interval '61 s'")
    await handle(report(sent[2]["send_key"], "delivered", 1), deps)
    assert await current_rate(pool, POLICY.ceiling) == 4
    await handle(report(sent[3]["send_key"], "delivered", 1), deps)
    assert await current_rate(pool, POLICY.ceiling) == 5
    assert [(c.limit_per_minute, c.cause) for c in await recent_changes(pool)] == [
        (5, "recovery"),
        (4, "error_code 30007"),
    ]


async def test_the_send_window_counts_at_the_current_rate(pool, store):
    repository = DispatchRepository(pool)
    contractor = await add_contractor(pool)
    await pool.execute("INSERT INTO send_rate (id, limit_per_minute) VALUES (1, 2)")
    slots = []
    for n in range(3):
        row = await add_followup(pool, contractor, status="scheduled", key=f"w-{n}")
        await pool.execute(
            "UPDATE contractor_followup_schedules SET scheduled_time = now() WHERE id = $1",
            row["id"],
        )
        claimed, _ = await repository.claim(row["id"], 1, LEASE, MARGIN)
        slots.append(await repository.start_call(claimed, limit_per_minute=100, lease=LEASE))
    assert [s.call_id is not None for s in slots] == [True, True, False]
    assert {s.limit_per_minute for s in slots} == {2}
    # A ceiling below the stored rate holds at once.
    row = await add_followup(pool, contractor, status="scheduled", key="w-ceiling")
    claimed, _ = await repository.claim(row["id"], 1, LEASE, timedelta(hours=2))
    assert (
        await repository.start_call(claimed, limit_per_minute=1, lease=LEASE)
    ).limit_per_minute == 1


async def test_a_429_pauses_the_fleet_and_halves_the_rate_once_per_window(pool, store):
    repository = DispatchRepository(pool)
    contractor = await add_contractor(pool)
    row = await add_followup(pool, contractor, key="429")
    until = datetime.now(UTC) + timedelta(seconds=2)
    first = await repository.pause_gateway(until, "http_429", policy=POLICY, followup_id=row["id"])
    second = await repository.pause_gateway(until, "http_429", policy=POLICY, followup_id=row["id"])
    assert first is not None
    assert (first.previous_limit, first.limit_per_minute, first.cause) == (8, 4, "http_429")
    assert second is None
    assert await pool.fetchval("SELECT paused_until FROM gateway_pause") == until
    await pool.execute("DELETE FROM gateway_pause")  # not emptied between tests


async def test_a_permanent_failure_skips_pending_followups_and_new_ones_until_the_phone_changes(
    pool, deps, events, store
):
    contractor = await add_contractor(pool)
    other = await add_contractor(pool, phone="+14155550100")
    sent = await add_followup(pool, contractor, key="p-sent")
    pending = [
        await add_followup(pool, contractor, status="scheduled", key=f"p-{n}") for n in range(2)
    ]
    theirs = await add_followup(pool, other, status="scheduled", key="p-other")
    await handle(report(sent["send_key"], "undelivered", 1, "30005"), deps)
    statuses = dict(
        await pool.fetch(
            "SELECT id, status || ':' || coalesce(status_reason, '')"
            " FROM contractor_followup_schedules"
        )
    )
    assert [statuses[p["id"]] for p in pending] == ["skipped:undeliverable"] * 2
    assert statuses[theirs["id"]] == "scheduled:"
    assert {e["followup_id"] for e in events.named("followup.skipped")} == {
        p["id"] for p in pending
    }

    request = {
        "contractor_id": contractor,
        "scheduled_time": (datetime.now(UTC) + timedelta(hours=1)).isoformat(),
        "followup_type": "check_in",
        "message_template": "Hi {first_name}",
    }

    async def schedule(key: str) -> str:
        body = json.dumps({**request, "idempotency_key": key}).encode()
        await handle(Incoming(body=body, routing_key="followup.requested"), deps)
        return await pool.fetchval(
            "SELECT status || ':' || coalesce(status_reason, '') FROM contractor_followup_schedules"
            " WHERE idempotency_key = $1",
            f"key:{key}",
        )

    assert await schedule("new-1") == "skipped:undeliverable"
    await pool.execute(
        "UPDATE contractors SET phone = '+1 (415) 555-2671' WHERE id = $1", contractor
    )
    assert await schedule("new-2") == "skipped:undeliverable", "the same digits: the same phone"
    await pool.execute("UPDATE contractors SET phone = '+14155550199' WHERE id = $1", contractor)
    assert await schedule("new-3") == "scheduled:"


async def test_the_claim_sees_an_undeliverable_phone(pool, store):
    repository = DispatchRepository(pool)
    contractor = await add_contractor(pool)
    await pool.execute(
        "UPDATE contractors SET undeliverable_phone = phone WHERE id = $1", contractor
    )
    row = await add_followup(pool, contractor, status="scheduled", key="claim")
    _, context = await repository.claim(row["id"], 1, LEASE, timedelta(hours=2))
    assert context is not None
    assert context.contractor.undeliverable is True
    await pool.execute("UPDATE contractors SET phone = '+14155550199' WHERE id = $1", contractor)
    row = await add_followup(pool, contractor, status="scheduled", key="claim-2")
    _, context = await repository.claim(row["id"], 1, LEASE, timedelta(hours=2))
    assert context is not None
    assert not context.contractor.undeliverable
