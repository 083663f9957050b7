"""The effectiveness dashboard's queries, read out of deploy/grafana/effectiveness.json and run on a
database filled with known rows: every figure checked exactly; the read-only role can run them all
and write nothing; `followups stats` prints the same figures."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from itertools import count
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from services.cli.dashboard import COLUMNS
from services.scheduler.handlers import opt_change
from shared import effectiveness as fx
from testbed.infra import PG_ADMIN, Infra
from tests.support.cli import followups
from tests.support.data import add_contractor

ROOT = Path(__file__).resolve().parents[2]
START = datetime(2025, 11, 1, tzinfo=UTC)
END = datetime(2025, 11, 8, tzinfo=UTC)
WINDOW = fx.Window(START, END, "America/New_York")
_keys = count(1)


def dashboard_sql() -> dict[str, str]:
    """Each panel's SQL as Grafana gets it, by the query's name."""
    dashboard = json.loads((ROOT / "deploy/grafana/effectiveness.json").read_text())
    return {
        target["refId"]: target["rawSql"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    }


async def panel(pool: asyncpg.Pool, name: str, window: fx.Window = WINDOW) -> list[dict[str, Any]]:
    sql, args = fx.bind(dashboard_sql()[name], window)
    return [dict(r) for r in await pool.fetch(sql, *args)]


async def by_group(pool: asyncpg.Pool, name: str) -> dict[str, tuple[Any, ...]]:
    """A response panel as {group: (sent, responded, response rate, median seconds)}."""
    return {
        r["group"]: (r["sent"], r["responded"], r["response_rate"], r["median_response_seconds"])
        for r in await panel(pool, name)
    }


async def sent(
    pool: asyncpg.Pool,
    contractor_id: int,
    at: datetime | None,
    *,
    followup_type: str = "check_in",
    tone: str = "friendly",
    variant: str | None = None,
    source: str = "template",
    reply: str | None = None,
    after: float = 0,
    delivery: str | None = None,
    code: str | None = None,
    status: str = "sent",
) -> int:
    followup_id: int = await pool.fetchval(
        """INSERT INTO contractor_followup_schedules
               (contractor_id, scheduled_time, followup_type, message_template, message_tone,
                status, sent_at, sent_by, response_received_at, response_text, prompt_variant,
                text_source, delivery_status, delivery_error_code, idempotency_key)
           VALUES ($1, coalesce($2::timestamptz, $13), $3, 'Hi {first_name}', $4, $5, $2,
                   'dispatcher', $2::timestamptz + make_interval(secs => $6), $7, $8, $9, $10,
                   $11, $12)
           RETURNING id""",
        contractor_id,
        at,
        followup_type,
        tone,
        status,
        after if reply is not None else None,
        reply,
        variant,
        source,
        delivery,
        code,
        f"fx:{next(_keys)}",
        START,
    )
    return followup_id


def _utc(day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2025, 11, day, hour, minute, tzinfo=UTC)


@pytest.fixture
async def known_rows(pool: asyncpg.Pool) -> asyncpg.Pool:
    """Nine follow-ups sent in the week of WINDOW, and some that must not count.

    Ana lives in Los Angeles, Ben has no zone (the default, New York), Cy has one PostgreSQL does
    not know (the default too). New York left summer time on 2 November 2025 at 06:00 UTC."""
    ana = await add_contractor(pool, first_name="Ana", timezone="America/Los_Angeles")
    ben = await add_contractor(pool, first_name="Ben")
    cy = await add_contractor(pool, first_name="Cy", timezone="Mars/Olympus")
    # on the range's first instant: 20:00 on 31 October in New York (summer time)
    await sent(pool, ben, START, delivery="delivered")
    await sent(
        pool, ana, _utc(2, 17), followup_type="onboarding", variant="v1", source="ai",
        reply="Yes, thanks", after=600, delivery="delivered",
    )  # fmt: skip
    await sent(
        pool, ana, _utc(2, 18), followup_type="onboarding", variant="v1", source="ai",
        delivery="undelivered", code="30007",
    )  # fmt: skip
    await sent(
        pool, ben, _utc(3, 14), followup_type="onboarding", tone="formal", reply="ok",
        after=1200, delivery="delivered",
    )  # fmt: skip
    await sent(
        pool, ben, _utc(3, 15), followup_type="payment", tone="formal", variant="v2",
        source="ai", reply="stop.", after=60, delivery="delivered",
    )  # fmt: skip
    await sent(
        pool, cy, _utc(4, 13), followup_type="payment", variant="v2", reply="  STOP ",
        after=3600, delivery="failed", code="30005",
    )  # fmt: skip
    await sent(
        pool, cy, _utc(5, 14, 30), followup_type="payment", delivery="undelivered", code="30007"
    )
    await sent(
        pool, ana, _utc(6, 17, 30), variant="v1", source="ai", reply="STOP by at 5", after=300,
        delivery="undelivered",
    )  # fmt: skip
    await sent(pool, ben, _utc(6, 20))  # no report yet
    # outside the range, or never sent
    await sent(pool, ben, START - timedelta(minutes=1), reply="STOP", delivery="delivered")
    await sent(pool, ben, END, reply="STOP", delivery="failed", code="30007")
    for status in ("scheduled", "failed", "cancelled", "skipped"):
        await sent(pool, cy, None, status=status)
    # the rate: halved before the range, halved and raised in it, raised after it
    for at, limit, previous, cause in (
        (datetime(2025, 10, 31, 12, tzinfo=UTC), 5, 10, "throttled"),
        (_utc(2, 12), 2, 5, "throttled"),
        (_utc(3, 12), 3, 2, "recovered"),
        (_utc(9, 0), 4, 3, "recovered"),
    ):
        await pool.execute(
            """INSERT INTO send_rate_changes (at, limit_per_minute, previous_limit, cause)
               VALUES ($1, $2, $3, $4)""",
            at,
            limit,
            previous,
            cause,
        )
    return pool


def test_the_dashboard_runs_the_module_queries():
    assert dashboard_sql() == {q.name: q.sql for q in fx.QUERIES}


async def test_every_query_returns_the_columns_it_names(known_rows):
    for query in fx.QUERIES:
        rows = await panel(known_rows, query.name)
        assert rows, query.name
        assert tuple(rows[0]) == query.columns, query.name
        assert set(query.columns) <= set(COLUMNS) | {"group", "time"}, query.name
        assert ("group" in query.columns) == bool(query.group_heading), query.name


async def test_responses_overall(known_rows):
    assert await panel(known_rows, "responses") == [
        {
            "group": "all",
            "sent": 9,
            "responded": 5,
            "response_rate": 5 / 9,
            "median_response_seconds": 600.0,
        }
    ]


async def test_responses_by_followup_type(known_rows):
    assert await by_group(known_rows, "responses_by_type") == {
        "check_in": (3, 1, 1 / 3, 300.0),
        "onboarding": (3, 2, 2 / 3, 900.0),
        "payment": (3, 2, 2 / 3, 1830.0),
    }


async def test_responses_by_tone(known_rows):
    assert await by_group(known_rows, "responses_by_tone") == {
        "formal": (2, 2, 1.0, 630.0),
        "friendly": (7, 3, 3 / 7, 600.0),
    }


async def test_responses_by_prompt_variant(known_rows):
    assert await by_group(known_rows, "responses_by_prompt_variant") == {
        "(none)": (4, 1, 0.25, 1200.0),
        "v1": (3, 2, 2 / 3, 450.0),
        "v2": (2, 2, 1.0, 1830.0),
    }


async def test_responses_ai_vs_template(known_rows):
    assert await by_group(known_rows, "responses_by_text_source") == {
        "ai": (4, 3, 0.75, 300.0),
        "template": (5, 2, 0.4, 2400.0),
    }


async def test_responses_by_local_hour_of_the_send(known_rows):
    """Hours on the contractor's clock: Los Angeles for Ana, the default zone for Ben (none) and
    Cy (unknown); summer time counted on the day it ends."""
    rows = await panel(known_rows, "responses_by_local_hour")
    assert [r["group"] for r in rows] == ["08", "09", "10", "15", "20"]
    assert await by_group(known_rows, "responses_by_local_hour") == {
        "08": (1, 1, 1.0, 3600.0),
        "09": (4, 3, 0.75, 600.0),
        "10": (2, 1, 0.5, 60.0),
        "15": (1, 0, 0.0, None),
        "20": (1, 0, 0.0, None),
    }


async def test_the_default_zone_is_the_dashboards_variable(known_rows):
    """In UTC, Ben's and Cy's sends move five hours (four for the one in summer time)."""
    rows = await panel(known_rows, "responses_by_local_hour", fx.Window(START, END, "UTC"))
    assert {r["group"]: r["sent"] for r in rows} == {
        "00": 1,  # Ben on the first instant
        "09": 2,  # Ana, Los Angeles either way
        "10": 1,
        "13": 1,
        "14": 2,
        "15": 1,
        "20": 1,
    }


async def test_delivery_rate(known_rows):
    assert await panel(known_rows, "delivery") == [
        {
            "sent": 9,
            "reported": 8,
            "delivered": 4,
            "undelivered": 3,
            "failed": 1,
            "delivery_rate": 0.5,
        }
    ]


async def test_share_of_each_error_code(known_rows):
    rows = await panel(known_rows, "error_codes")
    assert rows[0] == {"error_code": "30007", "reports": 2, "share": 0.5}
    assert {r["error_code"]: (r["reports"], r["share"]) for r in rows} == {
        "30007": (2, 0.5),
        "30005": (1, 0.25),
        "(none)": (1, 0.25),
    }


async def test_opt_outs_after_a_follow_up(known_rows):
    rows = await panel(known_rows, "opt_outs")
    assert {r["group"]: (r["sent"], r["opt_outs"], r["opt_out_rate"]) for r in rows} == {
        "check_in": (3, 0, 0.0),  # "STOP by at 5" is not an opt-out
        "onboarding": (3, 0, 0.0),
        "payment": (3, 2, 2 / 3),
    }


async def test_an_opt_out_is_the_reply_the_scheduler_takes_for_one(pool):
    """The dashboard's reading of a reply agrees with the scheduler's, word list included."""
    replies = [
        *fx.OPT_OUT_WORDS,
        "stop",
        " Stop! ",
        "UNSUBSCRIBE.",
        "\tquit\n",
        "stop.!",
        "STOP. .",
        "STOP by at 5",
        "START",
        "unstop",
        "please stop",
        "",
        "end?",
    ]
    sam = await add_contractor(pool)
    for reply in replies:
        await sent(pool, sam, _utc(3, 12), followup_type=f"t{next(_keys)}", reply=reply)
    await sent(pool, sam, _utc(3, 12), followup_type="t-no-reply")
    rows = await panel(pool, "opt_outs")
    counted = sum(r["opt_outs"] for r in rows)
    assert counted == sum(opt_change(reply) is True for reply in replies)
    from services.scheduler.handlers import OPT_OUT_WORDS

    assert set(fx.OPT_OUT_WORDS) == OPT_OUT_WORDS


async def test_send_rate_over_time(known_rows):
    assert [(r["time"], r["limit_per_minute"]) for r in await panel(known_rows, "send_rate")] == [
        (START, 5),  # set before the range
        (_utc(2, 12), 2),
        (_utc(3, 12), 3),
        (END, 3),
    ]


async def test_send_rate_before_any_change_is_what_the_first_change_started_from(known_rows):
    early = fx.Window(datetime(2025, 10, 1, tzinfo=UTC), datetime(2025, 10, 15, tzinfo=UTC), "UTC")
    rows = await panel(known_rows, "send_rate", early)
    assert [(r["time"], r["limit_per_minute"]) for r in rows] == [
        (early.start, 10),
        (early.end, 10),
    ]


async def test_nothing_recorded_gives_empty_panels_and_no_rate(pool):
    assert await panel(pool, "responses") == []
    assert await panel(pool, "delivery") == [
        {
            "sent": 0,
            "reported": 0,
            "delivered": 0,
            "undelivered": 0,
            "failed": 0,
            "delivery_rate": None,
        }
    ]
    assert await panel(pool, "error_codes") == []
    assert await panel(pool, "send_rate") == []


# ---- the read-only role ---------------------------------------------------------------------


@pytest.fixture
async def dashboard_role(infra: Infra, known_rows: asyncpg.Pool) -> AsyncIterator[asyncpg.Pool]:
    """deploy/grafana/readonly-role.sql applied in the test database under a role name of this
    test's own (roles are shared by every database of the server); a pool logged in as it."""
    role = f"followups_dashboard_{uuid.uuid4().hex[:10]}"
    script = (ROOT / "deploy/grafana/readonly-role.sql").read_text()
    try:
        await known_rows.execute(script.replace("followups_dashboard", role))
        reader = await asyncpg.create_pool(
            infra.database_url.replace("postgres@", f"{role}@"), min_size=1, max_size=1
        )
        try:
            yield reader
        finally:
            await reader.close()
    finally:
        admin = await asyncpg.connect(PG_ADMIN)
        try:
            if await admin.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role):
                await known_rows.execute(f'DROP OWNED BY "{role}"')
                await admin.execute(f'DROP ROLE "{role}"')
        finally:
            await admin.close()


