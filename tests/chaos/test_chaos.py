"""Long fault runs (`make chaos`): 300 follow-ups falling due while services are killed with
SIGKILL one at a time and all together, and the database drops every connection."""

from __future__ import annotations

import asyncio
import random
import statistics

import asyncpg
import pytest

from tests.e2e.conftest import request_followup, soon, wait_for_final
from tests.e2e.test_guarantees import assert_delivered_once_each
from tests.support.data import add_contractor

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(900)]
NAMES = ("scheduler", "personalizer", "dispatcher")


async def test_300_followups_survive_kill_9_one_at_a_time_and_all_together(
    pool, bus, receiver, settings, start_services
):
    contractors = [await add_contractor(pool, first_name=f"C{i}") for i in range(10)]
    services = start_services(
        WEBHOOK_TIMEOUT_SECONDS="1", SWEEP_INTERVAL_SECONDS="5", SWEEP_GRACE_SECONDS="5"
    )
    services.add("dispatcher-2", "dispatcher")
    for i in range(300):
        await request_followup(
            bus, contractors[i % 10], soon(random.uniform(3, 40)), idempotency_key=f"chaos-{i}"
        )
    database = settings.database_url.rsplit("/", 1)[1]
    for round_ in range(12):
        await asyncio.sleep(random.uniform(1.0, 3.0))
        victims = (
            list(services.services) if round_ % 4 == 3 else [random.choice(list(services.services))]
        )
        for label in victims:
            services[label].kill()
        await asyncio.sleep(random.uniform(0.2, 1.5))
        if round_ % 5 == 2:
            admin = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/postgres")
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1"
                " AND pid <> pg_backend_pid() AND application_name <> 'followups-tests'",
                database,
            )
            await admin.close()
        for label in victims:
            services[label].start()
    rows = await wait_for_final(pool, 300, timeout=240)
    assert len(rows) == 300
    assert_delivered_once_each(receiver, rows)
    lateness = sorted(r["lateness_ms"] for r in rows)
    repeats = len(receiver.calls) - 300
    print(
        f"\nchaos: 300 sent, {repeats} repeated calls (same key), lateness ms "
        f"p50={statistics.median(lateness):.0f} max={lateness[-1]:.0f}"
    )
