"""Commands that ask the running system to do something, as another service would."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any
from uuid import uuid4
from zoneinfo import ZoneInfo

import asyncpg
import typer

from services.cli.common import (
    console,
    fail,
    load_settings,
    parse_duration,
    publish_command,
    utcnow,
    with_pool,
)
from services.cli.moments import relative, wall
from shared.calendar import quiet_until, zone_for
from shared.errors import InvalidMessage
from shared.rows import Followup, Reference, find_followup
from shared.schemas import FollowupRequested, Status, parse_inbound
from shared.settings import QuietHours, Settings

_UNSENT = (Status.CANCELLED, Status.SKIPPED, Status.FAILED)

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
    key: Annotated[
        str | None, typer.Option(help="idempotency key; unset: a new cli-… key, printed")
    ] = None,
    priority: Annotated[int, typer.Option(min=0, max=9, help="0-9; higher goes first")] = 0,
    action_item: Annotated[int | None, typer.Option(help="action item id")] = None,
    event: Annotated[int | None, typer.Option(help="event id")] = None,
    ai: Annotated[bool, typer.Option(help="let the LLM personalise the text")] = False,
    hint: Annotated[
        list[str] | None, typer.Option(help="KEY=VALUE for the LLM's context; repeatable")
    ] = None,
    every_days: Annotated[
        int | None, typer.Option(min=1, help="recurring: again every N days, same local time")
    ] = None,
    skip_if_completed: Annotated[
        bool, typer.Option(help="skip it if the --action-item is completed by then")
    ] = False,
    wait: Annotated[
        float, typer.Option(min=0, help="seconds to wait for the scheduler to record it")
    ] = 5.0,
) -> None:
    """Publish a followup.requested, exactly as another service would, and say what will happen.

    Prints the id once the scheduler has recorded it (else the key to find it by), the due time
    in the contractor's zone and from now, and when it falls in quiet hours, when it goes instead.

    Example: [bold]followups schedule --contractor 1 --in 10s --template "Hi {first_name}!"[/bold]
    """
    if (in_ is None) == (at is None):
        raise fail("give exactly one of --in or --at", 2)
    settings = load_settings()
    now = utcnow()
    key = key or f"cli-{uuid4().hex[:12]}"
    body: dict[str, Any] = {
        "idempotency_key": key,
        "contractor_id": contractor,
        "scheduled_time": (now + parse_duration(in_)).isoformat() if in_ is not None else at,
        "followup_type": followup_type,
        "message_template": template,
        "message_tone": tone,
        "priority": priority,
        "ai_should_personalize": ai,
        "ai_context_hints": _hints(hint or []),
        "skip_if_completed": skip_if_completed,
        "requested_by": "cli",
    }
    if every_days is not None:
        body |= {"is_recurring": True, "recurrence_interval_days": every_days}
    if action_item:
        body["action_item_id"] = action_item
    if event:
        body["event_id"] = event
    request = _validated(body)
    reference = Reference(idempotency_key=key)
    found = with_pool(settings, lambda pool: _recipient(pool, contractor, reference))
    if found is None:
        raise fail(f"no contractor {contractor}; add one with `followups add-contractor`")
    person, existing = found
    publish_command(settings, "followup.requested", body)
    row = existing or with_pool(settings, lambda pool: _recorded(pool, reference, wait))
    name = " ".join(filter(None, (person["first_name"], person["last_name"])))
    if existing is not None:
        console.print(
            f"key {key} is already follow-up [bold]{existing.id}[/bold] ({existing.status}); "
            "a request with the same key changes nothing"
        )
        return
    if row is None:
        console.print(f"requested for contractor {contractor} ({name})")
        console.print(f"  key [bold]{key}[/bold]: not recorded within {wait:g} s")
        console.print("  (is the scheduler running?) `followups show --key` finds it once it is")
    elif row.status in _UNSENT:
        reason = f" ({row.status_reason})" if row.status_reason else ""
        console.print(f"follow-up [bold]{row.id}[/bold] recorded as {row.status}{reason}")
        console.print(f"  key {key}; nothing will be sent")
        return
    else:
        already = "" if row.status == "scheduled" else f", already {row.status}"
        console.print(
            f"follow-up [bold]{row.id}[/bold] scheduled{already} for contractor {contractor} "
            f"({name})"
        )
        console.print(f"  key {key}")
    for line in due_lines(request.scheduled_time, now, settings, person["timezone"]):
        console.print(line)
    console.print(
        f"  follow it: [bold]followups watch[/bold] · "
        f"[bold]followups show {row.id if row else f'--key {key}'}[/bold]"
    )


def due_lines(
    due: datetime, now: datetime, settings: Settings, stored_zone: str | None
) -> list[str]:
    """When it is due, in the contractor's zone and from now, and whether quiet hours move it:
    the dispatcher's own rule (`quiet_until` on the settings' window), asked here ahead of time."""
    zone, unusable = zone_for(stored_zone, settings.default_zone)
    lines = [f"  due {wall(due, zone)} in {zone.key} ({relative(due, now)})"]
    if unusable:
        lines.append(f"  [yellow]its zone {stored_zone!r} is unusable: {zone.key} applies[/yellow]")
    window = settings.quiet_window
    goes = quiet_until(max(now, due), window, zone)
    if goes is not None:
        lines.append(f"  [yellow]inside quiet hours {window} in {zone.key}[/yellow]")
        lines.append(f"  [yellow]so it goes at {wall(goes, zone)} ({relative(goes, now)})[/yellow]")
    return lines


def _hints(pairs: list[str]) -> dict[str, str]:
    hints = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise typer.BadParameter(f"{pair!r}: write --hint KEY=VALUE")
        hints[name.strip()] = value
    return hints


def _validated(body: dict[str, Any]) -> FollowupRequested:
    try:
        request = parse_inbound("followup.requested", json.dumps(body).encode(), "application/json")
    except InvalidMessage as exc:
        raise fail(f"{exc.rule}: {exc.detail}", 2) from None
    assert isinstance(request, FollowupRequested)
    return request


async def _recipient(
    pool: asyncpg.Pool, contractor_id: int, reference: Reference
) -> tuple[asyncpg.Record, Followup | None] | None:
    """The contractor (None if unknown) and the follow-up that already has the key, if any."""
    person = await pool.fetchrow(
        "SELECT first_name, last_name, timezone FROM contractors WHERE id = $1", contractor_id
    )
    if person is None:
        return None
    return person, await find_followup(pool, reference)


async def _recorded(pool: asyncpg.Pool, reference: Reference, wait: float) -> Followup | None:
    """The row the scheduler records for the key, polled until `wait` seconds have passed."""
    deadline = time.monotonic() + wait
    while True:
        row = await find_followup(pool, reference)
        if row is not None or time.monotonic() >= deadline:
            return row
        await asyncio.sleep(0.1)


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


# One well-known zone per hour of UTC offset, for a demo contractor where it is daytime now.
_DAYTIME_ZONES = (
    "Pacific/Honolulu",
    "America/Anchorage",
    "America/Los_Angeles",
    "America/Denver",
    "America/Chicago",
    "America/New_York",
    "America/Halifax",
    "America/Sao_Paulo",
    "Atlantic/South_Georgia",
    "Atlantic/Azores",
    "Europe/London",
    "Europe/Paris",
    "Europe/Athens",
    "Europe/Istanbul",
    "Asia/Dubai",
    "Asia/Karachi",
    "Asia/Dhaka",
    "Asia/Bangkok",
    "Asia/Singapore",
    "Asia/Tokyo",
    "Australia/Brisbane",
    "Pacific/Noumea",
    "Pacific/Auckland",
)
DAYTIME_MARGIN = timedelta(hours=1)


def quiet_starts(now: datetime, window: QuietHours, zone: ZoneInfo) -> datetime:
    """The next instant after `now` at which the quiet window begins in `zone`."""
    local = now.astimezone(zone)
    start = datetime.combine(local.date(), window.start, tzinfo=zone)
    return (
        start
        if start > local
        else datetime.combine(local.date() + timedelta(days=1), window.start, tzinfo=zone)
    )


def daytime_zone(now: datetime, window: QuietHours | None, default: ZoneInfo) -> ZoneInfo:
    """`default` when it is outside quiet hours there for the next `DAYTIME_MARGIN`, else the
    zone nearest to it by UTC offset where that holds (`default` if none does)."""

    def offset(zone: ZoneInfo) -> float:
        return (now.astimezone(zone).utcoffset() or timedelta(0)).total_seconds()

    def clear(zone: ZoneInfo) -> bool:
        if window is None:
            return True
        return quiet_until(now, window, zone) is None and (
            quiet_starts(now, window, zone) - now >= DAYTIME_MARGIN
        )

    candidates = [
        default,
        *sorted(map(ZoneInfo, _DAYTIME_ZONES), key=lambda z: abs(offset(z) - offset(default))),
    ]
    return next((zone for zone in candidates if clear(zone)), default)


def add_contractor(
    phone: Annotated[str, typer.Option(help="phone number, E.164 preferred")] = "+12025550123",
    first_name: Annotated[str, typer.Option("--first-name")] = "Sam",
    last_name: Annotated[str, typer.Option("--last-name")] = "Rivera",
    company: Annotated[str, typer.Option()] = "Rivera Roofing",
    timezone: Annotated[
        str | None,
        typer.Option(help="IANA zone; unset: DEFAULT_TIMEZONE, or a zone where it is daytime now"),
    ] = None,
) -> None:
    """Add a contractor (a demo one by default) so a newcomer can schedule to it.

    Without --timezone the contractor lives in DEFAULT_TIMEZONE if quiet hours there are at
    least an hour away, else in the zone nearest to it where they are, so a follow-up scheduled
    a few seconds ahead goes at once; the command says which zone and what time it is there.

    Example: [bold]followups add-contractor --first-name Ana --phone +14155552671[/bold]
    """
    from shared.phones import InvalidPhone, to_e164

    try:
        e164 = to_e164(phone)
    except InvalidPhone as exc:
        raise fail(f"{exc}; give a number such as +14155552671", 2) from None
    settings = load_settings()
    now = utcnow()
    window = settings.quiet_window
    if timezone is None:
        zone = daytime_zone(now, window, settings.default_zone)
        stored = None if zone == settings.default_zone else zone.key
    else:
        zone, unusable = zone_for(timezone, settings.default_zone)
        if unusable:
            raise fail(f"{timezone!r} is not an IANA time zone; give one such as Europe/Paris", 2)
        stored = timezone

    async def _insert(pool: asyncpg.Pool) -> int:
        new_id: int = await pool.fetchval(
            """INSERT INTO contractors (first_name, last_name, company_name, phone, timezone)
               VALUES ($1, $2, $3, $4, $5) RETURNING id""",
            first_name,
            last_name,
            company,
            e164,
            stored,
        )
        return new_id

    new_id = with_pool(settings, _insert)
    local = f"{now.astimezone(zone):%H:%M}"
    console.print(
        f"contractor [bold]{new_id}[/bold] added: {first_name} {last_name} in {zone.key}, "
        f"{local} there now"
    )
    if window is None:
        console.print("  quiet hours are off")
    elif (goes := quiet_until(now, window, zone)) is not None:
        console.print(f"  [yellow]inside quiet hours {window}: follow-ups wait[/yellow]")
        console.print(f"  [yellow]until {wall(goes, zone)} ({relative(goes, now)})[/yellow]")
    else:
        starts = quiet_starts(now, window, zone)
        console.print(f"  quiet hours {window} begin there {relative(starts, now)}")
    if timezone is None and stored is not None:
        console.print(
            f"  picked as it is quiet in {settings.default_zone.key}; --timezone sets a zone"
        )
