"""`--json` on `followups list`, `show` and `dlq list`: the same facts as the tables, as JSON
that a script can read, with nothing else on stdout; and `followups --version`."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from importlib.metadata import version

from tests.integration.test_cli_dlq import channel, put_two_rejected_commands  # noqa: F401
from tests.integration.test_queries import add_followup
from tests.support.cli import followups
from tests.support.data import add_contractor


async def test_list_json_is_every_matching_row_soonest_first(settings, pool):
    now = datetime.now(UTC)
    sam = await add_contractor(pool)
    later = await add_followup(pool, sam, now + timedelta(hours=5), followup_type="payment")
    sooner = await add_followup(pool, sam, now + timedelta(minutes=30), priority=9)
    await add_followup(pool, sam, now - timedelta(hours=1), status="sent", sent_at=now)

    result = await followups(settings, "list", "--status", "scheduled", "--json")

    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["id"] for r in rows] == [sooner, later]
    assert rows[0]["priority"] == 9
    assert rows[0]["status"] == "scheduled"
    assert datetime.fromisoformat(rows[0]["scheduled_time"]).tzinfo is not None
    assert rows[1]["followup_type"] == "payment"


async def test_list_json_of_nothing_is_an_empty_list(settings, pool):
    result = await followups(settings, "list", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == []


async def test_show_json_has_the_row_timeline_and_calls_without_the_text(settings, pool):
    sam = await add_contractor(pool)
    sent_at = datetime.now(UTC)
    followup_id = await add_followup(
        pool, sam, sent_at - timedelta(seconds=1), status="sent", sent_at=sent_at, key="k-show"
    )
    await pool.execute(
        """INSERT INTO followup_transitions (followup_id, stage, from_status, to_status, detail)
           VALUES ($1, 'dispatcher', 'sending', 'sent', '{"http": 200}')""",
        followup_id,
    )

    by_id = await followups(settings, "show", str(followup_id), "--json")
    by_key = await followups(settings, "show", "--key", "k-show", "--json")

    assert by_id.exit_code == 0, by_id.output
    shown = json.loads(by_id.stdout)
    assert shown["followup"]["id"] == followup_id
    assert shown["followup"]["status"] == "sent"
    assert shown["text"] == "template"
    assert shown["lateness_ms"] is not None
    assert [t["to_status"] for t in shown["transitions"]] == ["sent"]
    assert shown["transitions"][0]["detail"] == {"http": 200}
    assert shown["calls"] == []
    assert "Hi {first_name}" not in by_id.stdout
    assert json.loads(by_key.stdout)["followup"]["id"] == followup_id


async def test_show_json_of_a_missing_follow_up_fails_as_the_table_does(settings, pool):
    result = await followups(settings, "show", "999999", "--json")
    assert result.exit_code == 1
    assert result.stdout == ""


async def test_dlq_list_json_overview_and_one_queue(settings, channel):  # noqa: F811
    await put_two_rejected_commands(channel)

    overview = await followups(settings, "dlq", "list", "--json")
    one = await followups(settings, "dlq", "list", "--queue", "scheduler", "--json")
    with_body = await followups(settings, "dlq", "list", "-q", "scheduler", "--json", "--body")

    assert overview.exit_code == 0, overview.output
    depths = {q["queue"]: q["messages"] for q in json.loads(overview.stdout)}
    assert depths["followups.scheduler.inbox.dlq"] == 2
    assert "followups.dispatcher.due.dlq" in depths
    assert one.exit_code == 0, one.output
    listed = json.loads(one.stdout)
    assert listed["queue"] == "followups.scheduler.inbox.dlq"
    assert listed["messages"] == 2
    assert [m["reason"] for m in listed["shown"]] == [
        "store_unavailable: database down",
        "schema: contractor_id: not an integer",
    ]
    assert listed["shown"][0]["routing_key"] == "followup.cancel_requested"
    assert all("body" not in m for m in listed["shown"])
    assert "seven" in json.loads(with_body.stdout)["shown"][1]["body"]


async def test_version(settings):
    result = await followups(settings, "--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"followups {version('followups')}"
