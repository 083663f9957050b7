"""The database clock against the real PostgreSQL, which runs on this host's clock: the measured
offset must be zero within its own error bound, and the clock never ahead of the database's."""

from __future__ import annotations

from datetime import datetime, timedelta

import asyncpg
import pytest

from shared.clock import MAX_DRIFT, DatabaseClock, DatabaseTime

# The offset's bound holds exactly up to the microseconds both sides keep.
RESOLUTION = timedelta(microseconds=2)


async def database_now(pool: asyncpg.Pool) -> datetime:
    moment: datetime = await pool.fetchval("SELECT clock_timestamp()")
    return moment


async def test_this_hosts_offset_to_the_database_is_zero_within_a_positive_error(session_pool):
    clock = await DatabaseClock.start(DatabaseTime(session_pool))
    print(f"\noffset {clock.offset * 1e6:+.1f} µs, error {clock.error * 1e6:.1f} µs")
    assert clock.error > 0
    assert abs(clock.offset) <= clock.error + RESOLUTION.total_seconds()


async def test_the_clock_reads_between_the_database_readings_around_it(session_pool):
    clock = await DatabaseClock.start(DatabaseTime(session_pool))
    for _ in range(3):
        await clock.measure()
        for _ in range(20):
            before = await database_now(session_pool)
            reading = clock()
            after = await database_now(session_pool)
            assert reading <= after + RESOLUTION
            # Behind by at most the round trip of the measurement, plus what drift allows.
            slack = timedelta(seconds=2 * clock.error + MAX_DRIFT) + RESOLUTION
            assert reading >= before - slack


async def test_a_database_that_went_away_fails_the_measurement(session_pool, infra):
    pool = await asyncpg.create_pool(infra.database_url, min_size=1, max_size=1)
    clock = await DatabaseClock.start(DatabaseTime(pool))
    await pool.close()
    with pytest.raises(asyncpg.InterfaceError):
        await clock.measure()
    assert clock() <= await database_now(session_pool)
