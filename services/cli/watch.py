"""`followups watch`: every lifecycle transition as it happens, one line each, until Ctrl-C."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any

import typer

from services.cli.common import console, fail, load_settings
from services.cli.moments import clock, relative

# Commands other services send on the same exchange under `followup.*`: not transitions.
COMMAND_KEYS = frozenset(
    {
        "followup.requested",
        "followup.cancel_requested",
        "followup.reschedule_requested",
        "followup.response_received",
        "followup.delivery_reported",
    }
)


def _moment(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def event_line(event: Mapping[str, Any]) -> str:
    """One event as a line: when, which follow-up, what it became and the facts that explain it."""
    occurred = _moment(event.get("occurred_at"))
    name = str(event.get("event", "?")).removeprefix("followup.")
    parts = [
        clock(occurred) if occurred else "--:--:--.---",
        f"follow-up {event.get('followup_id', '?')}",
        f"contractor {event.get('contractor_id', '?')}",
        str(event.get("followup_type", "")),
        name if event.get("status") in (None, name) else f"{name} ({event['status']})",
    ]
    facts = []
    due = _moment(event.get("scheduled_time"))
    if due is not None and occurred is not None and name == "scheduled":
        facts.append(f"due {clock(due)} ({relative(due, occurred)})")
    if (late := event.get("lateness_ms")) is not None:
        facts.append(f"{late:.1f} ms late")
    if (attempts := event.get("attempts")) is not None:
        facts.append(f"attempt {attempts}")
    if reason := event.get("reason"):
        facts.append(str(reason))
    if (following := event.get("next_occurrence_id")) is not None:
        facts.append(f"next occurrence {following}")
    line = "  ".join(p for p in parts if p)
    return f"{line}  · {', '.join(facts)}" if facts else line


async def _follow(url: str, contractor: int | None) -> None:
    import aio_pika

    from shared.topology import PUBLIC_EXCHANGE

    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        # Exclusive and auto-deleted: the queue goes with the connection, nothing is left behind.
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(PUBLIC_EXCHANGE, routing_key="followup.#")
        console.print(f"watching follow-up events on exchange {PUBLIC_EXCHANGE!r}; Ctrl-C stops")
        async with queue.iterator() as messages:
            async for message in messages:
                await message.ack()
                if message.routing_key in COMMAND_KEYS:
                    continue
                try:
                    event = json.loads(message.body)
                except ValueError:
                    continue
                if not isinstance(event, dict) or "event" not in event:
                    continue
                if contractor is not None and event.get("contractor_id") != contractor:
                    continue
                console.print(event_line(event), highlight=False, soft_wrap=True)


def watch(
    contractor: Annotated[int | None, typer.Option(help="only this contractor's")] = None,
) -> None:
    """Show each follow-up transition as it happens (the followup.* events), until Ctrl-C.

    Example: [bold]followups watch[/bold]   or   [bold]followups watch --contractor 1[/bold]
    """
    from aio_pika.exceptions import AMQPException

    settings = load_settings()
    try:
        asyncio.run(_follow(settings.rabbitmq_url, contractor))
    except KeyboardInterrupt:
        console.print("stopped")
    except (OSError, AMQPException) as exc:
        raise fail(f"broker: {exc.__class__.__name__}: {exc}; try `followups doctor`") from None
