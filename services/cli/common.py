"""What every command shares: the consoles, settings, errors, durations and short-lived clients."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import asyncpg
import typer
from pydantic import ValidationError
from rich.console import Console

from shared.errors import InvalidMessage
from shared.schemas import parse_inbound
from shared.settings import Settings

console = Console()
err = Console(stderr=True)

T = TypeVar("T")

_DURATION = re.compile(r"^([+-]?)(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        err.print(f"[red]configuration error[/red]: {exc}")
        raise typer.Exit(2) from None


def fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error[/red]: {message}")
    return typer.Exit(code)


def parse_duration(text: str) -> timedelta:
    """`500ms`, `10s`, `5m`, `2h`, `1d`; a leading `-` means before now."""
    match = _DURATION.match(text.strip())
    if not match:
        raise typer.BadParameter("use a number and a unit: 500ms, 10s, 5m, 2h, 1d")
    seconds = float(match[2]) * _UNITS[match[3]]
    return timedelta(seconds=-seconds if match[1] == "-" else seconds)


def parse_moment(text: str, now: datetime) -> datetime:
    """`now`, a duration from now (`2h`, `-30m`) or an RFC 3339 time with an offset."""
    if text.strip().lower() == "now":
        return now
    if _DURATION.match(text.strip()):
        return now + parse_duration(text)
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise typer.BadParameter(
            f"{text!r}: give now, a duration such as 2h or -30m, or an RFC 3339 time"
        ) from None
    if moment.tzinfo is None:
        raise typer.BadParameter(f"{text!r} has no offset; add one, such as Z or -05:00")
    return moment


def utcnow() -> datetime:
    return datetime.now(UTC)


def with_pool(settings: Settings, work: Callable[[asyncpg.Pool], Awaitable[T]]) -> T:
    """Run `work` on a small pool that lives as long as the command."""

    async def _go() -> T:
        from shared.db import create_pool

        pool = await create_pool(settings.database_url, max_size=2)
        try:
            return await work(pool)
        finally:
            await pool.close()

    try:
        return asyncio.run(_go())
    except (OSError, asyncpg.PostgresError) as exc:
        raise fail(f"database: {exc.__class__.__name__}: {exc}; try `followups doctor`") from None


COMMAND_PUBLISH_TIMEOUT_SECONDS = 20.0


def publish_command(settings: Settings, routing_key: str, body: dict[str, Any]) -> None:
    """Validate a command as the scheduler will, then publish it on exchange `followups`."""
    raw = json.dumps(body).encode()
    try:
        parse_inbound(routing_key, raw, "application/json")
    except InvalidMessage as exc:
        raise fail(f"{exc.rule}: {exc.detail}", 2) from None

    async def _send() -> None:
        from shared.bus import AmqpPublisher
        from shared.topology import PUBLIC_EXCHANGE

        async with AmqpPublisher(settings.rabbitmq_url) as publisher:
            await publisher.publish(
                raw, exchange=PUBLIC_EXCHANGE, routing_key=routing_key, mandatory=False
            )

    async def _send_in_time() -> None:
        # A robust connection would keep retrying a broker that is down or a vhost that is gone;
        # a command line must answer.
        await asyncio.wait_for(_send(), COMMAND_PUBLISH_TIMEOUT_SECONDS)

    try:
        asyncio.run(_send_in_time())
    except TimeoutError:
        raise fail(
            f"the broker did not confirm the {routing_key} within "
            f"{COMMAND_PUBLISH_TIMEOUT_SECONDS:.0f} s; nothing may have been published. "
            "Try `followups doctor`"
        ) from None


def print_json(data: Any) -> None:
    """Machine-readable output: plain JSON on stdout, times in RFC 3339."""

    def encode(value: Any) -> Any:
        if isinstance(value, datetime):
            return value.isoformat()
        return str(value)

    typer.echo(json.dumps(data, default=encode, indent=2, ensure_ascii=False))


def iso(moment: datetime | None) -> str:
    return moment.isoformat(timespec="milliseconds") if moment else ""


def milliseconds(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def percent(value: float | None) -> str:
    return "" if value is None else f"{value:.1%}"
