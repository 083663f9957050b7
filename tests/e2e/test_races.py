"""Races of the send protocol through the real services: claimants queued behind slow calls,
and a cancel or reschedule that arrives while the webhook call is under way."""

from __future__ import annotations

import asyncio

from testbed.webhook import Call, Reply
from tests.e2e.conftest import publish_command, request_followup, soon, wait_for_final, wait_until
from tests.support.data import add_contractor


async def _id_for(pool, key):
    async def found():
        return await pool.fetchval(
            "SELECT id FROM contractor_followup_schedules WHERE idempotency_key = $1", f"key:{key}"
        )

    assert await wait_until(found, 20), f"no row for {key}"
    return await found()


async def test_followups_queued_behind_slow_calls_are_called_once_each_and_never_taken_over(
    pool, bus, receiver, start_services
):
    """One call at a time, 2.5 s each, ten due together: the last waits over 20 s for its turn,
    longer than the lease (11 s) and the sweep's grace; still one call and one attempt each."""
    receiver.responder = lambda call, calls: Reply(200, delay=2.5)
    contractor = await add_contractor(pool)
    start_services(
        DISPATCH_CONCURRENCY="1",
        WEBHOOK_TIMEOUT_SECONDS="3",
        SWEEP_INTERVAL_SECONDS="1",
        SWEEP_GRACE_SECONDS="1",
    )
    due = soon(2)
    for i in range(10):
        await request_followup(bus, contractor, due, idempotency_key=f"slow-{i}")
    rows = await wait_for_final(pool, 10, timeout=90)
    assert [r["status"] for r in rows] == ["sent"] * 10
    assert [r["attempts"] for r in rows] == [1] * 10, "an attempt was spent without a call"
    assert sorted(c.json["followup_id"] for c in receiver.calls) == [r["id"] for r in rows]
    takeovers = await pool.fetchval(
        "SELECT count(*) FROM followup_transitions WHERE detail->>'takeover' = 'true'"
    )
    assert takeovers == 0


async def test_a_cancel_during_a_call_that_fails_wins_over_the_retry(
    pool, bus, receiver, events, start_services
):
    def first_call_fails_slowly(call: Call, calls: list[Call]) -> Reply:
        return Reply(503, delay=1.5) if not calls else Reply(200)

    receiver.responder = first_call_fails_slowly
    contractor = await add_contractor(pool)
    start_services()
    await request_followup(
        bus,
        contractor,
        soon(2),
        idempotency_key="mid-call",
        is_recurring=True,
        recurrence_interval_days=7,
    )
    followup_id = await _id_for(pool, "mid-call")
    assert await wait_until(_called(receiver, 1), 20)
    await publish_command(
        bus, "followup.cancel_requested", {"idempotency_key": "mid-call", "reason": "done"}
    )
    cancelled = await events.first("followup.cancelled", followup_id, timeout=20)
    assert cancelled["reason"] == "done"
    await asyncio.sleep(3)  # a retry would have come after about 2 s
    assert len(receiver.calls) == 1
    row = await pool.fetchrow(
        "SELECT * FROM contractor_followup_schedules WHERE id = $1", followup_id
    )
    assert row["status"] == "cancelled"
    assert row["next_occurrence_id"] is None
    assert await pool.fetchval("SELECT count(*) FROM contractor_followup_schedules") == 1


async def test_a_reschedule_during_a_call_that_fails_moves_it_to_the_new_time(
    pool, bus, receiver, start_services
):
    def first_call_fails_slowly(call: Call, calls: list[Call]) -> Reply:
        return Reply(503, delay=1.5) if not calls else Reply(200)

    receiver.responder = first_call_fails_slowly
    contractor = await add_contractor(pool)
    start_services()
    await request_followup(bus, contractor, soon(2), idempotency_key="moved-mid-call")
    await _id_for(pool, "moved-mid-call")
    assert await wait_until(_called(receiver, 1), 20)
    new_time = soon(6)
    await publish_command(
        bus,
        "followup.reschedule_requested",
        {"idempotency_key": "moved-mid-call", "scheduled_time": new_time.isoformat()},
    )
    rows = await wait_for_final(pool, 1, timeout=30)
    assert rows[0]["status"] == "sent"
    assert rows[0]["version"] == 2
    assert abs((rows[0]["scheduled_time"] - new_time).total_seconds()) < 0.001
    assert len(receiver.calls) == 2
    assert receiver.calls[1].received_at >= new_time.timestamp(), "sent at the new time"


async def test_a_reschedule_to_now_during_a_call_that_fails_is_sent_at_once(
    pool, bus, receiver, start_services
):
    """The new time has passed when the failed call ends, so its timer is due at once: armed
    before the move's commit it could reach a dispatcher that still found the row claimed and
    drop it, leaving the send to the sweep."""

    def first_calls_fail_slowly(call: Call, calls: list[Call]) -> Reply:
        first = all(c.json["followup_id"] != call.json["followup_id"] for c in calls)
        return Reply(503, delay=1.5) if first else Reply(200)

    receiver.responder = first_calls_fail_slowly
    contractor = await add_contractor(pool)
    # The sweep would repair a dropped timer only after this: the send must come from the move.
    start_services(SWEEP_GRACE_SECONDS="3600")
    keys = [f"now-{i}" for i in range(5)]
    for key in keys:
        await request_followup(bus, contractor, soon(2), idempotency_key=key)
    assert await wait_until(_called(receiver, len(keys)), 20)
    for key in keys:
        await publish_command(
            bus,
            "followup.reschedule_requested",
            {"idempotency_key": key, "scheduled_time": soon(0.2).isoformat()},
        )
    rows = await wait_for_final(pool, len(keys), timeout=30)
    assert [(r["status"], r["version"]) for r in rows] == [("sent", 2)] * len(keys)
    assert len(receiver.calls) == 2 * len(keys)


async def test_a_cancel_during_an_accepted_call_is_recorded_as_too_late(
    pool, bus, receiver, start_services
):
    receiver.responder = lambda call, calls: Reply(200, delay=1.5)
    contractor = await add_contractor(pool)
    services = start_services()
    await request_followup(bus, contractor, soon(2), idempotency_key="late-cancel")
    followup_id = await _id_for(pool, "late-cancel")
    assert await wait_until(_called(receiver, 1), 20)
    await publish_command(bus, "followup.cancel_requested", {"idempotency_key": "late-cancel"})
    rows = await wait_for_final(pool, 1, timeout=30)
    assert (rows[0]["status"], rows[0]["status_reason"]) == ("sent", "cancel_too_late")
    late = await pool.fetchval(
        "SELECT count(*) FROM followup_transitions"
        " WHERE followup_id = $1 AND detail->>'too_late' = 'true'",
        followup_id,
    )
    assert late == 1
    assert await wait_until(_logged(services, "too late, recorded"), 10)


def _called(receiver, n):
    async def check():
        return len(receiver.calls) >= n

    return check


def _logged(services, text):
    async def check():
        return text in services["dispatcher"].log_text()

    return check
