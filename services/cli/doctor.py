"""`followups doctor`: check every dependency of a deployment and say how to fix what fails."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Annotated
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import aiormq
import asyncpg
import httpx
import typer
from rich.table import Table

from services.cli.common import console, load_settings
from shared.settings import DelayBackend, Settings
from shared.topology import (
    TIMER_DELIVER_EXCHANGE,
    TIMER_PLUGIN_EXCHANGE,
    WORK_QUEUES,
    timer_queues,
)

TIMEOUT_SECONDS = 5.0
OPENAI_DEFAULT_BASE = "https://api.openai.com/v1"


class Level(StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Check:
    name: str
    level: Level
    detail: str
    fix: str = ""


def redact(url: str) -> str:
    """The URL without its password, fit to print."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _why(exc: BaseException) -> str:
    return f"{exc.__class__.__name__}: {exc}".rstrip(": ")


async def check_database(settings: Settings) -> list[Check]:
    url = redact(settings.database_url)
    try:
        connection = await asyncpg.connect(settings.database_url, timeout=TIMEOUT_SECONDS)
    except Exception as exc:
        return [
            Check(
                "database",
                Level.FAIL,
                f"{url}: {_why(exc)}",
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


async def check_broker(settings: Settings) -> list[Check]:
    url = redact(settings.rabbitmq_url)
    try:
        connection = await aio_pika.connect(settings.rabbitmq_url, timeout=TIMEOUT_SECONDS)
    except Exception as exc:
        return [
            Check(
                "broker",
                Level.FAIL,
                f"{url}: {_why(exc)}",
                "start RabbitMQ, or set RABBITMQ_URL (user, password and vhost) correctly",
            ),
        ]
    async with connection:
        checks = [Check("broker", Level.OK, url)]
        checks.append(await _check_timers(settings, connection))
        checks.extend(await _check_queues(connection))
    return checks


async def _declared(
    connection: aio_pika.abc.AbstractConnection,
    probe: Callable[[aio_pika.abc.AbstractChannel], Awaitable[object]],
) -> bool:
    # A failed passive declare closes its channel: one throwaway channel per question.
    channel = await connection.channel()
    try:
        await probe(channel)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return False
    finally:
        if not channel.is_closed:
            await channel.close()
    return True


async def _exists(connection: aio_pika.abc.AbstractConnection, queue: str) -> bool:
    return await _declared(connection, lambda channel: channel.declare_queue(queue, passive=True))


async def _exchange_exists(connection: aio_pika.abc.AbstractConnection, name: str) -> bool:
    return await _declared(connection, lambda channel: channel.get_exchange(name, ensure=True))


async def _check_timers(settings: Settings, connection: aio_pika.abc.AbstractConnection) -> Check:
    from shared.timers import broker_has_plugin

    has_plugin = await broker_has_plugin(settings.rabbitmq_url)
    wanted = settings.delay_backend
    if wanted is DelayBackend.PLUGIN and not has_plugin:
        return Check(
            "timers",
            Level.FAIL,
            "DELAY_BACKEND=plugin but the broker has no delayed-message plugin",
            "rabbitmq-plugins enable rabbitmq_delayed_message_exchange, or DELAY_BACKEND=levels",
        )
    backend = (
        wanted
        if wanted is not DelayBackend.AUTO
        else (DelayBackend.PLUGIN if has_plugin else DelayBackend.LEVELS)
    )
    plugin = "present" if has_plugin else "absent"
    if backend is DelayBackend.PLUGIN:
        declared = await _exchange_exists(connection, TIMER_PLUGIN_EXCHANGE)
    else:
        declared = await _exchange_exists(connection, TIMER_DELIVER_EXCHANGE) and all(
            [await _exists(connection, name) for name in (timer_queues()[0], timer_queues()[-1])]
        )
    detail = f"backend {backend.value} (DELAY_BACKEND={wanted.value}, plugin {plugin})"
    if not declared:
        return Check(
            "timers",
            Level.FAIL,
            f"{detail}; its exchanges are not declared",
            "run `followups declare`",
        )
    return Check("timers", Level.OK, detail)


async def _check_queues(connection: aio_pika.abc.AbstractConnection) -> list[Check]:
    checks = []
    for work in WORK_QUEUES:
        service = work.name.split(".")[1]
        name = f"queue {work.name}"
        channel = await connection.channel()
        try:
            queue = await channel.declare_queue(work.name, passive=True)
            dlq = await channel.declare_queue(work.dead_letter_queue, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            checks.append(Check(name, Level.FAIL, "missing", "run `followups declare`"))
            continue
        finally:
            if not channel.is_closed:
                await channel.close()
        depth = queue.declaration_result.message_count
        consumers = queue.declaration_result.consumer_count
        dead = dlq.declaration_result.message_count
        detail = f"{depth} waiting, {consumers} consumer(s), {dead} dead-lettered"
        if not consumers:
            checks.append(Check(name, Level.FAIL, detail, f"start it: `followups run {service}`"))
        elif dead:
            checks.append(
                Check(
                    name,
                    Level.WARN,
                    detail,
                    f"look: `followups dlq list --queue {service}`, then replay or purge",
                )
            )
        else:
            checks.append(Check(name, Level.OK, detail))
    return checks


async def check_policies(settings: Settings) -> list[Check]:
    """The queue policies `followups declare` puts, as the broker holds them now."""
    from services.cli.queue_moves import queue_states
    from shared.policies import Management, ManagementError, policies, shadowing

    limits = settings.queue_limits
    ours = policies(limits)
    try:
        async with Management.from_settings(
            settings.rabbitmq_url, settings.rabbitmq_management_url
        ) as api:
            stored = {str(p["name"]): p for p in await api.policies()}
            states = await queue_states(api)
    except ManagementError as exc:
        return [
            Check(
                "queue policies",
                Level.WARN,
                str(exc),
                "the policies can't be checked (or applied by `followups declare`) without it",
            )
        ]
    missing = [p.name for p in ours if p.name not in stored]
    if missing:
        return [
            Check(
                "queue policies",
                Level.FAIL,
                f"missing: {', '.join(missing)} (no delivery limit, dead-letter target or caps)",
                "run `followups declare`",
            )
        ]
    checks = []
    changed = [p.name for p in ours if {**p.body(), "name": p.name} != _comparable(stored[p.name])]
    if changed:
        checks.append(
            Check(
                "queue policies",
                Level.WARN,
                f"differ from the settings: {', '.join(changed)}",
                "`followups declare` puts back the configured values",
            )
        )
    else:
        checks.append(
            Check(
                "queue policies",
                Level.OK,
                f"delivery limit {limits.delivery_limit}; dead letters kept at most "
                f"{limits.dlq_max_length} and {limits.dlq_max_age_hours:g} h",
            )
        )
    for problem in shadowing(ours, stored.values(), [w.name for w in WORK_QUEUES]):
        checks.append(Check("queue policies", Level.WARN, problem, "see README, Queue policies"))
    for state in states:
        if state.legacy_arguments:
            checks.append(
                Check(
                    f"queue {state.work.name}",
                    Level.WARN,
                    f"declared by an earlier release with {', '.join(state.legacy_arguments)}",
                    "stop the services, then `followups declare --migrate-queues`",
                )
            )
        elif state.holding:
            checks.append(
                Check(
                    f"queue {state.work.name}",
                    Level.FAIL,
                    "a move did not finish: messages wait in its holding queue",
                    "`followups declare --migrate-queues`",
                )
            )
    return checks


def _comparable(stored: dict[str, object]) -> dict[str, object]:
    return {k: stored.get(k) for k in ("name", "pattern", "apply-to", "definition", "priority")}


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
                f"{shown}: {_why(exc)}",
                "check that n8n is up and reachable from here (DNS, firewall, TLS)",
            )
        ]
    return [Check("webhook", Level.OK, f"{shown} accepts connections (nothing sent)")]


async def check_openai(settings: Settings) -> list[Check]:
    if settings.openai_api_key is None:
        return [Check("openai", Level.OK, "no OPENAI_API_KEY: texts come from the templates")]
    base = (settings.openai_base_url or OPENAI_DEFAULT_BASE).rstrip("/")
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
                f"{base}: {_why(exc)}",
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
