"""Carrier feedback through the real services: delivery reports recorded in and out of order, bad
reports dead-lettered with their rule, a throttling report that halves the rate two dispatcher
replicas send at, recovery, and a permanent failure that stops sends to a phone."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta

import aio_pika
import pytest

from shared.topology import PUBLIC_EXCHANGE, SCHEDULER_INBOX
from tests.e2e.conftest import publish_command, request_followup, soon, wait_for_final, wait_until
from tests.support.data import add_contractor

CASE_HEADER = "x-test-case"
# A minute at the halved rate and the sends after it take longer than the default timeout, and an
# interrupted run would leave its vhost and database behind.
pytestmark = pytest.mark.timeout(400)


def reported(seconds_ago: float) -> str:
    return (datetime.now(UTC) - timedelta(seconds=seconds_ago)).isoformat()


async def send_report(bus, send_key, status: str, seconds_ago: float, code: str | None = None):
    body = {
        "idempotency_key": str(send_key),
        "status": status,
        "reported_at": reported(seconds_ago),
    }
    if code is not None:
        body["error_code"] = code
    await publish_command(bus, "followup.delivery_reported", body)


async def sent_rows(pool, n: int, timeout: float = 60) -> list:
    rows = await wait_for_final(pool, n, timeout)
    assert len(rows) >= n
    return rows


def max_in_any_minute(times: list[float]) -> int:
    times = sorted(times)
    return max(len([t for t in times[i:] if t < start + 60]) for i, start in enumerate(times))


async def test_reports_are_recorded_in_and_out_of_order_and_bad_ones_dead_lettered(
    pool, bus, events, settings, start_services
):
    contractor = await add_contractor(pool)
    start_services()
    for n in range(2):
        await request_followup(bus, contractor, soon(1.5), idempotency_key=f"report-{n}")
    first, second = await sent_rows(pool, 2)
    # In order: undelivered, then delivered. Out of order: the later one arrives first.
    await send_report(bus, first["send_key"], "undelivered", 20, "30008")
    await events.first("followup.delivery_recorded", first["id"])
    await send_report(bus, first["send_key"], "delivered", 10)
    await send_report(bus, second["send_key"], "delivered", 10)
    await events.first("followup.delivery_recorded", second["id"])
    await send_report(bus, second["send_key"], "failed", 30, "30008")

    async def settled() -> bool:
        return len(events.named("followup.delivery_recorded")) >= 3

    assert await wait_until(settled, 20)
    await asyncio.sleep(1.0)  # the stale report's turn
    rows = {
        r["id"]: r
        for r in await pool.fetch(
            "SELECT id, delivery_status, delivery_error_code FROM contractor_followup_schedules"
        )
    }
    assert (rows[first["id"]]["delivery_status"], rows[first["id"]]["delivery_error_code"]) == (
        "delivered",
        None,
    )
    assert rows[second["id"]]["delivery_status"] == "delivered", "the later report wins"
    recorded = events.named("followup.delivery_recorded")
    assert [(e["followup_id"], e["delivery_status"]) for e in recorded] == [
        (first["id"], "undelivered"),
        (first["id"], "delivered"),
        (second["id"], "delivered"),
    ]
    assert all("phone" not in e and "message" not in e for e in recorded)
    timeline = await pool.fetch(
        """SELECT detail FROM followup_transitions WHERE followup_id = $1 AND stage = 'gateway'
           ORDER BY id""",
        second["id"],
    )
    assert ["superseded_by" in t["detail"] for t in timeline] == [False, True]

    bad = {
        "unknown_key": (
            {"idempotency_key": "6f1c2a8e-0000-4000-8000-000000000000", "status": "delivered"},
            "unknown_reference",
        ),
        "bad_status": ({"idempotency_key": str(first["send_key"]), "status": "read"}, "schema"),
        "naive_time": (
            {
                "idempotency_key": str(first["send_key"]),
                "status": "delivered",
                "reported_at": "2026-11-30T09:00:00",
            },
            "schema",
        ),
    }
    connection = await aio_pika.connect(settings.rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(PUBLIC_EXCHANGE, ensure=False)
        for case, (body, _rule) in bad.items():
            body.setdefault("reported_at", reported(1))
            await exchange.publish(
                aio_pika.Message(
                    json.dumps(body).encode(),
                    content_type="application/json",
                    headers={CASE_HEADER: case},
                ),
                routing_key="followup.delivery_reported",
            )
        dlq = await channel.get_queue(SCHEDULER_INBOX.dead_letter_queue, ensure=False)
        rules: dict[str, str] = {}
        deadline = time.monotonic() + 30
        while len(rules) < len(bad) and time.monotonic() < deadline:
            message = await dlq.get(no_ack=False, fail=False)
            if message is None:
                await asyncio.sleep(0.1)
                continue
            await message.ack()
            headers = message.headers or {}
            case = headers.get(CASE_HEADER)
            if case in bad:
                rules[str(case)] = str(headers.get("x-error-rule"))
    assert rules == {case: rule for case, (_body, rule) in bad.items()}
    assert (
        await pool.fetchval(
            "SELECT delivery_status FROM contractor_followup_schedules WHERE id = $1", first["id"]
        )
        == "delivered"
    )


async def test_a_throttling_report_halves_the_rate_two_dispatchers_send_at_and_recovery_raises_it(
    pool, bus, events, receiver, start_services
):
    ceiling = 4
    contractor = await add_contractor(pool)
    services = start_services(
        SMS_RATE_LIMIT_PER_MINUTE=str(ceiling), SMS_RATE_RECOVERY_DELIVERIES="2"
    )
    services.add("dispatcher-2", "dispatcher")
    await request_followup(bus, contractor, soon(1.5), idempotency_key="probe")
    (probe,) = await sent_rows(pool, 1)
    await send_report(bus, probe["send_key"], "undelivered", 1, "30007")
    halved = await events.first("followup.send_rate_changed", probe["id"])
    halved_at = time.time()
    assert (halved["limit_per_minute"], halved["cause"]) == (ceiling // 2, "error_code 30007")
    assert halved["previous_limit_per_minute"] == ceiling

    for n in range(4):
        await request_followup(bus, contractor, soon(2), idempotency_key=f"after-{n}")
    # The ceiling would let three more go at once; the halved rate lets one.
    await asyncio.sleep(20)
    assert len(receiver.calls) == 2, [c.received_at - halved_at for c in receiver.calls]
    waiting = await pool.fetchval(
        "SELECT count(*) FROM contractor_followup_schedules"
        " WHERE status IN ('scheduled', 'sending')"
    )
    assert waiting == 3

    # A window after the halving, two deliveries in a row raise the rate by one.
    await asyncio.sleep(max(0.0, halved_at + 61 - time.time()))
    sent = await pool.fetch(
        "SELECT id, send_key FROM contractor_followup_schedules WHERE status = 'sent' ORDER BY id"
    )
    for row in sent[:2]:
        await send_report(bus, row["send_key"], "delivered", 0.5)

    async def raised() -> bool:
        return len(events.named("followup.send_rate_changed")) >= 2

    assert await wait_until(raised, 20)
    rise = events.named("followup.send_rate_changed")[1]
    assert (rise["limit_per_minute"], rise["cause"]) == (ceiling // 2 + 1, "recovery")
    assert await pool.fetchval("SELECT limit_per_minute FROM send_rate") == ceiling // 2 + 1
    rows = await wait_for_final(pool, 5, timeout=150)
    assert [r["status"] for r in rows] == ["sent"] * 5
    times = [c.received_at for c in receiver.calls]
    assert len(times) == 5
    # Both replicas counted the window at the stored rate: never more than it in any minute.
    before_rise = [t for t in times if t < halved_at + 60]
    assert max_in_any_minute(before_rise) <= ceiling // 2
    assert max_in_any_minute(times) <= ceiling // 2 + 1
    assert "send rate changed" in services.logs()
    print(f"\nsend offsets from the halving: {[round(t - halved_at, 1) for t in sorted(times)]}")


async def test_a_permanent_failure_skips_the_contractors_pending_followups(
    pool, bus, events, receiver, start_services
):
    contractor = await add_contractor(pool)
    other = await add_contractor(pool, phone="+14155550100", first_name="Alex")
    start_services()
    await request_followup(bus, contractor, soon(1.5), idempotency_key="first")
    (first,) = await sent_rows(pool, 1)
    far = datetime.now(UTC) + timedelta(hours=2)
    for key, who in (("later-1", contractor), ("later-2", contractor), ("theirs", other)):
        await request_followup(bus, who, far, idempotency_key=key)

    async def scheduled() -> bool:
        return (
            await pool.fetchval(
                "SELECT count(*) FROM contractor_followup_schedules WHERE status = 'scheduled'"
            )
            == 3
        )

    assert await wait_until(scheduled, 20)
    await send_report(bus, first["send_key"], "undelivered", 1, "30005")

    async def skipped() -> bool:
        return len(events.named("followup.skipped")) >= 2

    assert await wait_until(skipped, 20)
    rows = {
        r["idempotency_key"]: (r["status"], r["status_reason"])
        for r in await pool.fetch(
            "SELECT idempotency_key, status, status_reason FROM contractor_followup_schedules"
        )
    }
    assert rows["key:later-1"] == rows["key:later-2"] == ("skipped", "undeliverable")
    assert rows["key:theirs"] == ("scheduled", None)
    # A new one for the same phone is recorded skipped and never sent; a new phone sends again.
    await request_followup(bus, contractor, soon(1.5), idempotency_key="while-undeliverable")

    def recorded(key: str):
        async def check() -> bool:
            status = await pool.fetchval(
                "SELECT status FROM contractor_followup_schedules WHERE idempotency_key = $1",
                f"key:{key}",
            )
            return status in ("skipped", "sent")

        return check

    assert await wait_until(recorded("while-undeliverable"), 20)
    await pool.execute("UPDATE contractors SET phone = '+14155550199' WHERE id = $1", contractor)
    await request_followup(bus, contractor, soon(1.5), idempotency_key="new-phone")
    assert await wait_until(recorded("new-phone"), 30)
    final = dict(
        await pool.fetch(
            """SELECT idempotency_key, status FROM contractor_followup_schedules
               WHERE idempotency_key IN ('key:while-undeliverable', 'key:new-phone')"""
        )
    )
    assert final == {"key:while-undeliverable": "skipped", "key:new-phone": "sent"}
    assert {c.json["followup_id"] for c in receiver.calls} == {
        first["id"],
        await pool.fetchval(
            "SELECT id FROM contractor_followup_schedules WHERE idempotency_key = 'key:new-phone'"
        ),
    }
