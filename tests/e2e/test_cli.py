"""Every operator command against the three running services, the way an operator uses them."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import timedelta

import aio_pika

from shared.topology import DEAD_LETTER_EXCHANGE, PUBLIC_EXCHANGE, SCHEDULER_INBOX, WORK_QUEUES
from tests.e2e.conftest import soon, wait_until
from tests.support.cli import followups
from tests.support.data import add_contractor


def cli_env(receiver) -> dict[str, str]:
    return {"N8N_OUTBOUND_WEBHOOK_URL": receiver.url, "WEBHOOK_ALLOW_INSECURE": "true"}


async def row_by_key(pool, key: str):
    return await pool.fetchrow(
        "SELECT * FROM contractor_followup_schedules WHERE idempotency_key = $1", f"key:{key}"
    )


async def test_doctor_is_green_against_running_services(settings, receiver, start_services):
    # Earlier tests of the session leave dead letters, which doctor rightly warns about.
    connection = await aio_pika.connect(settings.rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        for work in WORK_QUEUES:
            await (await channel.get_queue(work.dead_letter_queue)).purge()
    start_services()
    result = await followups(settings, "doctor", "--json", **cli_env(receiver))
    checks = {c["name"]: c for c in json.loads(result.output)}
    assert result.exit_code == 0, result.output
    assert {c["level"] for c in checks.values()} <= {"ok", "warn"}
    assert checks["queue followups.dispatcher.due"]["level"] == "ok"
    assert "accepts connections (nothing sent)" in checks["webhook"]["detail"]
    assert receiver.calls == []


async def test_schedule_list_cancel_and_show(settings, pool, receiver, start_services):
    start_services()
    contractor = await add_contractor(pool)
    env = cli_env(receiver)
    scheduled = await followups(
        settings,
        "schedule",
        "-c",
        str(contractor),
        "--in",
        "1h",
        "-t",
        "Hi {first_name}",
        "--key",
        "cli-cancel",
        "--priority",
        "4",
        **env,
    )
    assert scheduled.exit_code == 0, scheduled.output
    assert await wait_until(lambda: row_by_key(pool, "cli-cancel"))
    row = await row_by_key(pool, "cli-cancel")

    listed = await followups(settings, "list", "--contractor", str(contractor), **env)
    cells = next(
        re.split(r"\s{2,}", line.strip())
        for line in listed.output.splitlines()
        if line.strip().startswith(f"{row['id']} ")
    )
    assert cells[3:5] == ["scheduled", "in 1 h"]
    assert "4" in cells[5:]

    cancelled = await followups(settings, "cancel", str(row["id"]), "--reason", "called back")

    async def is_cancelled() -> bool:
        current = await row_by_key(pool, "cli-cancel")
        return current["status"] == "cancelled"

    assert cancelled.exit_code == 0, cancelled.output
    assert await wait_until(is_cancelled)

    shown = await followups(settings, "show", str(row["id"]))
    assert shown.exit_code == 0, shown.output
    assert "cancelled" in shown.output
    assert "timeline" in shown.output
    assert receiver.calls == []


async def test_reschedule_by_key_fires_at_the_new_time(settings, pool, receiver, start_services):
    services = start_services()
    contractor = await add_contractor(pool)
    await followups(
        settings,
        "schedule",
        "-c",
        str(contractor),
        "--in",
        "2h",
        "-t",
        "Hi {first_name}",
        "--key",
        "cli-move",
    )
    assert await wait_until(lambda: row_by_key(pool, "cli-move"))
    moved = await followups(settings, "reschedule", "--key", "cli-move", "--in", "2s")
    assert moved.exit_code == 0, moved.output

    async def sent() -> bool:
        current = await row_by_key(pool, "cli-move")
        return current["status"] == "sent"

    assert await wait_until(sent, timeout=30), services.logs()[-3000:]
    row = await row_by_key(pool, "cli-move")
    assert row["scheduled_time"] < soon(0)
    assert len(receiver.calls_for(row["id"])) == 1
    print(f"\nrescheduled send lateness: {row['lateness_ms']:.1f} ms")

    shown = await followups(settings, "show", "--key", "cli-move")
    assert "webhook calls" in shown.output
    stats = json.loads((await followups(settings, "stats", "--json")).output)
    assert stats["by_status"].get("sent", 0) >= 1


async def test_dead_letters_are_listed_and_a_fixed_one_is_replayed(
    settings, pool, bus, start_services
):
    services = start_services()
    contractor = await add_contractor(pool)
    await followups(settings, "dlq", "purge", "--queue", "scheduler", "--yes")
    # A sender's mistake: dead-lettered by the scheduler with a reason.
    await bus.publish(
        json.dumps({"contractor_id": contractor}).encode(),
        exchange=PUBLIC_EXCHANGE,
        routing_key="followup.requested",
        mandatory=False,
    )
    # A good command that was dead-lettered earlier (say, the database was down for too long).
    good = {
        "contractor_id": contractor,
        "scheduled_time": soon(3600).isoformat(),
        "followup_type": "check_in",
        "message_template": "Hi {first_name}",
        "idempotency_key": "cli-replayed",
    }
    connection = await aio_pika.connect(settings.rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        dlx = await channel.get_exchange(DEAD_LETTER_EXCHANGE)
        await dlx.publish(
            aio_pika.Message(
                json.dumps(good).encode(),
                content_type="application/json",
                headers={
                    "x-death": [
                        {
                            "reason": "delivery_limit",
                            "queue": SCHEDULER_INBOX.name,
                            "routing-keys": ["followup.requested"],
                        }
                    ]
                },
            ),
            routing_key=SCHEDULER_INBOX.dead_letter_queue,
        )

    async def two_dead() -> bool:
        listing = await followups(settings, "dlq", "list", "--queue", "scheduler")
        return "2 message(s)" in listing.output

    assert await wait_until(two_dead), services.logs()[-3000:]
    replay = await followups(settings, "dlq", "replay", "--queue", "scheduler")
    assert "replayed 1, kept 1" in replay.output
    assert "schema" in replay.output
    assert await wait_until(lambda: row_by_key(pool, "cli-replayed"))
    await asyncio.sleep(0.5)
    overview = await followups(settings, "dlq", "list")
    assert re.search(r"followups\.scheduler\.inbox\.dlq\s+│ 1 ", overview.output), overview.output
    row = await row_by_key(pool, "cli-replayed")
    assert row["scheduled_time"] > soon(0) + timedelta(minutes=30)
