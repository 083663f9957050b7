"""Timers held by the broker: `arm(destination, message, fire_at, window=…)`, two backends.

A timer message carries its target instant in the `x-fire-at` header (epoch ms) and, when the
receiver may act early, how early in `x-fire-window` (ms). The broker may deliver it up to a
quantum early (levels) and never late on purpose: the receiver waits out the rest in memory, or
arms it again when it is still far (a delay past the backend's horizon, a clock ahead of ours).
"""

from __future__ import annotations

import asyncio
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import aiormq.exceptions

from shared.bus import Publisher
from shared.settings import DelayBackend
from shared.topology import (
    TIMER_DELIVER_EXCHANGE,
    TIMER_PLUGIN_EXCHANGE,
    TIMER_POSITIONS,
    TIMER_QUANTUM_MS,
    TIMER_RADIX,
    position_exchange,
)

FIRE_AT_HEADER = "x-fire-at"
WINDOW_HEADER = "x-fire-window"
PLUGIN_MAX_DELAY_MS = 2**32 - 1  # the plugin delivers at once past this: never hand it more
LEVELS_MAX_UNITS: int = TIMER_RADIX**TIMER_POSITIONS - 1
# Past the horizon: the largest delay of a single digit, so the receiver re-arms after one hop.
LEVELS_HORIZON_UNITS: int = (TIMER_RADIX - 1) * TIMER_RADIX ** (TIMER_POSITIONS - 1)
LEVELS_MAX_DELAY_MS = LEVELS_MAX_UNITS * TIMER_QUANTUM_MS

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


def to_epoch_ms(moment: datetime) -> int:
    return math.ceil(moment.timestamp() * 1000)


def wanted_ms(fire_at: datetime, now: datetime) -> int:
    """Milliseconds until `fire_at`, rounded up (never early), at least 0."""
    return max(0, math.ceil((fire_at - now).total_seconds() * 1000))


def remaining(headers: Mapping[str, Any], now: datetime) -> timedelta:
    """How far the timer's instant still lies ahead (zero or negative: it is due)."""
    raw = headers.get(FIRE_AT_HEADER)
    if raw is None:
        return timedelta(0)
    return datetime.fromtimestamp(int(raw) / 1000, UTC) - now


def window_of(headers: Mapping[str, Any]) -> timedelta:
    return timedelta(milliseconds=int(headers.get(WINDOW_HEADER, 0)))


