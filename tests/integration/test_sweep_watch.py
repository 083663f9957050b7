"""The repair sweep can't die quietly: a failing pass is logged and the loop goes on, every
completed pass (a standby's too) beats the heartbeat, and readiness turns red when passes stop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from prometheus_client import REGISTRY

from services.dispatcher.sweep import MISSED_PASSES_ALLOWED, Sweeper, SweepQueries
from shared.health import OK, Heartbeat, Readiness
from shared.locks import REPAIR_SWEEP
from shared.rows import Followup
from shared.timers import LevelsTimer

INTERVAL = timedelta(milliseconds=50)
# The sweep's lock in this test's database only (pg_locks lists every database's locks).
SWEEP_LOCKS = """pg_locks WHERE locktype = 'advisory'
    AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
    AND classid = $1 AND objid = $2 AND objsubid = 2"""


class FailingStore(SweepQueries):
    """The real store with nothing to sweep (rows other tests left behind stay untouched),
    whose `overdue` raises while `failing` is set."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        super().__init__(pool)
        self.failing = False
        self.calls = 0

    async def overdue(self, grace: timedelta, limit: int = 500) -> list[Followup]:
        self.calls += 1
        if self.failing:
            raise RuntimeError("a bug in the sweep")
        return []

    async def unprepared(
        self, grace: timedelta, lead: timedelta, limit: int = 500
    ) -> list[Followup]:
        return []


class CountingHeartbeat(Heartbeat):
    """The real heartbeat on a clock the test moves, counting beats."""

    def __init__(self) -> None:
        self.now = 0.0
        super().__init__(max_age=MISSED_PASSES_ALLOWED * INTERVAL.total_seconds(), monotonic=self)
        self.beats = 0

    def __call__(self) -> float:
        return self.now

    def beat(self) -> None:
        self.beats += 1
        super().beat()


@pytest.fixture
async def sweeping(settings, pool, publisher) -> AsyncIterator[Callable[..., Sweeper]]:
    tasks: list[asyncio.Task[None]] = []

    def start(store: SweepQueries, heartbeat: Heartbeat) -> Sweeper:
        sweeper = Sweeper(
            dsn=settings.database_url,
            store=store,
            timer=LevelsTimer(publisher),
            clock=lambda: datetime.now(UTC),
            interval=INTERVAL,
            grace=timedelta(seconds=30),
            lead=timedelta(seconds=60),
            heartbeat=heartbeat,
        )
        tasks.append(asyncio.create_task(sweeper.run_forever()))
        return sweeper

    yield start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(400):
        if condition():
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"never happened: {what}")


async def test_a_failing_pass_is_logged_and_the_loop_goes_on(pool, sweeping):
    store = FailingStore(pool)
    store.failing = True
    heartbeat = CountingHeartbeat()
    sweeping(store, heartbeat)

    await until(lambda: store.calls >= 3, "the sweep tried again after a failed pass")
    assert heartbeat.beats == 0
    store.failing = False
    await until(lambda: heartbeat.beats >= 2, "passes completed once the failure cleared")
    assert heartbeat.check() == OK
    assert REGISTRY.get_sample_value("followups_sweep_last_pass_timestamp_seconds") > 0


async def test_readiness_turns_red_when_no_pass_completes_and_green_again_after_one(
    pool, broker, publisher, sweeping
):
    store = FailingStore(pool)
    store.failing = True
    heartbeat = CountingHeartbeat()
    readiness = Readiness(broker, publisher, pool=pool, checks={"sweep": heartbeat.check})
    sweeping(store, heartbeat)
    await until(lambda: store.calls >= 2, "the sweep kept trying")

    heartbeat.now = heartbeat.max_age  # exactly at the limit: still ready
    assert (await readiness.check())["sweep"] == OK
    heartbeat.now = heartbeat.max_age + 1
    checks = await readiness.check()
    assert checks["sweep"].startswith("no pass completed"), checks
    assert {name: result for name, result in checks.items() if name != "sweep"} == {
        "broker": OK,
        "database": OK,
        "consumer": "not consuming",  # no subscriber in this test
    }

    store.failing = False
    await until(lambda: heartbeat.beats >= 1, "a pass completed")
    assert (await readiness.check())["sweep"] == OK


async def test_a_standby_completes_its_passes_and_stays_ready_then_takes_over(
    settings, pool, sweeping
):
    holder = await asyncpg.connect(settings.database_url)
    try:
        assert await holder.fetchval("SELECT pg_try_advisory_lock($1, $2)", *REPAIR_SWEEP)
        store = FailingStore(pool)
        heartbeat = CountingHeartbeat()
        sweeping(store, heartbeat)
        await until(lambda: heartbeat.beats >= 3, "the standby completed passes")
        # Every pass of a standby is "the lock is taken, nothing to do": it never sweeps.
        assert store.calls == 0
        heartbeat.now = heartbeat.max_age
        assert heartbeat.check() == OK
        await holder.execute("SELECT pg_advisory_unlock($1, $2)", *REPAIR_SWEEP)
        await until(lambda: store.calls >= 1, "the standby took over once the lock was free")
        # Exactly one session holds the sweep's lock: this sweeper's.
        holders = await pool.fetchval(
            f"SELECT count(*) FROM {SWEEP_LOCKS} AND granted", *REPAIR_SWEEP
        )
        assert holders == 1
    finally:
        await holder.close()


async def test_a_sweeper_that_loses_its_session_gives_the_lock_up_and_takes_it_again(
    pool, sweeping
):
    store = FailingStore(pool)
    heartbeat = CountingHeartbeat()
    sweeping(store, heartbeat)
    await until(lambda: store.calls >= 1, "the sweeper took the lock")
    await pool.execute(f"SELECT pg_terminate_backend(pid) FROM {SWEEP_LOCKS}", *REPAIR_SWEEP)
    calls = store.calls
    await until(lambda: store.calls > calls + 2, "sweeping again on a new session")
    assert heartbeat.check() == OK
