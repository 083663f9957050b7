"""`followups list`, `show` and `stats` read the real database and print what operators need."""

from __future__ import annotations

import asyncio
import json
import re
from datetime import UTC, datetime, timedelta

from typer.testing import CliRunner

from services.cli import common
from services.cli.main import app
from tests.integration.test_queries import add_followup
from tests.support.cli import followups
from tests.support.data import add_contractor


def cells(output: str) -> list[list[str]]:
    """The table's rows as lists of cells (columns are two or more spaces apart)."""
    return [re.split(r"\s{2,}", line.strip()) for line in output.splitlines() if line.strip()]


def row_of(output: str, followup_id: int) -> list[str]:
    return next(c for c in cells(output) if c[0] == str(followup_id))


async def test_list_filters_and_shows_priority(settings, pool):
    now = datetime.now(UTC)
    sam = await add_contractor(pool)
    urgent = await add_followup(
        pool, sam, now + timedelta(minutes=30), priority=9, followup_type="payment"
    )
    later = await add_followup(pool, sam, now + timedelta(hours=5), followup_type="payment")
    await add_followup(pool, sam, now - timedelta(hours=1), status="sent", sent_at=now)

    result = await followups(settings, "list", "--status", "scheduled", "--due-before", "1h")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "payment" in line]
    assert len(lines) == 1
    assert row_of(result.output, urgent)[:5] == [
        str(urgent),
        str(sam),
        "payment",
        "scheduled",
        "in 30 min",
    ]
    assert "9" in row_of(result.output, urgent)
    assert "prio" in result.output

    typed = await followups(settings, "list", "--type", "payment", "--contractor", str(sam))
    assert str(later) in typed.output
    assert not [c for c in cells(typed.output) if "sent" in c]

    bad = await followups(settings, "list", "--status", "lost")
    assert bad.exit_code == 2


async def test_overdue_lists_pending_rows_past_their_time(settings, pool):
    now = datetime.now(UTC)
    sam = await add_contractor(pool)
    stuck = await add_followup(pool, sam, now - timedelta(minutes=3))
    await add_followup(pool, sam, now + timedelta(minutes=3), followup_type="future")
    result = await followups(settings, "list", "--overdue")
    assert row_of(result.output, stuck)[4] == "3 min ago"
    assert "future" not in result.output


async def narrow_list(settings, *args: str) -> str:
    """`followups list` in an 80-column terminal."""
    environment = {"DATABASE_URL": settings.database_url, "COLUMNS": "80"}

    def run() -> str:
        common.console.width = 80
        result = CliRunner().invoke(app, ["list", *args], env=environment)
        assert result.exit_code == 0, result.output
        return result.output

    return await asyncio.to_thread(run)


async def test_list_at_80_columns_says_why_each_pending_one_waits(settings, pool):
    now = datetime.now(UTC)
    sam = await add_contractor(pool)
    morning = now + timedelta(hours=10)
    quiet = await add_followup(pool, sam, now - timedelta(minutes=2))
    await pool.execute(
        """UPDATE contractor_followup_schedules SET next_attempt_at = $2, deferred_until = $2,
               deferred_reason = 'quiet_hours 21:00-08:00 in America/New_York' WHERE id = $1""",
        quiet,
        morning,
    )
    waiting = await add_followup(pool, sam, now - timedelta(minutes=3), priority=3)
    await pool.execute(
        """UPDATE contractor_followup_schedules SET next_attempt_at = $2, waiting_since = $3,
               last_error = 'rate_limited' WHERE id = $1""",
        waiting,
        now + timedelta(minutes=20),
        now - timedelta(minutes=3),
    )
    retry = await add_followup(pool, sam, now - timedelta(minutes=4))
    await pool.execute(
        """UPDATE contractor_followup_schedules SET next_attempt_at = $2, attempts = 1,
               last_error = 'http_503' WHERE id = $1""",
        retry,
        now + timedelta(minutes=30),
    )
    sent = await add_followup(
        pool, sam, now - timedelta(minutes=1), status="sent", sent_at=now, lateness_ms=3.5
    )

    output = await narrow_list(settings)
    print(f"\n{output}")
    assert max(len(line) for line in output.splitlines()) <= 80
    assert "…" not in output
    text = " ".join(output.split())
    for followup_id, status, due in (
        (quiet, "scheduled", "2 min ago"),
        (waiting, "scheduled", "3 min ago"),
        (retry, "scheduled", "4 min ago"),
        (sent, "sent", "1 min ago"),
    ):
        assert row_of(output, followup_id)[3:5] == [status, due]
    for phrase in (
        "deferred: quiet hours, goes in 10 h",
        "waiting for a send place, goes in 20 min",
        "retry 2/3, goes in 30 min: http_503",
        "3.5 ms late",
    ):
        assert phrase in text, phrase


