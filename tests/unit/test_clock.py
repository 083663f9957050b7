"""The database clock's estimate, against a simulated host and database whose clocks are moved by
hand: round trips of chosen legs, an offset, a drift, a step of the host clock."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from shared.clock import MAX_DRIFT, DatabaseClock, TimeSource
from shared.timers import Clock

START = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
RESOLUTION = 2e-6  # both sides keep microseconds, and each rounds once


class World:
    """The host's monotonic and wall clocks and the database's clock, in seconds of fake time.
    The database runs `rate` faster than the host's monotonic clock and `offset` ahead of it."""

    def __init__(self, offset: float = 0.0, rate: float = 0.0) -> None:
        self.elapsed = 0.0
        self.offset = offset
        self.rate = rate
        self.host_step = 0.0

    def monotonic(self) -> float:
        return 1000.0 + self.elapsed

    def host(self) -> datetime:
        return START + timedelta(seconds=self.elapsed + self.host_step)

    def database(self) -> datetime:
        return START + timedelta(seconds=self.elapsed * (1 + self.rate) + self.offset)


class SimulatedDatabaseTime(TimeSource):
    """Each reading takes its legs (to the database, back) in fake time; `down` makes every
    reading fail as an unreachable database does."""

    def __init__(self, world: World, legs: list[tuple[float, float]]) -> None:
        self.world = world
        self.legs = list(legs)
        self.readings = 0
        self.down = False

    async def read(self) -> datetime:
        self.readings += 1
        if self.down:
            raise ConnectionRefusedError("database down")
        there, back = self.legs.pop(0) if self.legs else (0.0005, 0.0005)
        self.world.elapsed += there
        reading = self.world.database()
        self.world.elapsed += back
        return reading


async def started(
    world: World, legs: list[tuple[float, float]]
) -> tuple[DatabaseClock, SimulatedDatabaseTime]:
    source = SimulatedDatabaseTime(world, legs)
    clock = await DatabaseClock.start(
        source, samples=len(legs) or 1, monotonic=world.monotonic, host=world.host
    )
    return clock, source


def behind(world: World, clock: Clock) -> float:
    """How far the clock reads behind the database's, in seconds."""
    return (world.database() - clock()).total_seconds()


async def test_equal_legs_give_the_exact_offset_and_half_the_round_trip_as_error():
    world = World(offset=-0.1)
    clock, _ = await started(world, [(0.002, 0.002)])
    assert clock.offset == pytest.approx(-0.1, abs=RESOLUTION)
    assert clock.error == pytest.approx(0.002)


@given(
    offset=st.floats(-3600, 3600),
    there=st.floats(0, 0.5),
    back=st.floats(0, 0.5),
    later=st.floats(0, 600),
)
def test_the_offset_lies_within_the_error_and_the_clock_is_never_ahead(offset, there, back, later):
    async def run() -> None:
        world = World(offset=offset)
        clock, _ = await started(world, [(there, back)])
        assert abs(clock.offset - offset) <= clock.error + RESOLUTION
        assert clock.error == pytest.approx((there + back) / 2)
        world.elapsed += later
        assert -RESOLUTION <= behind(world, clock) <= there + back + later * MAX_DRIFT + RESOLUTION

    asyncio.run(run())


async def test_the_shortest_round_trip_of_a_measurement_is_the_one_used():
    world = World(offset=2.0)
    clock, _ = await started(world, [(0.030, 0.001), (0.0004, 0.0006), (0.001, 0.040)])
    assert clock.error == pytest.approx(0.0005)
    assert clock.offset == pytest.approx(2.0 - 0.0001, abs=RESOLUTION)


async def test_a_step_of_the_host_clock_moves_the_reported_offset_but_not_the_clock():
    world = World(offset=0.0)
    clock, _ = await started(world, [(0.001, 0.001)])
    world.elapsed += 3
    before = behind(world, clock)
    world.host_step = 5.0  # NTP stepped the host clock forward
    assert behind(world, clock) == before
    await clock.measure()
    assert clock.offset == pytest.approx(-5.0, abs=RESOLUTION)
    assert 0 <= behind(world, clock) <= 0.002 + RESOLUTION


