"""`followups declare` applies the queue policies, a policy changes a queue in place, the
dead-letter queues are capped, and the work queues of earlier releases keep working and are
moved with their messages. Each test has a vhost of its own: they change the policies."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import pytest

from shared.bus import AmqpPublisher
from shared.policies import QueueLimits, policies, work_queue_policy
from shared.settings import DelayBackend, Settings
from shared.timers import LevelsTimer
from shared.topology import (
    DISPATCHER_DUE,
    PUBLIC_EXCHANGE,
    SCHEDULER_INBOX,
    WORK_QUEUES,
    declare_topology,
    digit_queue,
)
from testbed.infra import Infra
from tests.support.cli import followups
from tests.support.policies import applied_policy, declare_like_an_earlier_release, management

PATIENCE_SECONDS = 30.0


@pytest.fixture
async def own() -> AsyncIterator[Settings]:
    infra = await asyncio.to_thread(Infra.create, "pol")
    try:
        yield Settings(
            database_url=infra.database_url,
            rabbitmq_url=infra.rabbitmq_url,
            delay_backend=DelayBackend.LEVELS,
            quiet_hours="off",
        )
    finally:
        await infra.drop()


async def publish(settings: Settings, queue: str, *bodies: bytes, **headers: Any) -> None:
    connection = await aio_pika.connect(settings.rabbitmq_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        for body in bodies:
            await channel.default_exchange.publish(
                aio_pika.Message(body, headers=headers, delivery_mode=2), routing_key=queue
            )


async def depth(settings: Settings, queue: str) -> int:
    connection = await aio_pika.connect(settings.rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count)


async def take_all(settings: Settings, queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    connection = await aio_pika.connect(settings.rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        source = await channel.declare_queue(queue, passive=True)
        taken = []
        while (message := await source.get(no_ack=True, fail=False)) is not None:
            taken.append(message)
        return taken


async def ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
    """A consumer that holds what it gets (the queue is empty here)."""


async def deliveries_until_dead_lettered(settings: Settings, queue: str) -> int:
    """Take the queue's one message and return it (nack, requeue) until the broker stops
    handing it out; how many times it came."""
    connection = await aio_pika.connect(settings.rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        source = await channel.declare_queue(queue, passive=True)
        count = 0
        while (message := await source.get(no_ack=False, fail=False)) is not None:
            count += 1
            await message.nack(requeue=True)
        return count


async def test_declare_applies_the_policies_and_every_queue_takes_its_own(own):
    result = await followups(own, "declare", DLQ_MAX_LENGTH="50", DLQ_MAX_AGE_HOURS="2")
    assert result.exit_code == 0, result.output
    assert "policies applied: followups.scheduler.inbox" in result.output
    assert "warning" not in result.output

    limits = QueueLimits(dlq_max_length=50, dlq_max_age_hours=2)
    async with management(own) as api:
        stored = {p["name"]: p for p in await api.policies()}
        for policy in policies(limits):
            assert stored[policy.name]["pattern"] == policy.pattern
            assert stored[policy.name]["definition"] == policy.definition
            assert stored[policy.name]["apply-to"] == "queues"
        for work in WORK_QUEUES:
            info = await applied_policy(api, work.name, work.name)
            assert info["policy"] == work.name
            assert info["effective_policy_definition"] == work_queue_policy(work, limits).definition
            assert info["arguments"] == {"x-queue-type": "quorum"}
            dlq = await applied_policy(api, work.dead_letter_queue, "followups.dead-letters")
            assert dlq["effective_policy_definition"] == {
                "max-length": 50,
                "message-ttl": 2 * 3_600_000,
                "overflow": "drop-head",
            }
        timer = await applied_policy(api, digit_queue(0, 1), "followups.timers")
        assert timer["policy"] == "followups.timers"
        # The timer itself stays in the queue's arguments, out of any policy's reach.
        assert timer["arguments"]["x-message-ttl"] == 256
        orphans = await api.queue("followups.timers.orphans") or {}
        assert orphans.get("policy") in (None, "")


async def test_a_broader_policy_that_would_win_is_reported(own):
    async with management(own) as api:
        await api._call(
            "PUT",
            api._path("policies", "everything"),
            {"pattern": ".*", "apply-to": "all", "definition": {"max-length": 7}, "priority": 200},
        )
    result = await followups(own, "declare")
    assert result.exit_code == 0
    assert "policy 'everything' matches" in result.output
    assert "lower its priority" in result.output


async def test_a_delivery_limit_changed_by_policy_applies_to_the_queue_in_place(own):
    assert (await followups(own, "declare", DELIVERY_LIMIT="2")).exit_code == 0
    queue = SCHEDULER_INBOX.name
    await publish(own, queue, b"poison")
    assert await deliveries_until_dead_lettered(own, queue) == 3

    await publish(own, queue, b"still here")
    assert (await followups(own, "declare", DELIVERY_LIMIT="4")).exit_code == 0
    async with management(own) as api:
        deadline = time.monotonic() + PATIENCE_SECONDS
        while True:
            info = await api.queue(queue) or {}
            limit = (info.get("effective_policy_definition") or {}).get("delivery-limit")
            if limit == 4 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
    assert limit == 4
    # Not deleted: the message published before the change is still in it.
    [kept] = await take_all(own, queue)
    assert kept.body == b"still here"
    await publish(own, queue, b"poison again")
    assert await deliveries_until_dead_lettered(own, queue) == 5

    dead = await take_all(own, SCHEDULER_INBOX.dead_letter_queue)
    assert [m.body for m in dead] == [b"poison", b"poison again"]
    assert {m.headers["x-death"][0]["reason"] for m in dead} == {"delivery_limit"}


async def test_a_dead_letter_queue_over_its_cap_drops_its_oldest_and_ages_out(own):
    assert (await followups(own, "declare", DLQ_MAX_LENGTH="3")).exit_code == 0
    dlq = DISPATCHER_DUE.dead_letter_queue
    await publish(own, dlq, *(f"letter {n}".encode() for n in range(5)))
    assert [m.body for m in await take_all(own, dlq)] == [b"letter 2", b"letter 3", b"letter 4"]

    # A tenth of a second's age: a letter is gone soon after it arrives.
    assert (await followups(own, "declare", DLQ_MAX_AGE_HOURS="0.0000278")).exit_code == 0
    async with management(own) as api:
        info = await applied_policy(api, dlq, "followups.dead-letters")
        assert info["effective_policy_definition"]["message-ttl"] == 100
    await publish(own, dlq, b"old letter")
    deadline = time.monotonic() + PATIENCE_SECONDS
    while await depth(own, dlq) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert await take_all(own, dlq) == []


async def test_queues_of_an_earlier_release_keep_working_and_move_with_their_messages(own):
    await declare_like_an_earlier_release(own)
    await publish(own, DISPATCHER_DUE.name, b"one", b"two", b"three", **{"x-fire-at": 1})

    # The services start on such queues as they are.
    legacy = await declare_topology(own.rabbitmq_url, backend="levels")
    assert legacy == [w.name for w in WORK_QUEUES]

    result = await followups(own, "declare")
    assert result.exit_code == 0, result.output
    for work in WORK_QUEUES:
        assert f"{work.name} was declared by an earlier release" in result.output
    assert "followups declare --migrate-queues" in result.output

    # A timer still reaches the old queue through the levels.
    async with AmqpPublisher(own.rabbitmq_url, name="tests") as publisher:
        await LevelsTimer(publisher).arm(
            DISPATCHER_DUE.name, b"timer", LevelsTimer(publisher).now()
        )
    deadline = time.monotonic() + PATIENCE_SECONDS
    while await depth(own, DISPATCHER_DUE.name) < 4 and time.monotonic() < deadline:
        await asyncio.sleep(0.2)

    # Refused while something consumes the queue.
    connection = await aio_pika.connect(own.rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        consumed = await channel.declare_queue(SCHEDULER_INBOX.name, passive=True)
        tag = await consumed.consume(ignore)
        refused = await followups(own, "declare", "--migrate-queues")
        await consumed.cancel(tag)
    assert refused.exit_code == 1
    assert "stop the services first" in refused.output

    moved = await followups(own, "declare", "--migrate-queues")
    assert moved.exit_code == 0, moved.output
    assert f"moved {DISPATCHER_DUE.name}: redeclared, 4 message(s) kept" in moved.output
    assert "warning" not in moved.output

    async with management(own) as api:
        for work in WORK_QUEUES:
            info = await api.queue(work.name) or {}
            assert info["arguments"] == {"x-queue-type": "quorum"}
            assert await api.queue(f"{work.name}.moving") is None
        bindings = {b["routing_key"] for b in await api.bindings(SCHEDULER_INBOX.name)}
        assert set(SCHEDULER_INBOX.bindings) <= bindings
    kept = await take_all(own, DISPATCHER_DUE.name)
    assert sorted(m.body for m in kept) == [b"one", b"three", b"timer", b"two"]
    assert all(m.headers.get("x-fire-at") for m in kept)

    # A command published now reaches the new queue, and its policy holds.
    async with AmqpPublisher(own.rabbitmq_url, name="tests") as publisher:
        await publisher.publish(b"{}", exchange=PUBLIC_EXCHANGE, routing_key="followup.requested")
    assert await depth(own, SCHEDULER_INBOX.name) == 1
    again = await followups(own, "declare")
    assert "warning" not in again.output


async def test_an_interrupted_move_is_finished_by_the_next_run(own):
    """As a crash leaves it: the old queue deleted, its messages and bindings in the holding
    queue."""
    assert (await followups(own, "declare")).exit_code == 0
    holding = f"{DISPATCHER_DUE.name}.moving"
    connection = await aio_pika.connect(own.rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(DISPATCHER_DUE.name)
        kept = await channel.declare_queue(
            holding, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await kept.bind(
            "followups.timers.deliver", routing_key="*.*.*.*.*.*." + DISPATCHER_DUE.name
        )
    await publish(own, holding, b"kept")

    result = await followups(own, "declare")
    assert "did not finish" in result.output
    finished = await followups(own, "declare", "--migrate-queues")
    assert finished.exit_code == 0, finished.output
    assert f"moved {DISPATCHER_DUE.name}: redeclared, 1 message(s) kept" in finished.output
    assert [m.body for m in await take_all(own, DISPATCHER_DUE.name)] == [b"kept"]
    async with management(own) as api:
        assert await api.queue(holding) is None


async def test_declare_says_how_to_reach_the_management_api(own):
    result = await followups(
        own, "declare", RABBITMQ_MANAGEMENT_URL="http://guest:secret@127.0.0.1:1"
    )
    assert result.exit_code == 1
    assert "RABBITMQ_MANAGEMENT_URL" in result.output
    assert "secret" not in result.output


async def test_doctor_sees_missing_changed_and_earlier_release_queues(own):
    def policy_checks(output: str) -> list[dict[str, Any]]:
        return [c for c in json.loads(output) if c["name"] == "queue policies"]

    [missing] = policy_checks((await followups(own, "doctor", "--json")).output)
    assert missing["level"] == "FAIL"
    assert missing["fix"] == "run `followups declare`"

    await declare_like_an_earlier_release(own)
    assert (await followups(own, "declare")).exit_code == 0
    checks = json.loads((await followups(own, "doctor", "--json")).output)
    [applied] = [c for c in checks if c["name"] == "queue policies"]
    assert applied["level"] == "ok"
    assert "delivery limit 5" in applied["detail"]
    inbox = [c for c in checks if c["name"] == f"queue {SCHEDULER_INBOX.name}"]
    assert any("earlier release" in c["detail"] for c in inbox)

    [changed] = policy_checks((await followups(own, "doctor", "--json", DELIVERY_LIMIT="9")).output)
    assert changed["level"] == "warn"
    assert "followups.scheduler.inbox" in changed["detail"]
