"""`followups`: the operator's command line."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from shared.errors import ConfigurationError, InvalidMessage
from shared.schemas import parse_inbound
from shared.settings import Settings

app = typer.Typer(
    help="followups: follow-up SMS delivered at their exact scheduled time.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)
console = Console()
err = Console(stderr=True)

SERVICES = ("scheduler", "personalizer", "dispatcher")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        err.print(f"[red]configuration error[/red]: {exc}")
        raise typer.Exit(2) from None


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error[/red]: {message}")
    return typer.Exit(code)


def parse_duration(text: str) -> timedelta:
    match = _DURATION.match(text.strip())
    if not match:
        raise typer.BadParameter("use a number and a unit: 500ms, 10s, 5m, 2h, 1d")
    return timedelta(seconds=float(match[1]) * _UNITS[match[2]])


@app.command()
def migrate() -> None:
    """Create the database if needed and apply pending migrations.

    Example: [bold]DATABASE_URL=postgresql://127.0.0.1/followups followups migrate[/bold]
    """
    from shared.migrate import migrate as run_migrations

    settings = _settings()
    try:
        report = run_migrations(settings.database_url)
    except ConfigurationError as exc:
        raise _fail(str(exc)) from None
    console.print(report or "migrations: nothing to do")


@app.command()
def declare() -> None:
    """Declare the broker topology (exchanges, queues, timers) for the configured backend.

    Example: [bold]followups declare[/bold]
    """
    from shared.timers import resolve_backend
    from shared.topology import declare_topology

    settings = _settings()

    async def _run() -> str:
        backend = await resolve_backend(settings.rabbitmq_url, settings.delay_backend)
        await declare_topology(
            settings.rabbitmq_url, backend=backend, queue_type=settings.delay_queue_type
        )
        return backend.value

    console.print(f"topology declared; timer backend: {asyncio.run(_run())}")


@app.command()
def run(
    service: Annotated[str, typer.Argument(help="scheduler, personalizer, dispatcher or all")],
) -> None:
    """Run one service, or all three as child processes, until Ctrl-C.

    Example: [bold]followups run all[/bold]
    """
    if service == "all":
        raise typer.Exit(_run_all())
    if service not in SERVICES:
        raise _fail(f"unknown service {service!r}; choose from {', '.join(SERVICES)} or all", 2)
    settings = _settings()
    module = __import__(f"services.{service}.app", fromlist=["create_app"])
    asyncio.run(module.create_app(settings).run())


def _run_all() -> int:
    children = [
        subprocess.Popen([sys.executable, "-m", "services.cli.main", "run", name])  # noqa: S603
        for name in SERVICES
    ]

    def _forward(signum: int, _frame: Any) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGINT, _forward)
    signal.signal(signal.SIGTERM, _forward)
    codes = [child.wait() for child in children]
    return max(codes, default=0)


@app.command()
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
        raise _fail("give exactly one of --in or --at", 2)
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
    _publish_command("followup.requested", body)
    console.print(f"requested: contractor {contractor} at {body['scheduled_time']}")


def _publish_command(routing_key: str, body: dict[str, Any]) -> None:
    raw = json.dumps(body).encode()
    try:
        parse_inbound(routing_key, raw, "application/json")
    except InvalidMessage as exc:
        raise _fail(f"{exc.rule}: {exc.detail}", 2) from None
    settings = _settings()

    async def _send() -> None:
        from shared.bus import BrokerPublisher, make_broker
        from shared.topology import PUBLIC_EXCHANGE

        broker = make_broker(settings.rabbitmq_url)
        async with broker:
            await broker.connect()
            await BrokerPublisher(broker).publish(
                raw, exchange=PUBLIC_EXCHANGE, routing_key=routing_key, mandatory=False
            )

    asyncio.run(_send())


@app.command("add-contractor")
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
        raise _fail(f"{exc}; give a number such as +14155552671", 2) from None
    settings = _settings()

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


def _pool_run(coro_factory: Any) -> Any:
    settings = _settings()

    async def _go() -> Any:
        from shared.db import create_pool
        from shared.store import FollowupStore

        pool = await create_pool(settings.database_url, max_size=2)
        try:
            return await coro_factory(pool, FollowupStore(pool))
        finally:
            await pool.close()

    return asyncio.run(_go())


@app.command()
def show(followup_id: Annotated[int, typer.Argument(help="follow-up id")]) -> None:
    """One follow-up: its row and the timeline of its transitions.

    Example: [bold]followups show 42[/bold]
    """

    async def _load(pool: Any, store: Any) -> Any:
        row = await store.get(followup_id)
        transitions = await pool.fetch(
            "SELECT at, stage, from_status, to_status, detail FROM followup_transitions"
            " WHERE followup_id = $1 ORDER BY at, id",
            followup_id,
        )
        return row, transitions

    row, transitions = _pool_run(_load)
    if row is None:
        raise _fail(f"no follow-up {followup_id}")
    table = Table(show_header=False, box=None)
    for name in (
        "id",
        "contractor_id",
        "followup_type",
        "status",
        "status_reason",
        "scheduled_time",
        "sent_at",
        "sent_by",
        "lateness_ms",
        "attempts",
        "text_source",
        "text_fallback_reason",
        "priority",
        "version",
        "send_key",
        "is_recurring",
        "next_occurrence_id",
        "last_error",
    ):
        table.add_row(name, str(getattr(row, name)))
    console.print(table)
    timeline = Table("at", "stage", "from", "to", "detail", title="timeline")
    for t in transitions:
        timeline.add_row(
            t["at"].isoformat(),
            t["stage"],
            t["from_status"] or "",
            t["to_status"] or "",
            json.dumps(t["detail"]),
        )
    console.print(timeline)


@app.command("list")
def list_(
    status: Annotated[str | None, typer.Option(help="scheduled, sending, sent, ...")] = None,
    contractor: Annotated[int | None, typer.Option(help="contractor id")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 50,
) -> None:
    """Follow-ups by due time, newest plans last.

    Example: [bold]followups list --status scheduled[/bold]
    """

    async def _load(pool: Any, _store: Any) -> Any:
        return await pool.fetch(
            """SELECT id, contractor_id, followup_type, status, priority, scheduled_time,
                      sent_at, lateness_ms, attempts
               FROM contractor_followup_schedules
               WHERE ($1::text IS NULL OR status = $1)
                 AND ($2::bigint IS NULL OR contractor_id = $2)
               ORDER BY scheduled_time DESC LIMIT $3""",
            status,
            contractor,
            limit,
        )

    rows = _pool_run(_load)
    table = Table(
        "id", "contractor", "type", "status", "prio", "scheduled", "sent", "late ms", "attempts"
    )
    for r in reversed(rows):
        table.add_row(
            str(r["id"]),
            str(r["contractor_id"]),
            r["followup_type"],
            r["status"],
            str(r["priority"]),
            r["scheduled_time"].isoformat(),
            r["sent_at"].isoformat() if r["sent_at"] else "",
            f"{r['lateness_ms']:.1f}" if r["lateness_ms"] is not None else "",
            str(r["attempts"]),
        )
    console.print(table)


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()


if __name__ == "__main__":
    main()
