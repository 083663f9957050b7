"""`followups list`, `show` and `stats` read the real database and print what operators need."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from tests.integration.test_queries import add_followup
from tests.support.cli import followups
from tests.support.data import add_contractor


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
    assert f"│ {urgent} " in lines[0]
    assert "│ 9 " in lines[0]
    assert "prio" in result.output

    typed = await followups(settings, "list", "--type", "payment", "--contractor", str(sam))
    assert str(later) in typed.output
    assert "sent" not in [cell.strip() for cell in typed.output.split("│")]

    bad = await followups(settings, "list", "--status", "lost")
    assert bad.exit_code == 2


async def test_overdue_lists_pending_rows_past_their_time(settings, pool):
    now = datetime.now(UTC)
    sam = await add_contractor(pool)
    stuck = await add_followup(pool, sam, now - timedelta(minutes=3))
    await add_followup(pool, sam, now + timedelta(minutes=3), followup_type="future")
    result = await followups(settings, "list", "--overdue")
    assert f"│ {stuck} " in result.output
    assert "future" not in result.output


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