async def test_the_read_only_role_runs_every_panel_and_gets_the_same_numbers(
    dashboard_role, known_rows
):
    for query in fx.QUERIES:
        assert await panel(dashboard_role, query.name) == await panel(known_rows, query.name), (
            query.name
        )
    assert await dashboard_role.fetchval("SELECT current_user") != "postgres"


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE contractor_followup_schedules SET status = 'cancelled'",
        "DELETE FROM send_rate_changes",
        "INSERT INTO contractors (first_name) VALUES ('Eve')",
        "TRUNCATE contractors CASCADE",
        "SELECT phone FROM contractors",
        "SELECT message_template FROM contractor_followup_schedules",
        "SELECT * FROM webhook_calls",
        "SELECT * FROM send_rate",
    ],
)
async def test_the_read_only_role_cannot_write_or_read_more(dashboard_role, statement):
    """Even in a transaction it asks to be read-write: the grants are the fence."""
    async with dashboard_role.acquire() as connection:
        await connection.execute("BEGIN READ WRITE")
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await connection.execute(statement)
        finally:
            await connection.execute("ROLLBACK")


async def test_the_read_only_role_cannot_create_tables(dashboard_role):
    async with dashboard_role.acquire() as connection:
        await connection.execute("BEGIN READ WRITE")
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await connection.execute("CREATE TABLE notes (x int)")
        finally:
            await connection.execute("ROLLBACK")
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            await connection.execute("CREATE TEMP TABLE notes (x int)")


