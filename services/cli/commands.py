"""Commands that ask the running system to do something, as another service would."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Annotated, Any

import typer

from services.cli.common import (
    console,
    fail,
    load_settings,
    parse_duration,
    publish_command,
)

FollowupId = Annotated[int | None, typer.Argument(help="follow-up id", show_default=False)]
Key = Annotated[
    str | None, typer.Option("--key", "-k", help="the idempotency key it was requested with")
]


def schedule(
    contractor: Annotated[int, typer.Option("--contractor", "-c", help="contractor id")],
    template: Annotated[str, typer.Option("--template", "-t", help="text with {placeholders}")],
    in_: Annotated[str | None, typer.Option("--in", help="delay from now: 10s, 5m, 2h")] = None,
    at: Annotated[str | None, typer.Option("--at", help="RFC 3339 time with offset")] = None,
    followup_type: Annotated[str, typer.Option("--type", help="follow-up type")] = "manual",
    tone: Annotated[str, typer.Option(help="message tone")] = "friendly",
    key: Annotated[str | None, typer.Option(help="idempotency key")] = None,
    priority: Annotated[int, typer.Option(min=0, max=9)] = 0,
    action_item: Annotated[int | None, typer.Option(help="action item id")] = None,
    event: Annotated[int | None, typer.Option(help="event id")] = None,
    ai: Annotated[bool, typer.Option(help="let the LLM personalise the text")] = False,
) -> None:
    """Publish a followup.requested, exactly as another service would.

    Example: [bold]followups schedule --contractor 1 --in 10s --template "Hi {first_name}!"[/bold]
    """
    if (in_ is None) == (at is None):
        raise fail("give exactly one of --in or --at", 2)
    when = datetime.now(UTC) + parse_duration(in_) if in_ is not None else at
    body: dict[str, Any] = {
        "contractor_id": contractor,
        "scheduled_time": when.isoformat() if isinstance(when, datetime) else when,
        "followup_type": followup_type,
        "message_template": template,
        "message_tone": tone,
        "priority": priority,
        "ai_should_personalize": ai,
        "requested_by": "cli",
    }
    if key:
        body["idempotency_key"] = key
    if action_item:
        body["action_item_id"] = action_item
    if event:
        body["event_id"] = event
    publish_command(load_settings(), "followup.requested", body)
    console.print(f"requested: contractor {contractor} at {body['scheduled_time']}")


def _reference(followup_id: int | None, key: str | None) -> dict[str, Any]:
    if (followup_id is None) == (key is None):
        raise fail("give exactly one of a follow-up ID or --key", 2)
    return {"followup_id": followup_id} if followup_id is not None else {"idempotency_key": key}


def _named(reference: dict[str, Any]) -> str:
    if "followup_id" in reference:
        return f"follow-up {reference['followup_id']}"
    return f"follow-up with key {reference['idempotency_key']!r}"


def cancel(
    followup_id: FollowupId = None,
    key: Key = None,
    reason: Annotated[str | None, typer.Option(help="why; kept on the row")] = None,
) -> None:
    """Publish a followup.cancel_requested; a cancelled follow-up is never sent.

    Cancelling a recurring follow-up ends the series.

    Example: [bold]followups cancel 42 --reason "contractor called back"[/bold]
    """
    body = _reference(followup_id, key)
    if reason:
        body["reason"] = reason
    publish_command(load_settings(), "followup.cancel_requested", body)
    console.print(f"cancel requested: {_named(body)}; `followups show` tells when it is done")


def reschedule(
    followup_id: FollowupId = None,
    key: Key = None,
    in_: Annotated[str | None, typer.Option("--in", help="from now: 10s, 5m, 2h")] = None,
    at: Annotated[str | None, typer.Option("--at", help="RFC 3339 time with offset")] = None,
) -> None:
    """Publish a followup.reschedule_requested; only the new time fires.

    Example: [bold]followups reschedule --key onboarding-17 --at 2026-12-01T09:00:00-05:00[/bold]
    """
    body = _reference(followup_id, key)
    if (in_ is None) == (at is None):
        raise fail("give exactly one of --in or --at", 2)
    when = datetime.now(UTC) + parse_duration(in_) if in_ is not None else at
    body["scheduled_time"] = when.isoformat() if isinstance(when, datetime) else when
    publish_command(load_settings(), "followup.reschedule_requested", body)
    console.print(f"reschedule requested: {_named(body)} to {body['scheduled_time']}")


def add_contractor(
    phone: Annotated[str, typer.Option(help="phone number, E.164 preferred")] = "+12025550123",
    first_name: Annotated[str, typer.Option("--first-name")] = "Sam",
    last_name: Annotated[str, typer.Option("--last-name")] = "Rivera",
    company: Annotated[str, typer.Option()] = "Rivera Roofing",
    timezone: Annotated[str | None, typer.Option(help="IANA zone")] = None,
) -> None:
    """Add a contractor (a demo one by default) so a newcomer can schedule to it.

    Example: [bold]followups add-contractor --first-name Ana --phone +14155552671[/bold]
    """
    from shared.phones import InvalidPhone, to_e164

    try:
        e164 = to_e164(phone)
    except InvalidPhone as exc:
        raise fail(f"{exc}; give a number such as +14155552671", 2) from None
    settings = load_settings()

    async def _insert() -> int:
        from shared.db import create_pool

        pool = await create_pool(settings.database_url, max_size=1)
        try:
            new_id: int = await pool.fetchval(
                """INSERT INTO contractors (first_name, last_name, company_name, phone, timezone)
                   VALUES ($1, $2, $3, $4, $5) RETURNING id""",
                first_name,
                last_name,
                company,
                e164,
                timezone,
            )
            return new_id
        finally:
            await pool.close()

    console.print(f"contractor {asyncio.run(_insert())} added")