def digits(units: int) -> list[int]:
    """`units` in base TIMER_RADIX, least significant position first, TIMER_POSITIONS long."""
    if not 0 <= units <= LEVELS_MAX_UNITS:
        raise ValueError(f"{units} quanta is outside 0..{LEVELS_MAX_UNITS}")
    return [units // TIMER_RADIX**p % TIMER_RADIX for p in range(TIMER_POSITIONS)]


def levels_units(wanted: int, window: int) -> int:
    """The delay to arm, in quanta: never later than `wanted` ms, as few nonzero digits (hops) as
    arriving at most `window` ms before it allows (at least a quantum: the receiver waits that
    out). Past the horizon, the largest one-digit delay: the receiver arms the rest."""
    units = wanted // TIMER_QUANTUM_MS
    if units > LEVELS_MAX_UNITS:
        return LEVELS_HORIZON_UNITS
    for position in range(TIMER_POSITIONS, 0, -1):
        step: int = TIMER_RADIX**position
        coarse = units // step * step
        if wanted - coarse * TIMER_QUANTUM_MS <= window:
            return coarse
    return units


def levels_hops(units: int) -> int:
    """Dead-letterings a levels timer of `units` quanta takes: one per nonzero digit."""
    return sum(1 for digit in digits(units) if digit)


def levels_routing_key(units: int, destination: str) -> str:
    """The delay's digits, most significant position first, one topic word each."""
    words = [f"{digit:x}" for digit in reversed(digits(units))]
    return ".".join(words) + "." + destination


def levels_entry_exchange(units: int) -> str:
    """Enter at the highest position with a nonzero digit; lower ones are reached by routing."""
    if units == 0:
        return TIMER_DELIVER_EXCHANGE
    top = max(p for p, digit in enumerate(digits(units)) if digit)
    return position_exchange(top)


class Timer(ABC):
    """Arms a message to reach queue `destination` at `fire_at` (never after it on purpose),
    or up to `window` before it when the receiver may act early."""

    backend: DelayBackend

    def __init__(self, publisher: Publisher, clock: Clock = utcnow) -> None:
        self._publisher = publisher
        self._clock = clock

    def now(self) -> datetime:
        return self._clock()

    async def arm(
        self,
        destination: str,
        message: bytes,
        fire_at: datetime,
        *,
        window: timedelta = timedelta(0),
        headers: Mapping[str, Any] | None = None,
    ) -> int:
        """Publish the timer (confirmed); returns the delay in ms that was armed."""
        window_ms = int(window.total_seconds() * 1000)
        all_headers = {**(headers or {}), FIRE_AT_HEADER: to_epoch_ms(fire_at)}
        if window_ms:
            all_headers[WINDOW_HEADER] = window_ms
        delay = self.delay_for(wanted_ms(fire_at, self._clock()), window_ms)
        await self._publish(destination, message, delay, all_headers)
        return delay

    @abstractmethod
    def delay_for(self, wanted: int, window: int) -> int:
        """The delay in ms this backend arms for an instant `wanted` ms ahead."""

    @abstractmethod
    def work(self, wanted: int, window: int) -> int:
        """Broker operations one timer costs: its publish plus the hops it takes."""

    @abstractmethod
    async def _publish(
        self, destination: str, message: bytes, delay: int, headers: dict[str, Any]
    ) -> None: ...


class LevelsTimer(Timer):
    """Plugin-free: TTL queues, one per digit and position, chained by dead-lettering
    (shared.topology)."""

    backend = DelayBackend.LEVELS

    def delay_for(self, wanted: int, window: int) -> int:
        return levels_units(wanted, window) * TIMER_QUANTUM_MS

    def work(self, wanted: int, window: int) -> int:
        return 1 + levels_hops(levels_units(wanted, window))

    async def _publish(
        self, destination: str, message: bytes, delay: int, headers: dict[str, Any]
    ) -> None:
        units = delay // TIMER_QUANTUM_MS
        await self._publisher.publish(
            message,
            exchange=levels_entry_exchange(units),
            routing_key=levels_routing_key(units, destination),
            headers=headers,
        )


def plugin_headers(delay: int, headers: Mapping[str, Any]) -> dict[str, Any]:
    if not 0 <= delay <= PLUGIN_MAX_DELAY_MS:
        raise ValueError(f"delay {delay} ms is outside the plugin's 0..{PLUGIN_MAX_DELAY_MS}")
    return {**headers, "x-delay": delay}


class PluginTimer(Timer):
    """RabbitMQ's x-delayed-message exchange: one hop whatever the delay, to the millisecond,
    held on one node only."""

    backend = DelayBackend.PLUGIN

    def delay_for(self, wanted: int, window: int) -> int:
        return min(wanted, PLUGIN_MAX_DELAY_MS)

    def work(self, wanted: int, window: int) -> int:
        return 1 if self.delay_for(wanted, window) == 0 else 2

    async def _publish(
        self, destination: str, message: bytes, delay: int, headers: dict[str, Any]
    ) -> None:
        # The plugin answers every publish as unroutable yet delivers it: mandatory must be off.
        await self._publisher.publish(
            message,
            exchange=TIMER_PLUGIN_EXCHANGE,
            routing_key=destination,
            headers=plugin_headers(delay, headers),
            mandatory=False,
        )


async def broker_has_plugin(url: str) -> bool:
    """Probe on a throwaway connection: a broker without the plugin closes the whole connection."""
    connection = await aio_pika.connect(url)
    # The refusal closes this throwaway connection; aiormq would log that as an error.
    quiet = logging.getLogger("aiormq.connection")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        channel = await connection.channel()
        await channel.declare_exchange(
            TIMER_PLUGIN_EXCHANGE,
            aio_pika.ExchangeType.X_DELAYED_MESSAGE,
            durable=True,
            arguments={"x-delayed-type": "direct"},
        )
    except (aiormq.exceptions.ConnectionClosed, aiormq.exceptions.ChannelClosed):
        return False
    finally:
        if not connection.is_closed:
            await connection.close()
        quiet.setLevel(level)
    return True


async def resolve_backend(url: str, wanted: DelayBackend) -> DelayBackend:
    if wanted is not DelayBackend.AUTO:
        return wanted
    return DelayBackend.PLUGIN if await broker_has_plugin(url) else DelayBackend.LEVELS


def make_timer(backend: DelayBackend, publisher: Publisher, clock: Clock = utcnow) -> Timer:
    if backend is DelayBackend.PLUGIN:
        return PluginTimer(publisher, clock)
    if backend is DelayBackend.LEVELS:
        return LevelsTimer(publisher, clock)
    raise ValueError("resolve DELAY_BACKEND=auto with resolve_backend() first")


async def sleep_until(moment: datetime, clock: Clock = utcnow) -> None:
    """Returns at `moment` by `clock`, never before. An event loop's own timer may wake up to a
    millisecond early (uvloop counts whole milliseconds), so the wall clock has the last word."""
    while (ahead := (moment - clock()).total_seconds()) > 0:  # noqa: ASYNC110 (a wall-clock moment, no event)
        await asyncio.sleep(ahead)


# Within this much of its instant a timer is waited for in place; beyond it, armed again.
SHORT_WAIT = timedelta(seconds=1)


async def wait_until_due(
    timer: Timer,
    destination: str,
    body: bytes,
    headers: Mapping[str, Any],
    clock: Clock = utcnow,
) -> bool:
    """True when the timer is due now (its instant, less the window it allows, has come);
    False when it was armed again for later (past a backend's horizon, or delivered early by a
    clock that runs ahead of ours)."""
    now = clock()
    window = window_of(headers)
    ahead = remaining(headers, now) - window
    if ahead <= timedelta(0):
        return True
    if ahead <= SHORT_WAIT:
        await sleep_until(now + ahead, clock)
        return True
    passthrough = {
        k: v for k, v in headers.items() if k not in (FIRE_AT_HEADER, WINDOW_HEADER, "x-delay")
    }
    await timer.arm(destination, body, now + ahead + window, window=window, headers=passthrough)
    return False