async def test_applying_the_role_twice_is_harmless(dashboard_role, known_rows):
    role = await dashboard_role.fetchval("SELECT current_user")
    script = (ROOT / "deploy/grafana/readonly-role.sql").read_text()
    await known_rows.execute(script.replace("followups_dashboard", role))
    assert await panel(dashboard_role, "delivery") == await panel(known_rows, "delivery")


# ---- followups stats ------------------------------------------------------------------------


async def test_stats_json_has_the_dashboards_figures(settings, known_rows):
    result = await followups(
        settings, "stats", "--json", "--since", START.isoformat(), "--until", END.isoformat()
    )
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)["effectiveness"]
    assert shown["window"] == {
        "start": START.isoformat(),
        "end": END.isoformat(),
        "default_timezone": "America/New_York",
    }
    expected = await fx.figures(known_rows, WINDOW)
    assert set(shown["figures"]) == {q.name for q in fx.QUERIES}
    for name, rows in expected.items():
        assert shown["figures"][name] == json.loads(json.dumps(rows, default=datetime.isoformat))
    assert shown["figures"]["responses"][0]["response_rate"] == 5 / 9
    assert shown["figures"]["error_codes"][0] == {"error_code": "30007", "reports": 2, "share": 0.5}


async def test_stats_table_shows_the_figures(settings, known_rows):
    result = await followups(
        settings, "stats", "--since", START.isoformat(), "--until", END.isoformat()
    )
    assert result.exit_code == 0, result.output
    out = result.output
    for title in (q.title for q in fx.QUERIES):
        assert title in out, title
    assert "55.6%" in out  # 5 of 9 responded
    assert "30007" in out
    assert "66.7%" in out  # payment opt-outs
