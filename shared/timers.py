"""Timers held by the broker: `arm(destination, message, fire_at)` with two backends (DESIGN.md).

A timer message carries its target instant in the `x-fire-at` header (epoch ms). A delay longer
than the backend's horizon is armed for the horizon; the receiver sees that the instant is still
ahead (`remaining`) and arms it again.
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
    TIMER_LEVELS,
    TIMER_PLUGIN_EXCHANGE,
    level_name,
)

FIRE_AT_HEADER = "x-fire-at"
PLUGIN_MAX_DELAY_MS = 2**32 - 1  # the plugin delivers at once past this: never hand it more
LEVELS_MAX_DELAY_MS = 2**TIMER_LEVELS - 1

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


def to_epoch_ms(moment: datetime) -> int:
    return math.ceil(moment.timestamp() * 1000)


def delay_ms(fire_at: datetime, now: datetime, horizon_ms: int) -> int:
    """Milliseconds to wait now: rounded up (never early), at least 0, at most the horizon."""
    wanted = math.ceil((fire_at - now).total_seconds() * 1000)
    return max(0, min(wanted, horizon_ms))


def remaining(headers: Mapping[str, Any], now: datetime) -> timedelta:
    """How far the timer's instant still lies ahead (zero or negative: it is due)."""
    raw = headers.get(FIRE_AT_HEADER)
    if raw is None:
        return timedelta(0)
    return datetime.fromtimestamp(int(raw) / 1000, UTC) - now


def levels_routing_key(delay: int, destination: str) -> str:
    """The delay spelled in binary, most significant level first, one topic word per bit."""
    if not 0 <= delay <= LEVELS_MAX_DELAY_MS:
        raise ValueError(f"delay {delay} ms is outside 0..{LEVELS_MAX_DELAY_MS}")
    bits = format(delay, f"0{TIMER_LEVELS}b")
    return ".".join(bits) + "." + destination


def levels_entry_exchange(delay: int) -> str:
    """Enter at the highest level whose bit is set; lower levels are reached by routing."""
    if delay == 0:
        return TIMER_DELIVER_EXCHANGE
    return level_name(delay.bit_length() - 1)


class Timer(ABC):
    """Arms a message to reach queue `destination` at `fire_at` (never before)."""

    backend: DelayBackend
    horizon_ms: int

    def __init__(self, publisher: Publisher, clock: Clock = utcnow) -> None:
        self._publisher = publisher
        self._clock = clock

    async def arm(
        self,
        destination: str,
        message: bytes,
        fire_at: datetime,
        *,
        headers: Mapping[str, Any] | None = None,
    ) -> int:
        """Publish the timer (confirmed); returns the delay in ms that was armed."""
        delay = delay_ms(fire_at, self._clock(), self.horizon_ms)
        all_headers = {**(headers or {}), FIRE_AT_HEADER: to_epoch_ms(fire_at)}
        await self._publish(destination, message, delay, all_headers)
        return delay

    @abstractmethod
    async def _publish(
        self, destination: str, message: bytes, delay: int, headers: dict[str, Any]
    ) -> None: ...


class LevelsTimer(Timer):
    """Plugin-free: TTL queues of 2**k ms chained by dead-lettering (DESIGN.md, `levels`)."""

    backend = DelayBackend.LEVELS
    horizon_ms = LEVELS_MAX_DELAY_MS

    async def _publish(
        self, destination: str, message: bytes, delay: int, headers: dict[str, Any]
    ) -> None:
        await self._publisher.publish(
            message,
            exchange=levels_entry_exchange(delay),
            routing_key=levels_routing_key(delay, destination),
            headers=headers,
        )


def plugin_headers(delay: int, headers: Mapping[str, Any]) -> dict[str, Any]:
    if not 0 <= delay <= PLUGIN_MAX_DELAY_MS:
        raise ValueError(f"delay {delay} ms is outside the plugin's 0..{PLUGIN_MAX_DELAY_MS}")
    return {**headers, "x-delay": delay}


class PluginTimer(Timer):
    """RabbitMQ's x-delayed-message exchange (DESIGN.md, `plugin`)."""

    backend = DelayBackend.PLUGIN
    horizon_ms = PLUGIN_MAX_DELAY_MS

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
    """True when the timer is due now; False when it was armed again for later (past a
    backend's horizon, or delivered early by a clock that runs ahead of ours)."""
    now = clock()
    ahead = remaining(headers, now)
    if ahead <= timedelta(0):
        return True
    fire_at = now + ahead
    if ahead <= SHORT_WAIT:
        await sleep_until(fire_at, clock)
        return True
    passthrough = {k: v for k, v in headers.items() if k not in (FIRE_AT_HEADER, "x-delay")}
    await timer.arm(destination, body, fire_at, headers=passthrough)
    return False
