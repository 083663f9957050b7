"""The whole follow-up lifecycle through the three running services (issue: lifecycle)."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta

import pytest

from tests.e2e.conftest import (
    followup_id_for,
    publish_command,
    request_followup,
    soon,
    wait_for_final,
    wait_until,
)
from tests.support.data import add_action_item, add_contractor


async def _row(pool, followup_id):
    return await pool.fetchrow(
        "SELECT * FROM contractor_followup_schedules WHERE id = $1", followup_id
    )


async def test_duplicate_request_three_times_is_one_row_and_one_send(
    pool, bus, receiver, start_services
):
    contractor = await add_contractor(pool)
    start_services()
    due = soon(2)
    for _ in range(3):
        await request_followup(bus, contractor, due, idempotency_key="dup-1")
    rows = await wait_for_final(pool, 1)
    await asyncio.sleep(1.5)
    assert await pool.fetchval("SELECT count(*) FROM contractor_followup_schedules") == 1
    assert rows[0]["status"] == "sent"
    assert len(receiver.calls) == 1


async def test_cancel_before_due_sends_nothing_and_announces_it(
    pool, bus, receiver, events, start_services
):
    contractor = await add_contractor(pool)
    start_services()
    await request_followup(bus, contractor, soon(3), idempotency_key="to-cancel")
    followup_id = await followup_id_for(pool, "to-cancel")
    await publish_command(
        bus,
        "followup.cancel_requested",
        {"idempotency_key": "to-cancel", "reason": "customer called"},
    )
    await wait_for_final(pool, 1)
    await asyncio.sleep(4)
    row = await _row(pool, followup_id)
    assert row["status"] == "cancelled"
    assert row["status_reason"] == "customer called"
    assert receiver.calls == []
    cancelled = await events.first("followup.cancelled", followup_id)
    assert {"followup_id", "contractor_id", "followup_type", "status", "occurred_at"} <= set(
        cancelled
    )
    assert "phone" not in cancelled
    assert "message" not in cancelled


async def test_cancels_racing_the_due_time_never_lose_to_a_send(
    pool, bus, receiver, start_services
):
    contractors = [await add_contractor(pool) for _ in range(4)]
    start_services()
    base = datetime.now(UTC) + timedelta(seconds=4)
    dues = [base + timedelta(milliseconds=random.uniform(0, 4000)) for _ in range(200)]
    for i, due in enumerate(dues):
        await request_followup(bus, contractors[i % 4], due, idempotency_key=f"race-{i}")

    async def cancel_at(i: int, due: datetime) -> None:
        at = due + timedelta(milliseconds=random.uniform(-50, 50))
        await asyncio.sleep(max(0.0, (at - datetime.now(UTC)).total_seconds()))
        await publish_command(bus, "followup.cancel_requested", {"idempotency_key": f"race-{i}"})

    await asyncio.gather(*(cancel_at(i, due) for i, due in enumerate(dues)))
    rows = await wait_for_final(pool, 200, timeout=60)
    assert len(rows) == 200
    called = {c.json["followup_id"] for c in receiver.calls}
    cancelled = [r for r in rows if r["status"] == "cancelled"]
    sent = [r for r in rows if r["status"] == "sent"]
    assert len(cancelled) + len(sent) == 200
    assert not called & {r["id"] for r in cancelled}, "a cancelled follow-up was sent"
    assert called == {r["id"] for r in sent}
    print(f"\ncancel race: {len(cancelled)} cancelled in time, {len(sent)} already sending")


async def test_reschedule_only_the_new_time_fires(pool, bus, receiver, start_services):
    contractor = await add_contractor(pool)
    start_services(PERSONALIZE_LEAD_SECONDS="2")
    # earlier: before the text was prepared; later: after it was prepared
    ai = {"ai_should_personalize": True}
    await request_followup(bus, contractor, soon(12), idempotency_key="earlier", **ai)
    await request_followup(bus, contractor, soon(3.5), idempotency_key="later", **ai)
    earlier_id = await followup_id_for(pool, "earlier")
    later_id = await followup_id_for(pool, "later")

    async def prepared():
        return (await _row(pool, later_id))["prepared_text"] is not None

    assert await wait_until(prepared, 10)
    new_earlier, new_later = soon(3), soon(6)
    await publish_command(
        bus,
        "followup.reschedule_requested",
        {"idempotency_key": "earlier", "scheduled_time": new_earlier.isoformat()},
    )
    await publish_command(
        bus,
        "followup.reschedule_requested",
        {"followup_id": later_id, "scheduled_time": new_later.isoformat()},
    )
    rows = await wait_for_final(pool, 2, timeout=30)
    await asyncio.sleep(8)  # past the old time of "earlier": its old timer must not fire
    assert [r["status"] for r in rows] == ["sent", "sent"]
    for followup_id, new_time in ((earlier_id, new_earlier), (later_id, new_later)):
        [call] = receiver.calls_for(followup_id)
        assert call.received_at >= new_time.timestamp()
        row = await _row(pool, followup_id)
        assert row["version"] == 2
        assert row["scheduled_time"] == new_time.replace(microsecond=new_time.microsecond)
        assert row["prepared_version"] == 2, "text prepared again for the new version"


async def test_recurring_creates_and_arms_the_next_occurrence(
    pool, bus, receiver, events, start_services
):
    contractor = await add_contractor(pool, timezone="America/New_York")
    start_services()
    due = soon(2)
    await request_followup(
        bus,
        contractor,
        due,
        idempotency_key="weekly",
        is_recurring=True,
        recurrence_interval_days=7,
    )
    first_id = await followup_id_for(pool, "weekly")

    async def linked():
        return (await _row(pool, first_id))["next_occurrence_id"]

    assert await wait_until(linked, 20)
    first = await _row(pool, first_id)
    following = await _row(pool, first["next_occurrence_id"])
    assert first["status"] == "sent"
    assert following["status"] == "scheduled"
    assert following["series_id"] == first["series_id"] == first_id
    assert following["occurrence"] == 2
    local = first["scheduled_time"].astimezone(__import__("zoneinfo").ZoneInfo("America/New_York"))
    next_local = following["scheduled_time"].astimezone(local.tzinfo)
    assert (next_local.hour, next_local.minute) == (local.hour, local.minute)
    assert next_local.date() == local.date() + timedelta(days=7)
    await events.first("followup.scheduled", following["id"])

    await publish_command(bus, "followup.cancel_requested", {"followup_id": first_id})

    async def series_ended():
        return (await _row(pool, following["id"]))["status"] == "cancelled"

    assert await wait_until(series_ended, 10), "cancelling any occurrence ends the series"


async def test_completed_action_item_is_skipped_with_a_reason(
    pool, bus, receiver, events, start_services
):
    contractor = await add_contractor(pool)
    item = await add_action_item(pool, contractor)
    start_services(PERSONALIZE_LEAD_SECONDS="0.5")
    await request_followup(
        bus,
        contractor,
        soon(3),
        idempotency_key="skip-me",
        action_item_id=item,
        skip_if_completed=True,
        message_template="Reminder: {action_item}",
    )
    followup_id = await followup_id_for(pool, "skip-me")
    await pool.execute(
        "UPDATE contractor_action_items SET status = 'completed' WHERE id = $1", item
    )
    rows = await wait_for_final(pool, 1)
    assert rows[0]["status"] == "skipped"
    assert rows[0]["status_reason"] == "action_item_completed"
    assert receiver.calls == []
    skipped = await events.first("followup.skipped", followup_id)
    assert skipped["reason"] == "action_item_completed"


async def test_stop_cancels_everything_pending_and_start_opts_back_in(
    pool, bus, receiver, events, start_services
):
    contractor = await add_contractor(pool, phone="+14155552671")
    start_services()
    await request_followup(bus, contractor, soon(1.5), idempotency_key="first")
    first_id = await followup_id_for(pool, "first")
    await wait_for_final(pool, 1)
    for i in range(3):
        await request_followup(bus, contractor, soon(30 + i), idempotency_key=f"pending-{i}")
    for i in range(3):
        await followup_id_for(pool, f"pending-{i}")

    await publish_command(
        bus, "followup.response_received", {"phone": "+14155552671", "text": "Stop"}
    )

    async def all_cancelled():
        return (
            await pool.fetchval(
                "SELECT count(*) FROM contractor_followup_schedules WHERE status = 'cancelled'"
                " AND status_reason = 'opted_out'"
            )
            == 3
        )

    assert await wait_until(all_cancelled, 15)
    assert await pool.fetchval("SELECT sms_opt_out FROM contractors WHERE id = $1", contractor)
    first = await _row(pool, first_id)
    assert first["response_text"] == "Stop"
    assert first["response_received_at"] is not None
    await events.first("followup.response_recorded", first_id)

    await request_followup(bus, contractor, soon(2), idempotency_key="while-out")
    blocked = await followup_id_for(pool, "while-out")
    assert (await _row(pool, blocked))["status"] == "skipped"
    assert (await _row(pool, blocked))["status_reason"] == "opted_out"

    await publish_command(
        bus, "followup.response_received", {"contractor_id": contractor, "text": "START"}
    )

    async def opted_in():
        return not await pool.fetchval(
            "SELECT sms_opt_out FROM contractors WHERE id = $1", contractor
        )

    assert await wait_until(opted_in, 10)
    await request_followup(bus, contractor, soon(2), idempotency_key="after-start")
    again = await followup_id_for(pool, "after-start")

    async def sent_again():
        return (await _row(pool, again))["status"] == "sent"

    assert await wait_until(sent_again, 20)
    assert {c.json["followup_id"] for c in receiver.calls} == {first_id, again}


def _quiet_window_ending_soon() -> tuple[str, datetime]:
    now = datetime.now(UTC)
    end = (now + timedelta(minutes=1)).replace(second=0, microsecond=0)
    if (end - now).total_seconds() < 12:
        end += timedelta(minutes=1)
    start = end - timedelta(minutes=5)
    return f"{start:%H:%M}-{end:%H:%M}", end


async def test_quiet_hours_move_a_send_to_the_end_of_the_window(
    pool, bus, receiver, start_services
):
    window, end = _quiet_window_ending_soon()
    contractor = await add_contractor(pool, timezone="UTC")
    start_services(QUIET_HOURS=window)
    await request_followup(bus, contractor, soon(2), idempotency_key="quiet")
    followup_id = await followup_id_for(pool, "quiet")
    rows = await wait_for_final(pool, 1, timeout=90)
    assert rows[0]["status"] == "sent"
    [call] = receiver.calls_for(followup_id)
    assert call.received_at >= end.timestamp()
    row = await _row(pool, followup_id)
    assert row["deferred_reason"].startswith("quiet_hours")
    assert row["deferred_until"] == end


@pytest.mark.timeout(150)
async def test_higher_priority_goes_first_when_sends_queue_up(pool, bus, receiver, start_services):
    contractor = await add_contractor(pool)
    services = start_services(SMS_RATE_LIMIT_PER_MINUTE="2")
    for i in range(2):
        await request_followup(bus, contractor, soon(1.5), idempotency_key=f"filler-{i}")
    assert await wait_until(lambda: _sent_count(pool, 2), 20)
    due = soon(1.5)
    for name, priority in (("low-a", 0), ("high-a", 9), ("low-b", 1), ("high-b", 8)):
        await request_followup(bus, contractor, due, idempotency_key=name, priority=priority)
    # Their places come a window (60.5 s) after the fillers' calls; a failure shows the
    # dispatcher's log.
    sent = await wait_until(lambda: _sent_count(pool, 4), 90)
    assert sent, services["dispatcher"].log_text()[-6000:]
    order = [c.json["priority"] for c in receiver.calls[2:4]]
    assert min(order) >= 8, f"the first two sends after the window opened: priorities {order}"


async def _sent_count(pool, n: int) -> bool:
    return (
        await pool.fetchval(
            "SELECT count(*) FROM contractor_followup_schedules WHERE status = 'sent'"
        )
        >= n
    )
