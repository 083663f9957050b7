"""Delivery guarantees under faults, through real processes, broker and database (the
README's Guarantees table). The long chaos runs are in tests/chaos (`make chaos`)."""

from __future__ import annotations

import asyncio
import json
import random
import time

import aio_pika
import asyncpg
import pytest

from shared.locks import SEND_WINDOW
from shared.topology import DISPATCHER_DUE, timer_queues
from testbed.webhook import Call, Reply
from tests.e2e.conftest import (
    followup_id_for,
    publish_command,
    request_followup,
    soon,
    wait_for_final,
    wait_until,
)
from tests.support.data import add_contractor, send_window_waiter


def assert_delivered_once_each(receiver, rows) -> None:
    """Invariants 1 and 3: every follow-up reached the gateway, under one key, never early."""
    keys: dict[int, set[str]] = {}
    for call in receiver.calls:
        keys.setdefault(call.json["followup_id"], set()).add(call.headers["idempotency-key"])
    for row in rows:
        assert row["status"] == "sent", (row["id"], row["status"], row["last_error"])
        assert keys.get(row["id"]) == {str(row["send_key"])}, (
            f"follow-up {row['id']}: {keys.get(row['id'])}"
        )
    for call in receiver.calls:
        due = next(r["scheduled_time"] for r in rows if r["id"] == call.json["followup_id"])
        assert call.received_at >= due.timestamp(), "a call arrived before its scheduled time"


async def test_503_first_then_200_is_sent_on_the_second_attempt_with_the_same_key(
    pool, bus, receiver, start_services
):
    seen: set[int] = set()

    def first_call_fails(call: Call, _calls: list[Call]) -> Reply:
        followup_id = call.json["followup_id"]
        if followup_id in seen:
            return Reply(200)
        seen.add(followup_id)
        return Reply(503)

    receiver.responder = first_call_fails
    contractor = await add_contractor(pool)
    start_services()
    for i in range(10):
        await request_followup(bus, contractor, soon(2 + i * 0.1), idempotency_key=f"r-{i}")
    rows = await wait_for_final(pool, 10, timeout=60)
    assert len(rows) == 10
    assert_delivered_once_each(receiver, rows)
    assert len(receiver.calls) == 20
    assert {r["attempts"] for r in rows} == {2}
    calls = await pool.fetch("SELECT followup_id, attempt, outcome, http_status FROM webhook_calls")
    assert (
        sorted((c["attempt"], c["http_status"]) for c in calls) == [(1, 503)] * 10 + [(2, 200)] * 10
    )


async def test_a_429_pauses_the_whole_fleet_for_its_retry_after(
    pool, bus, receiver, start_services
):
    answered_429: list[float] = []

    def first_call_429(call: Call, calls: list[Call]) -> Reply:
        if not calls:
            answered_429.append(time.time())
            return Reply(429, {"Retry-After": "2"})
        return Reply(200)

    receiver.responder = first_call_429
    contractor = await add_contractor(pool)
    services = start_services(DISPATCH_CONCURRENCY="1")
    services.add("dispatcher-2", "dispatcher", DISPATCH_CONCURRENCY="1")
    due = soon(2)
    await request_followup(bus, contractor, due, idempotency_key="p-0")
    for i in range(1, 8):
        await request_followup(bus, contractor, soon(2.3 + i * 0.05), idempotency_key=f"p-{i}")
    rows = await wait_for_final(pool, 8, timeout=60)
    assert len(rows) == 8
    assert_delivered_once_each(receiver, rows)
    paused_from = answered_429[0] + 0.3  # calls already past the window check may still land
    inside_pause = [
        c for c in receiver.calls[1:] if paused_from <= c.received_at < answered_429[0] + 2
    ]
    assert inside_pause == [], [c.received_at - answered_429[0] for c in inside_pause]