async def test_show_prints_row_text_path_timeline_and_calls(settings, pool):
    now = datetime.now(UTC)
    sam = await add_contractor(pool)
    fid = await add_followup(
        pool, sam, now, status="sent", sent_at=now, lateness_ms=12.5, key="show-me"
    )
    await pool.execute(
        "INSERT INTO followup_transitions (followup_id, stage, from_status, to_status, detail)"
        " VALUES ($1, 'dispatcher', 'sending', 'sent', $2)",
        fid,
        {"attempt": 1},
    )
    await pool.execute(
        "INSERT INTO webhook_calls (followup_id, send_key, attempt, outcome, http_status)"
        " SELECT id, send_key, 1, 'sent', 200 FROM contractor_followup_schedules WHERE id = $1",
        fid,
    )
    result = await followups(settings, "show", "--key", "show-me")
    assert result.exit_code == 0, result.output
    for expected in ("follow-up", "template", "12.5", "timeline", "webhook calls", "200"):
        assert expected in result.output
    assert '{"attempt": 1}' in result.output

    missing = await followups(settings, "show", str(fid + 999))
    assert missing.exit_code == 1
    assert "no follow-up" in missing.output


async def test_stats_as_json(settings, pool):
    now = datetime.now(UTC)
    sam = await add_contractor(pool)
    for n in range(4):
        await add_followup(
            pool,
            sam,
            now - timedelta(hours=1),
            status="sent",
            sent_at=now,
            lateness_ms=10.0 * (n + 1),
            prompt_variant="v1",
            responded_after=timedelta(minutes=5) if n == 0 else None,
        )
    result = await followups(settings, "stats", "--json", "--since", "-1d")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    print(f"\nstats: {data['by_status']} response_rate={data['response_rate']}")
    assert data["by_status"] == {"sent": 4}
    assert data["response_rate"] == 0.25
    assert data["by_prompt_variant"] == [{"group": "v1", "sent": 4, "responded": 1, "rate": 0.25}]
    assert data["lateness_p50_ms"] == 25.0

    table = await followups(settings, "stats")
    assert "response rate" in table.output
    assert "25.0%" in table.output


async def test_schedule_publishes_every_option_and_falls_back_to_the_key(settings, pool):
    """No scheduler runs here: the request is published with its options, and schedule says
    which key finds it once it is recorded."""
    import aio_pika

    from shared.topology import PUBLIC_EXCHANGE

    sam = await add_contractor(pool)
    item = await pool.fetchval(
        "INSERT INTO contractor_action_items (contractor_id, title, status)"
        " VALUES ($1, 'W-9', 'pending') RETURNING id",
        sam,
    )
    connection = await aio_pika.connect(settings.rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(PUBLIC_EXCHANGE, routing_key="followup.requested")
        result = await followups(
            settings,
            "schedule",
            "-c",
            str(sam),
            "--in",
            "2h",
            "-t",
            "Hi {first_name}",
            "--priority",
            "7",
            "--every-days",
            "7",
            "--action-item",
            str(item),
            "--skip-if-completed",
            "--hint",
            "topic=W-9",
            "--wait",
            "0.5",
            QUIET_HOURS="off",
        )
        assert result.exit_code == 0, result.output
        message = await queue.get(timeout=10)
        await message.ack()
    body = json.loads(message.body)
    key = re.search(r"key (cli-[0-9a-f]{12}): not recorded within 0.5 s", result.output)
    assert key, result.output
    assert "followups show --key" in result.output
    assert body["idempotency_key"] == key[1]
    assert body["priority"] == 7
    assert (body["is_recurring"], body["recurrence_interval_days"]) == (True, 7)
    assert (body["action_item_id"], body["skip_if_completed"]) == (item, True)
    assert body["ai_context_hints"] == {"topic": "W-9"}
    assert "(in 2 h)" in result.output


async def test_schedule_names_a_missing_contractor(settings, pool):
    result = await followups(settings, "schedule", "-c", "999999", "--in", "1h", "-t", "Hi")
    assert result.exit_code == 1
    assert "no contractor 999999" in result.output
    assert "add-contractor" in result.output
