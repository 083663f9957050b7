"""`followups prune` removes old transitions and webhook calls of finished follow-ups only."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tests.integration.test_queries import add_followup
from tests.support.cli import followups
from tests.support.data import add_contractor

OLD = timedelta(days=100)


async def add_history(pool, followup_id: int, age: timedelta, count: int = 1) -> None:
    for attempt in range(1, count + 1):
        await pool.execute(
            """INSERT INTO followup_transitions (followup_id, at, stage, to_status)
               VALUES ($1, now() - $2::interval, 'test', 'sent')""",
            followup_id,
            age,
        )
        await pool.execute(
            """INSERT INTO webhook_calls (followup_id, send_key, attempt, called_at)
               VALUES ($1, gen_random_uuid(), $2, now() - $3::interval)""",
            followup_id,
            attempt,
            age,
        )


async def history(pool, followup_id: int) -> tuple[int, int]:
    return (
        await pool.fetchval(
            "SELECT count(*) FROM followup_transitions WHERE followup_id = $1", followup_id
        ),
        await pool.fetchval(
            "SELECT count(*) FROM webhook_calls WHERE followup_id = $1", followup_id
        ),
    )


async def test_prune_removes_old_rows_of_final_follow_ups_in_batches(settings, pool):
    now = datetime.now(UTC)
    sam = await add_contractor(pool)
    finished = {
        status: await add_followup(pool, sam, now - OLD, status=status)
        for status in ("sent", "cancelled", "skipped", "failed")
    }
    pending = await add_followup(pool, sam, now - OLD, status="scheduled")
    in_flight = await add_followup(pool, sam, now - OLD, status="sending")
    recent = await add_followup(pool, sam, now - timedelta(days=10), status="sent")
    for followup_id in (*finished.values(), pending, in_flight):
        await add_history(pool, followup_id, OLD, count=3)
    await add_history(pool, recent, timedelta(days=10))
    await add_history(pool, finished["sent"], timedelta(seconds=5))  # inside the send window
    before = {f: await history(pool, f) for f in (*finished.values(), pending, in_flight, recent)}

    result = await followups(settings, "prune", "--older-than", "90d", "--batch", "4")
    assert result.exit_code == 0, result.output

    for followup_id in finished.values():
        kept = (1, 1) if followup_id == finished["sent"] else (0, 0)
        assert await history(pool, followup_id) == kept
    for followup_id in (pending, in_flight, recent):
        assert await history(pool, followup_id) == before[followup_id]
    removed = 4 * 3
    assert f"followup_transitions: {removed:,} rows removed" in result.output
    assert f"webhook_calls: {removed:,} rows removed" in result.output
    # Batches of four: progress after each.
    assert result.output.count("followup_transitions: ") >= removed // 4

    again = await followups(settings, "prune", "--older-than", "90d")
    assert "followup_transitions: 0 rows removed" in again.output


async def test_prune_refuses_a_cutoff_inside_the_last_day(settings, pool):
    result = await followups(settings, "prune", "--older-than", "1h")
    assert result.exit_code == 2
    assert "at least 1 day" in result.output