async def test_a_400_fails_at_once_with_a_dead_letter_and_an_event(
    pool, bus, receiver, events, settings, start_services
):
    receiver.responder = lambda call, calls: Reply(400)
    contractor = await add_contractor(pool)
    start_services()
    await request_followup(bus, contractor, soon(1.5), idempotency_key="bad-request")
    rows = await wait_for_final(pool, 1)
    assert rows[0]["status"] == "failed"
    assert rows[0]["status_reason"] == "http_400"
    assert rows[0]["attempts"] == 1
    assert len(receiver.calls) == 1
    assert (await events.first("followup.failed", rows[0]["id"]))["reason"] == "http_400"
    connection = await aio_pika.connect(settings.rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(DISPATCHER_DUE.dead_letter_queue)
        # The dead-letter queue is shared by the session's tests: find this follow-up's letter.
        while True:
            message = await queue.get(timeout=5)
            await message.ack()
            if json.loads(message.body)["followup_id"] == rows[0]["id"]:
                break
        assert message.headers["x-error-rule"] == "failed"
        assert message.headers["x-error-reason"] == "http_400"


async def test_a_dispatcher_killed_after_the_gateway_accepted_is_taken_over_with_the_same_key(
    pool, bus, receiver, start_services
):
    contractor = await add_contractor(pool)
    services = start_services(WEBHOOK_TIMEOUT_SECONDS="1", FOLLOWUPS_CRASH_AT="after_webhook")
    await request_followup(bus, contractor, soon(1.5), idempotency_key="crash")
    assert await wait_until(_calls_made(receiver, 1), 20)
    await asyncio.to_thread(services["dispatcher"].process.wait, 10)
    assert not services["dispatcher"].alive, "the crash point killed the dispatcher"
    services["dispatcher"].env.pop("FOLLOWUPS_CRASH_AT")
    services["dispatcher"].start()
    rows = await wait_for_final(pool, 1, timeout=60)
    assert_delivered_once_each(receiver, rows)
    assert len(receiver.calls) == 2, "the lease ran out and the send was repeated, same key"


async def test_a_dispatcher_killed_between_releasing_a_row_to_wait_and_arming_its_wake(
    pool, bus, receiver, start_services
):
    contractor = await add_contractor(pool)
    services = start_services(
        SMS_RATE_LIMIT_PER_MINUTE="1",
        FOLLOWUPS_CRASH_AT="released_to_wait",
        # The sweep would repair the row only after this: the wake must come from the redelivery.
        SWEEP_GRACE_SECONDS="3600",
    )
    # The window's one place is taken by a call made 55 s ago: the next place frees in 5 s.
    await request_followup(bus, contractor, soon(600), idempotency_key="blocker")
    blocker = await followup_id_for(pool, "blocker")
    blocked_until = await pool.fetchval(
        """INSERT INTO webhook_calls (followup_id, send_key, attempt, called_at)
           VALUES ($1, gen_random_uuid(), 1, clock_timestamp() - interval '55 seconds')
           RETURNING called_at + interval '60 seconds'""",
        blocker,
    )
    await request_followup(bus, contractor, soon(1.5), idempotency_key="waiter")
    await asyncio.to_thread(services["dispatcher"].process.wait, 20)
    assert not services["dispatcher"].alive, "the crash point killed the dispatcher"
    waiter = await followup_id_for(pool, "waiter")
    released = await pool.fetchrow(
        "SELECT status, next_attempt_at FROM contractor_followup_schedules WHERE id = $1", waiter
    )
    assert released["status"] == "scheduled"
    assert released["next_attempt_at"] >= blocked_until
    services["dispatcher"].env.pop("FOLLOWUPS_CRASH_AT")
    services["dispatcher"].start()
    assert await wait_until(_calls_made(receiver, 1), 60), services["dispatcher"].log_text()[-4000:]
    [call] = receiver.calls
    assert call.json["followup_id"] == waiter
    assert call.received_at >= blocked_until.timestamp()
    assert "armed again" in services["dispatcher"].log_text()


@pytest.mark.parametrize(
    ("moved", "rearmed"),
    [
        pytest.param(False, "not due yet: armed again", id="to retry"),
        pytest.param(True, "moved meanwhile: its timers armed again", id="to its new time"),
    ],
)
async def test_a_dispatcher_killed_between_settling_a_failed_call_and_arming_its_timers(
    pool, bus, receiver, start_services, moved, rearmed
):
    def first_call_fails_slowly(call: Call, calls: list[Call]) -> Reply:
        # The retry comes after the restart, so the redelivered timer finds the row waiting.
        return Reply(503, {"Retry-After": "8"}, delay=1.5) if not calls else Reply(200)

    receiver.responder = first_call_fails_slowly
    contractor = await add_contractor(pool)
    services = start_services(
        FOLLOWUPS_CRASH_AT="settled_unarmed",
        # The sweep would repair the row only after this: the timers must come from the
        # redelivery.
        SWEEP_GRACE_SECONDS="3600",
    )
    await request_followup(bus, contractor, soon(1.5), idempotency_key="settled")
    assert await wait_until(_calls_made(receiver, 1), 20)
    new_time = soon(4)
    if moved:
        await publish_command(
            bus,
            "followup.reschedule_requested",
            {"idempotency_key": "settled", "scheduled_time": new_time.isoformat()},
        )
    await asyncio.to_thread(services["dispatcher"].process.wait, 20)
    assert not services["dispatcher"].alive, "the crash point killed the dispatcher"
    followup_id = await followup_id_for(pool, "settled")
    settled = await pool.fetchrow(
        "SELECT status, version FROM contractor_followup_schedules WHERE id = $1", followup_id
    )
    assert (settled["status"], settled["version"]) == ("scheduled", 2 if moved else 1)
    services["dispatcher"].env.pop("FOLLOWUPS_CRASH_AT")
    services["dispatcher"].start()
    [row] = await wait_for_final(pool, 1, timeout=60)
    assert row["status"] == "sent"
    assert len(receiver.calls) == 2
    assert {c.headers["idempotency-key"] for c in receiver.calls} == {str(row["send_key"])}
    if moved:
        assert receiver.calls[1].received_at >= new_time.timestamp(), "sent at the new time"
    assert rearmed in services["dispatcher"].log_text()


def _calls_made(receiver, n):
    async def check():
        return len(receiver.calls) >= n

    return check


async def test_three_dispatchers_never_exceed_the_global_limit(pool, bus, receiver, start_services):
    limit = 3
    contractor = await add_contractor(pool)
    services = start_services(SMS_RATE_LIMIT_PER_MINUTE=str(limit))
    services.add("dispatcher-2", "dispatcher")
    services.add("dispatcher-3", "dispatcher")
    for i in range(3 * limit):
        await request_followup(bus, contractor, soon(2), idempotency_key=f"limit-{i}")
    assert await wait_until(_calls_made(receiver, 2 * limit), 100)
    await asyncio.sleep(2)
    times = sorted(c.received_at for c in receiver.calls)
    for i, start in enumerate(times):
        in_window = [t for t in times[i:] if t < start + 60]
        assert len(in_window) <= limit, f"{len(in_window)} calls within 60 s from call {i}"
    print(
        f"\nglobal limit {limit}/min, 3 dispatchers: call offsets "
        f"{[round(t - times[0], 2) for t in times]}"
    )


async def test_kill_9_of_each_service_while_followups_fall_due(pool, bus, receiver, start_services):
    contractors = [await add_contractor(pool) for _ in range(5)]
    services = start_services(WEBHOOK_TIMEOUT_SECONDS="1")
    for i in range(60):
        await request_followup(
            bus, contractors[i % 5], soon(random.uniform(2, 8)), idempotency_key=f"k-{i}"
        )
    for name in ("dispatcher", "scheduler", "personalizer", "dispatcher"):
        await asyncio.sleep(random.uniform(0.5, 2.0))
        services[name].kill()
        await asyncio.sleep(random.uniform(0.2, 1.0))
        services[name].start()
    rows = await wait_for_final(pool, 60, timeout=90)
    assert len(rows) == 60
    assert_delivered_once_each(receiver, rows)
    print(f"\nkill -9 run: {len(receiver.calls)} calls for 60 follow-ups")


async def test_database_connections_terminated_mid_run(
    pool, bus, receiver, settings, start_services
):
    contractors = [await add_contractor(pool) for _ in range(5)]
    start_services()
    for i in range(60):
        await request_followup(
            bus, contractors[i % 5], soon(random.uniform(2, 6)), idempotency_key=f"t-{i}"
        )
    database = settings.database_url.rsplit("/", 1)[1]
    admin = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/postgres")
    try:
        for _ in range(4):
            await asyncio.sleep(1.2)
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = $1 AND pid <> pg_backend_pid()"
                " AND application_name <> 'followups-tests'",
                database,
            )
    finally:
        await admin.close()
    rows = await wait_for_final(pool, 60, timeout=90)
    assert len(rows) == 60
    assert_delivered_once_each(receiver, rows)
    print(f"\npg_terminate_backend run: {len(receiver.calls)} calls for 60 follow-ups")