@pytest.mark.parametrize("rate", [MAX_DRIFT, -MAX_DRIFT])
async def test_a_host_clock_running_at_another_rate_never_puts_the_clock_ahead(rate):
    world = World(offset=0.25, rate=rate)
    clock, source = await started(world, [(0.0002, 0.0002)])
    for _ in range(10):
        world.elapsed += 60
        assert behind(world, clock) >= -RESOLUTION
    source.legs = [(0.0002, 0.0002)]
    await clock.measure()  # what drift gathered is gone again
    assert -RESOLUTION <= behind(world, clock) <= 0.0004 + RESOLUTION


async def test_a_slow_round_trip_does_not_replace_a_fresher_precise_measurement():
    world = World(offset=0.0)
    clock, source = await started(world, [(0.0005, 0.0005)])
    world.elapsed += 1
    source.legs = [(0.045, 0.005)]
    await clock.measure()
    assert clock.error == pytest.approx(0.0005)
    # Long after, the old measurement has grown less certain than a slow new one.
    world.elapsed += 1000
    source.legs = [(0.045, 0.005)]
    await clock.measure()
    assert clock.error == pytest.approx(0.025)


async def test_the_offset_and_its_error_are_published_as_gauges():
    world = World(offset=0.04)
    clock, _ = await started(world, [(0.003, 0.003)])
    assert REGISTRY.get_sample_value("followups_clock_offset_seconds") == pytest.approx(
        clock.offset
    )
    assert REGISTRY.get_sample_value("followups_clock_error_seconds") == pytest.approx(0.003)


@pytest.mark.parametrize(("offset", "side"), [(-2.5, "ahead of"), (90.0, "behind")])
async def test_a_large_offset_is_logged_as_a_warning(offset, side):
    with capture_logs() as logs:
        await started(World(offset=offset), [(0.001, 0.001)])
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert [e["event"] for e in warnings] == [
        f"host clock is {abs(offset):.3f} s {side} the database; check NTP"
    ]


async def test_a_small_offset_logs_no_warning():
    with capture_logs() as logs:
        await started(World(offset=0.3), [(0.001, 0.001)])
    assert [e for e in logs if e["log_level"] == "warning"] == []


async def test_a_host_clock_that_stays_off_is_warned_about_once_and_its_return_noted():
    world = World(offset=5.0)
    with capture_logs() as logs:
        clock, _ = await started(world, [(0.001, 0.001)])
        await clock.measure()
        await clock.measure()
        world.offset = 0.01  # NTP fixed the host
        await clock.measure()
    assert [(e["log_level"], e["event"]) for e in logs if e["log_level"] != "info"] == [
        ("warning", "host clock is 5.000 s behind the database; check NTP")
    ]
    assert [e["event"] for e in logs][-1] == "host clock back near the database's"


async def test_while_the_database_is_unreachable_the_clock_runs_on_and_sync_carries_on():
    world = World(offset=-0.1)
    clock, source = await started(world, [(0.001, 0.001)])
    source.down = True
    with capture_logs() as logs:
        syncing = asyncio.create_task(clock.keep_in_sync(timedelta(0)))
        while source.readings < 4:
            await asyncio.sleep(0)
        source.down = False
        world.offset = -0.2  # the next measurement that gets through is taken
        while clock.offset > -0.15:
            await asyncio.sleep(0)
        syncing.cancel()
        await asyncio.gather(syncing, return_exceptions=True)
    assert any(e["event"].startswith("clock not measured: database unreachable") for e in logs)
    assert 0 <= behind(world, clock) <= 0.002 + RESOLUTION


async def test_a_first_measurement_that_fails_raises():
    source = SimulatedDatabaseTime(World(), [])
    source.down = True
    with pytest.raises(ConnectionRefusedError):
        await DatabaseClock.start(source)
