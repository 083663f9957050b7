"""The clock of record is PostgreSQL's: a `Clock` that runs in the database's time.

The database decides whether a send is due (the claim compares `scheduled_time` with
`clock_timestamp()`) and records when a call started. A service that waited and armed its timers
by its own host clock would disagree with it by that host's skew: a host ahead has its send timers
refused as not yet due (and the follow-up waits for the repair sweep), a host behind sends late by
its skew. So every service measures where the database's clock stands, the way NTP does, and
reads the time from that measurement.

A measurement is a few round trips `SELECT clock_timestamp()`, each timed by the monotonic clock;
the one with the shortest round trip wins. The database read its clock somewhere inside that
round trip, so the offset `database - host` lies within half the round trip of the estimate taken
at its midpoint, and half the round trip is the error bound reported with it.

Between measurements the clock runs on `time.monotonic()` from the anchor (the winning round
trip), not on the host's wall clock: an NTP step of the host clock between two measurements moves
nothing, and the next measurement only shows it in the reported offset. The host's wall clock is
read for that report and nothing else. The monotonic clock may run at a slightly different rate
from the database's, which is what the periodic measurement corrects.

The clock reads the earliest time the database's clock can show: the answer's reading plus the
monotonic time since the answer arrived, less the drift the host's clock may have gathered since.
So it is never ahead of the database's (a send waited for by it is never early by the database's
clock), and behind it by at most the round trip plus that drift: well under a millisecond on a
local network with a measurement every few seconds.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg

from shared.db import CONNECTION_ERRORS
from shared.logging import get_logger
from shared.metrics import CLOCK_ERROR, CLOCK_OFFSET

log = get_logger("followups.clock")

SAMPLES = 5
# Beyond this the host's NTP is broken: worth an operator's attention even though sends stay right.
LARGE_OFFSET_SECONDS = 1.0
# How far a host's clock rate may stray from the database's: a quartz oscillator's tolerance
# (20-50 parts per million); NTP-disciplined clocks do far better.
MAX_DRIFT = 50e-6


def host_now() -> datetime:
    return datetime.now(UTC)


class TimeSource(ABC):
    """Where the time of record is read, one round trip per reading."""

    @abstractmethod
    async def read(self) -> datetime: ...


class DatabaseTime(TimeSource):
    """PostgreSQL's `clock_timestamp()`: the clock its statements compare and record with."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def read(self) -> datetime:
        moment: datetime = await self._pool.fetchval("SELECT clock_timestamp()")
        return moment


@dataclass(frozen=True)
class Sample:
    """One round trip: when it was sent and answered (monotonic seconds), the host's wall clock
    when it was sent, and the time of record read in between."""

    sent: float
    answered: float
    host_sent: datetime
    reading: datetime

    @property
    def round_trip(self) -> float:
        return self.answered - self.sent

    @property
    def error(self) -> float:
        """The offset lies within this of `offset`."""
        return self.round_trip / 2

    @property
    def offset(self) -> float:
        """The database's clock minus the host's, at the middle of the round trip."""
        host_at_middle = self.host_sent + timedelta(seconds=self.error)
        return (self.reading - host_at_middle).total_seconds()


async def take_samples(
    source: TimeSource,
    count: int,
    monotonic: Callable[[], float] = time.monotonic,
    host: Callable[[], datetime] = host_now,
) -> list[Sample]:
    samples = []
    for _ in range(count):
        host_sent = host()
        sent = monotonic()
        reading = await source.read()
        samples.append(Sample(sent, monotonic(), host_sent, reading))
    return samples


def best_of(samples: list[Sample]) -> Sample:
    """The shortest round trip: the least room for queueing on either leg."""
    return min(samples, key=lambda sample: sample.round_trip)


class DatabaseClock:
    """A `Clock`: call it for the database's time now. Build it with `start` (one measurement),
    keep it right with `keep_in_sync` running in the background."""

    def __init__(
        self,
        source: TimeSource,
        anchor: Sample,
        *,
        samples: int = SAMPLES,
        monotonic: Callable[[], float] = time.monotonic,
        host: Callable[[], datetime] = host_now,
    ) -> None:
        self._source = source
        self._samples = samples
        self._monotonic = monotonic
        self._host = host
        self._anchor = anchor
        self._off = False
        self._report()

    @classmethod
    async def start(
        cls,
        source: TimeSource,
        *,
        samples: int = SAMPLES,
        monotonic: Callable[[], float] = time.monotonic,
        host: Callable[[], datetime] = host_now,
    ) -> DatabaseClock:
        anchor = best_of(await take_samples(source, samples, monotonic, host))
        clock = cls(source, anchor, samples=samples, monotonic=monotonic, host=host)
        log.info(
            "clock measured against the database",
            offset_seconds=round(anchor.offset, 6),
            error_seconds=round(anchor.error, 6),
        )
        return clock

    def __call__(self) -> datetime:
        since = self._monotonic() - self._anchor.answered
        return self._anchor.reading + timedelta(seconds=since * (1 - MAX_DRIFT))

    @property
    def offset(self) -> float:
        """The database's clock minus this host's, in seconds, at the measurement in use."""
        return self._anchor.offset

    @property
    def error(self) -> float:
        """How far the true offset may lie from `offset`, in seconds (half its round trip)."""
        return self._anchor.error

    def _spread(self, at: float) -> float:
        """How wide the range the database's time may lie in has grown by monotonic time `at`."""
        anchor = self._anchor
        return anchor.round_trip + 2 * MAX_DRIFT * max(0.0, at - anchor.answered)

    async def measure(self) -> Sample:
        """Measure again; the new measurement replaces the one in use unless it is less certain
        than the one in use has become (a round trip slowed down by a busy loop or database)."""
        found = best_of(
            await take_samples(self._source, self._samples, self._monotonic, self._host)
        )
        if found.round_trip <= self._spread(found.answered):
            self._anchor = found
            self._report()
        return found

    def _report(self) -> None:
        """Gauges at every measurement; a warning when the host's clock goes far off (once, not
        at every measurement), and a note when it is back."""
        offset = self._anchor.offset
        CLOCK_OFFSET.set(offset)
        CLOCK_ERROR.set(self._anchor.error)
        off = abs(offset) > LARGE_OFFSET_SECONDS
        if off and not self._off:
            side = "ahead of" if offset < 0 else "behind"
            log.warning(
                f"host clock is {abs(offset):.3f} s {side} the database; check NTP",
                offset_seconds=round(offset, 6),
            )
        elif self._off and not off:
            log.info("host clock back near the database's", offset_seconds=round(offset, 6))
        self._off = off

    async def keep_in_sync(self, interval: timedelta) -> None:
        """Measure every `interval` until cancelled. While the database cannot be reached the
        clock runs on from the last measurement."""
        while True:
            await asyncio.sleep(interval.total_seconds())
            try:
                found = await self.measure()
            except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
                log.warning(
                    "clock not measured: database unreachable; running on the last measurement",
                    error=exc.__class__.__name__,
                )
                continue
            log.debug(
                "clock measured against the database",
                offset_seconds=round(found.offset, 6),
                error_seconds=round(found.error, 6),
                in_use=found is self._anchor,
            )