async def test_a_connection_lost_while_starting_the_call_is_not_waited_out(
    pool, bus, receiver, start_services
):
    """The database ends the dispatcher's connection in the middle of the statement that starts
    the call (held up here by the send window's lock). The delivery runs again in the process
    and takes its own claim back: the send goes out then, not after the claim's lease (65 s
    here) or the repair sweep (an hour's grace here)."""
    contractor = await add_contractor(pool)
    start_services(WEBHOOK_TIMEOUT_SECONDS="30", SWEEP_GRACE_SECONDS="3600")
    holder = await pool.acquire()
    try:
        await holder.execute("SELECT pg_advisory_lock($1, $2)", *SEND_WINDOW)
        await request_followup(bus, contractor, soon(2), idempotency_key="lost-start")

        assert await wait_until(lambda: send_window_waiter(pool), 30)
        await pool.execute("SELECT pg_terminate_backend($1)", await send_window_waiter(pool))
    finally:
        await holder.execute("SELECT pg_advisory_unlock($1, $2)", *SEND_WINDOW)
        await pool.release(holder)
    rows = await wait_for_final(pool, 1, timeout=40)
    assert_delivered_once_each(receiver, rows)
    assert len(receiver.calls) == 1
    detail = await pool.fetchval(
        "SELECT detail FROM followup_transitions WHERE followup_id = $1 AND to_status = 'sending'"
        " ORDER BY id DESC LIMIT 1",
        rows[0]["id"],
    )
    assert detail.get("resumed") is True, detail


async def test_purged_timer_queues_are_repaired_by_the_sweep(
    pool, bus, receiver, settings, start_services
):
    contractor = await add_contractor(pool)
    start_services(SWEEP_INTERVAL_SECONDS="1", SWEEP_GRACE_SECONDS="1")
    for i in range(30):
        await request_followup(
            bus, contractor, soon(random.uniform(4, 6)), idempotency_key=f"lost-{i}"
        )
    assert await wait_until(_rows(pool, 30), 20)
    connection = await aio_pika.connect(settings.rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        purged = 0
        for name in timer_queues():
            queue = await channel.get_queue(name)
            purged += (await queue.purge()).message_count
    rows = await wait_for_final(pool, 30, timeout=60)
    assert len(rows) == 30
    assert_delivered_once_each(receiver, rows)
    print(f"\npurged {purged} timers; all 30 follow-ups delivered by the repair sweep")


def _rows(pool, n):
    async def check():
        return await pool.fetchval("SELECT count(*) FROM contractor_followup_schedules") >= n

    return check
