"""The scheduler against the real database and broker: one row per request, whatever arrives."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import pytest

from services.scheduler import intake
from services.scheduler.handlers import SchedulerDeps, handle
from shared.consumer import Incoming
from shared.deliveries import CarrierCodes, DeliveryStore
from shared.errors import Rejected
from shared.send_rate import RatePolicy
from shared.timers import utcnow
from tests.support.data import add_action_item, add_contractor
from tests.support.migrations import installed_body, newest_definition


def _deps(store, levels_timer, publisher) -> SchedulerDeps:
    return SchedulerDeps(
        store=store,
        timer=levels_timer,
        publisher=publisher,
        personalize_lead=timedelta(seconds=60),
        dispatch_margin=timedelta(milliseconds=250),
        clock=utcnow,
        deliveries=DeliveryStore(
            store._pool, RatePolicy(10), CarrierCodes(frozenset(), frozenset())
        ),
    )


def _request(contractor_id: int, **extra) -> bytes:
    return json.dumps(
        {
            "contractor_id": contractor_id,
            "scheduled_time": (datetime.now(UTC) + timedelta(hours=1)).isoformat(),
            "followup_type": "check_in",
            "message_template": "Hi {first_name}",
            **extra,
        }
    ).encode()


async def _count(pool) -> int:
    return await pool.fetchval("SELECT count(*) FROM contractor_followup_schedules")


@pytest.mark.parametrize(
    ("extra", "message_id"),
    [({"idempotency_key": "order-17"}, None), ({}, "amqp-message-1"), ({}, None)],
    ids=["idempotency_key", "message_id", "content"],
)
async def test_duplicate_deliveries_create_one_row(
    pool, store, levels_timer, publisher, extra, message_id
):
    contractor = await add_contractor(pool)
    body = _request(contractor, **extra)
    incoming = Incoming(body=body, routing_key="followup.requested", message_id=message_id)
    deps = _deps(store, levels_timer, publisher)
    # Concurrent duplicates race on the unique key; a later redelivery finds the row.
    await asyncio.gather(*(handle(incoming, deps) for _ in range(3)))
    await handle(
        Incoming(
            body=body, routing_key="followup.requested", message_id=message_id, redelivered=True
        ),
        deps,
    )
    assert await _count(pool) == 1
    row = await pool.fetchrow("SELECT status, version FROM contractor_followup_schedules")
    assert (row["status"], row["version"]) == ("scheduled", 1)


async def test_same_key_different_content_is_still_one_followup(
    pool, store, levels_timer, publisher
):
    contractor = await add_contractor(pool)
    deps = _deps(store, levels_timer, publisher)
    for template in ("Hi {first_name}", "Hello {first_name}"):
        body = _request(contractor, idempotency_key="k-1", message_template=template)
        await handle(Incoming(body=body, routing_key="followup.requested"), deps)
    assert await _count(pool) == 1


@pytest.mark.parametrize(
    ("extra", "rule"),
    [
        ({"contractor_id": 999_999}, "unknown_reference"),
        ({"action_item_id": 999_999}, "unknown_reference"),
        ({"event_id": 999_999}, "unknown_reference"),
        ({"message_template": "About {action_item}"}, "template"),
        ({"message_template": "Hi {nickname}"}, "template"),
    ],
)
async def test_bad_references_are_rejected_at_scheduling_time(
    pool, store, levels_timer, publisher, extra, rule
):
    contractor = await add_contractor(pool)
    body = json.loads(_request(contractor))
    body.update(extra)
    with pytest.raises(Rejected) as caught:
        await handle(
            Incoming(body=json.dumps(body).encode(), routing_key="followup.requested"),
            _deps(store, levels_timer, publisher),
        )
    assert caught.value.rule == rule
    assert await _count(pool) == 0


async def test_requests_arriving_together_are_stored_in_one_transaction(
    pool, store, levels_timer, publisher
):
    contractor = await add_contractor(pool)
    deps = _deps(store, levels_timer, publisher)
    bodies = [_request(contractor, idempotency_key=f"together-{n}") for n in range(5)]
    await asyncio.gather(*(handle(Incoming(b, "followup.requested"), deps) for b in bodies))
    rows = await pool.fetch("SELECT status, created_at FROM contractor_followup_schedules")
    assert [r["status"] for r in rows] == ["scheduled"] * 5
    assert len({r["created_at"] for r in rows}) == 1, "one transaction's time on every row"


async def test_a_bad_reference_in_a_batch_rejects_only_its_own_request(
    pool, store, levels_timer, publisher
):
    contractor = await add_contractor(pool)
    deps = _deps(store, levels_timer, publisher)
    bodies = [
        _request(contractor, idempotency_key="good-1"),
        _request(999_999, idempotency_key="bad"),
        _request(contractor, idempotency_key="good-2"),
    ]
    outcomes = await asyncio.gather(
        *(handle(Incoming(b, "followup.requested"), deps) for b in bodies),
        return_exceptions=True,
    )
    assert (outcomes[0], outcomes[2]) == (None, None)
    assert isinstance(outcomes[1], Rejected)
    assert (outcomes[1].rule, outcomes[1].detail) == (
        "unknown_reference",
        "contractor_id does not exist",
    )
    keys = await pool.fetch("SELECT idempotency_key FROM contractor_followup_schedules")
    assert sorted(k["idempotency_key"] for k in keys) == ["key:good-1", "key:good-2"]


async def test_another_contractors_action_item_is_an_unknown_reference(
    pool, store, levels_timer, publisher
):
    contractor = await add_contractor(pool)
    other = await add_contractor(pool, first_name="Alex")
    their_item = await add_action_item(pool, other, title="Alex's own matter")
    body = _request(
        contractor,
        action_item_id=their_item,
        message_template="About {action_item}",
        skip_if_completed=True,
    )
    with pytest.raises(Rejected) as caught:
        await handle(
            Incoming(body=body, routing_key="followup.requested"),
            _deps(store, levels_timer, publisher),
        )
    assert caught.value.rule == "unknown_reference"
    assert "action_item_id" in caught.value.detail
    assert await _count(pool) == 0


async def test_action_item_reference_is_accepted(pool, store, levels_timer, publisher):
    contractor = await add_contractor(pool)
    item = await add_action_item(pool, contractor)
    body = _request(contractor, action_item_id=item, message_template="About {action_item}")
    await handle(
        Incoming(body=body, routing_key="followup.requested"), _deps(store, levels_timer, publisher)
    )
    assert await _count(pool) == 1


async def test_a_cancel_that_overtakes_its_request_still_wins(pool, store, levels_timer, publisher):
    contractor = await add_contractor(pool)
    deps = _deps(store, levels_timer, publisher)
    cancel = json.dumps({"idempotency_key": "early-bird", "reason": "changed plans"}).encode()
    await handle(Incoming(body=cancel, routing_key="followup.cancel_requested"), deps)
    request = _request(contractor, idempotency_key="early-bird")
    await handle(Incoming(body=request, routing_key="followup.requested"), deps)
    row = await pool.fetchrow("SELECT status, status_reason FROM contractor_followup_schedules")
    assert (row["status"], row["status_reason"]) == ("cancelled", "changed plans")


async def test_cancel_and_request_racing_on_one_key_never_leave_it_scheduled(
    pool, store, levels_timer, publisher
):
    contractor = await add_contractor(pool)
    deps = _deps(store, levels_timer, publisher)
    for i in range(20):
        key = f"race-{i}"
        cancel = json.dumps({"idempotency_key": key}).encode()
        request = _request(contractor, idempotency_key=key)
        await asyncio.gather(
            handle(Incoming(body=request, routing_key="followup.requested"), deps),
            handle(Incoming(body=cancel, routing_key="followup.cancel_requested"), deps),
        )
    statuses = await pool.fetch("SELECT status FROM contractor_followup_schedules")
    assert len(statuses) == 20
    assert {r["status"] for r in statuses} == {"cancelled"}


@pytest.mark.parametrize(
    "stored", ["(415) 555-2671", "415.555.2671", "+1 415 555 2671", "14155552671"]
)
async def test_a_reply_by_phone_finds_the_contractor_however_the_number_is_stored(
    pool, store, levels_timer, publisher, stored
):
    contractor = await add_contractor(pool, phone=stored)
    reply = json.dumps({"phone": "+14155552671", "text": "STOP"}).encode()
    await handle(
        Incoming(body=reply, routing_key="followup.response_received"),
        _deps(store, levels_timer, publisher),
    )
    assert await pool.fetchval("SELECT sms_opt_out FROM contractors WHERE id = $1", contractor)


# ---- the intake function is the module's ------------------------------------------------------


def test_the_migration_installs_the_intake_module_function():
    assert intake.FUNCTION_SQL in newest_definition("followups_insert_request")


async def test_the_database_runs_the_intake_module_function(pool, store):
    body = intake.FUNCTION_SQL.split("$$")[1]
    assert await installed_body(pool, "followups_insert_request") == body


def test_the_migration_installs_the_intake_module_batch_function():
    assert intake.BATCH_FUNCTION_SQL in newest_definition("followups_insert_requests")


async def test_the_database_runs_the_intake_module_batch_function(pool, store):
    body = intake.BATCH_FUNCTION_SQL.split("$$")[1]
    assert await installed_body(pool, "followups_insert_requests") == body


async def test_a_recurring_request_starts_its_own_series_and_logs_its_transition(
    pool, store, levels_timer, publisher
):
    contractor = await add_contractor(pool)
    body = _request(contractor, is_recurring=True, recurrence_interval_days=7)
    await handle(Incoming(body, "followup.requested"), _deps(store, levels_timer, publisher))
    row = await pool.fetchrow("SELECT id, series_id, status FROM contractor_followup_schedules")
    assert (row["series_id"], row["status"]) == (row["id"], "scheduled")
    logged = await pool.fetch(
        "SELECT stage, from_status, to_status FROM followup_transitions WHERE followup_id = $1",
        row["id"],
    )
    assert [tuple(t) for t in logged] == [("scheduler", None, "scheduled")]
