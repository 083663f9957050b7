"""`followups doctor`'s broker checks: the connection, the timers, the work queues and their
consumers, and the queue policies."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aio_pika
import aiormq

from services.cli.checks import TIMEOUT_SECONDS, Check, Level, redact, why
from services.cli.queue_moves import queue_states
from shared.policies import Management, ManagementError, policies, shadowing
from shared.settings import DelayBackend, Settings
from shared.topology import (
    TIMER_DELIVER_EXCHANGE,
    TIMER_PLUGIN_EXCHANGE,
    WORK_QUEUES,
    timer_queues,
)


async def check_broker(settings: Settings) -> list[Check]:
    url = redact(settings.rabbitmq_url)
    try:
        connection = await aio_pika.connect(settings.rabbitmq_url, timeout=TIMEOUT_SECONDS)
    except Exception as exc:
        return [
            Check(
                "broker",
                Level.FAIL,
                f"{url}: {why(exc)}",
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
