"""`followups doctor`: check every dependency of a deployment and say how to fix what fails."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Annotated
from urllib.parse import urlsplit

import asyncpg
import httpx
import typer
from rich.table import Table

from services.cli.broker_checks import check_broker, check_policies
from services.cli.checks import TIMEOUT_SECONDS, Check, Level, redact, why
from services.cli.common import console, load_settings
from shared.settings import OPENAI_DEFAULT_BASE_URL, Settings


async def check_database(settings: Settings) -> list[Check]:
    url = redact(settings.database_url)
    try:
        connection = await asyncpg.connect(settings.database_url, timeout=TIMEOUT_SECONDS)
    except Exception as exc:
        return [
            Check(
                "database",
                Level.FAIL,
                f"{url}: {why(exc)}",
                "start PostgreSQL, or set DATABASE_URL to a reachable database",
            ),
        ]
    try:
        version = await connection.fetchval("SHOW server_version")
    finally:
        await connection.close()
    checks = [Check("database", Level.OK, f"{url} (PostgreSQL {version})")]
    from shared.migrate import pending_migrations

    pending = await asyncio.to_thread(pending_migrations, settings.database_url)
    if pending:
        checks.append(
            Check(
                "migrations",
                Level.FAIL,
                f"{len(pending)} pending: {', '.join(pending)}",
                "run `followups migrate`",
            )
        )
    else:
        checks.append(Check("migrations", Level.OK, "all applied"))
    return checks


async def check_webhook(settings: Settings) -> list[Check]:
    from shared.errors import ConfigurationError
    from shared.webhook_target import check_webhook_target

    if settings.n8n_outbound_webhook_url is None:
        return [
            Check(
                "webhook",
                Level.WARN,
                "N8N_OUTBOUND_WEBHOOK_URL unset: the console sink, nothing is sent",
                "set N8N_OUTBOUND_WEBHOOK_URL to send real SMS",
            ),
        ]
    url = str(settings.n8n_outbound_webhook_url)
    parts = urlsplit(url)
    port_text = f":{parts.port}" if parts.port else ""
    shown = f"{parts.scheme}://{parts.hostname}{port_text}{parts.path}"  # never the credentials
    try:
        check_webhook_target(url, allow_insecure=settings.webhook_allow_insecure)
    except ConfigurationError as exc:
        return [Check("webhook", Level.FAIL, str(exc), "fix N8N_OUTBOUND_WEBHOOK_URL")]
    port = parts.port or (443 if parts.scheme == "https" else 80)
    tls = ssl.create_default_context() if parts.scheme == "https" else None
    try:
        # Connect (and shake hands for https) but send nothing: no request, no SMS.
        async with asyncio.timeout(TIMEOUT_SECONDS):
            _reader, writer = await asyncio.open_connection(parts.hostname, port, ssl=tls)
        writer.close()
        await writer.wait_closed()
    except Exception as exc:
        return [
            Check(
                "webhook",
                Level.FAIL,
                f"{shown}: {why(exc)}",
                "check that n8n is up and reachable from here (DNS, firewall, TLS)",
            )
        ]
    return [Check("webhook", Level.OK, f"{shown} accepts connections (nothing sent)")]


async def check_openai(settings: Settings) -> list[Check]:
    if settings.openai_api_key is None:
        return [Check("openai", Level.OK, "no OPENAI_API_KEY: texts come from the templates")]
    base = (settings.openai_base_url or OPENAI_DEFAULT_BASE_URL).rstrip("/")
    headers = {"Authorization": f"Bearer {settings.openai_api_key.get_secret_value()}"}
    try:
        # Listing models costs no tokens and proves the key and the route.
        async with httpx.AsyncClient(timeout=TIMEOUT_SECONDS) as client:
            response = await client.get(f"{base}/models", headers=headers)
    except httpx.HTTPError as exc:
        return [
            Check(
                "openai",
                Level.FAIL,
                f"{base}: {why(exc)}",
                "check OPENAI_BASE_URL and outbound access; texts fall back to templates",
            )
        ]
    if response.status_code in (401, 403):
        return [
            Check(
                "openai",
                Level.FAIL,
                f"{base}: the key was refused ({response.status_code})",
                "set a valid OPENAI_API_KEY",
            )
        ]
    if response.status_code >= 400:
        return [
            Check(
                "openai",
                Level.WARN,
                f"{base}/models answered {response.status_code}",
                "an OpenAI-compatible server may lack /models; watch followups_text_total",
            )
        ]
    return [Check("openai", Level.OK, f"{base} answers; model {settings.openai_model}")]


CHECKS: tuple[Callable[[Settings], Awaitable[list[Check]]], ...] = (
    check_database,
    check_broker,
    check_policies,
    check_webhook,
    check_openai,
)


async def run_checks(settings: Settings) -> list[Check]:
    results = await asyncio.gather(*(check(settings) for check in CHECKS))
    return [c for group in results for c in group]


_STYLE = {Level.OK: "green", Level.WARN: "yellow", Level.FAIL: "bold red"}


def doctor(
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Check the database, migrations, broker, timers, queue policies and consumers, webhook and
    OpenAI.

    Exits 1 when a check fails, and says how to fix each one. Nothing is sent anywhere.

    Example: [bold]followups doctor[/bold]
    """
    checks = asyncio.run(run_checks(load_settings()))
    failed = [c for c in checks if c.level is Level.FAIL]
    if as_json:
        console.print_json(json.dumps([asdict(c) for c in checks]))
    else:
        table = Table("check", "", "detail", "fix")
        for c in checks:
            style = _STYLE[c.level]
            table.add_row(c.name, f"[{style}]{c.level.value}[/{style}]", c.detail, c.fix)
        console.print(table)
        console.print(
            f"[bold red]{len(failed)} check(s) failed[/bold red]" if failed else "[green]all good"
        )
    if failed:
        raise typer.Exit(1)
