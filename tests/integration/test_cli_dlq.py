"""`followups dlq` on the real broker: read without losing, replay what is valid, purge."""

from __future__ import annotations

import json

import aio_pika
import pytest

from shared.topology import DEAD_LETTER_EXCHANGE, DISPATCHER_DUE, SCHEDULER_INBOX
from tests.support.cli import followups


@pytest.fixture
async def channel(settings):
    connection = await aio_pika.connect(settings.rabbitmq_url)
    channel = await connection.channel()
    for name in (
        SCHEDULER_INBOX.name,
        SCHEDULER_INBOX.dead_letter_queue,
        DISPATCHER_DUE.name,
        DISPATCHER_DUE.dead_letter_queue,
    ):
        queue = await channel.declare_queue(name, passive=True)
        await queue.purge()
    yield channel
    await connection.close()


async def dead_letter(channel, dlq: str, body: dict, **headers) -> None:
    exchange = await channel.get_exchange(DEAD_LETTER_EXCHANGE)
    message = aio_pika.Message(
        json.dumps(body).encode(),
        headers=headers,
        content_type="application/json",
        message_id=f"m-{len(json.dumps(body))}",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )
    await exchange.publish(message, routing_key=dlq)


async def depth(channel, name: str) -> int:
    queue = await channel.declare_queue(name, passive=True)
    return queue.declaration_result.message_count


async def put_two_rejected_commands(channel) -> None:
    await dead_letter(
        channel,
        SCHEDULER_INBOX.dead_letter_queue,
        {"followup_id": 7, "reason": "duplicate"},
        **{
            "x-error-rule": "store_unavailable",
            "x-error-reason": "database down",
            "x-original-routing-key": "followup.cancel_requested",
            "x-trace-id": "t-1",
        },
    )
    await dead_letter(
        channel,
        SCHEDULER_INBOX.dead_letter_queue,
        {"contractor_id": "seven"},
        **{
            "x-error-rule": "schema",
            "x-error-reason": "contractor_id: not an integer",
            "x-original-routing-key": "followup.requested",
        },
    )


async def test_overview_lists_every_dead_letter_queue(settings, channel):
    await put_two_rejected_commands(channel)
    result = await followups(settings, "dlq", "list")
    assert result.exit_code == 0, result.output
    for name in ("followups.scheduler.inbox.dlq", "followups.dispatcher.due.dlq"):
        assert name in result.output
    assert await depth(channel, SCHEDULER_INBOX.dead_letter_queue) == 2


async def test_list_shows_reasons_and_keeps_every_message(settings, channel):
    await put_two_rejected_commands(channel)
    for _ in range(3):
        result = await followups(settings, "dlq", "list", "--queue", "scheduler")
        assert result.exit_code == 0, result.output
        assert await depth(channel, SCHEDULER_INBOX.dead_letter_queue) == 2
    assert "store_unavailable: database down" in result.output
    assert "schema: contractor_id: not an integer" in result.output
    assert "followup.cancel_requested" in result.output
    assert "2 message(s) in followups.scheduler.inbox.dlq" in result.output
    assert "seven" not in result.output  # bodies only with --body
    with_body = await followups(settings, "dlq", "list", "-q", "scheduler", "--body")
    assert "seven" in with_body.output


async def test_replay_republishes_valid_commands_and_keeps_the_rest(settings, channel):
    await put_two_rejected_commands(channel)

    dry = await followups(settings, "dlq", "replay", "--queue", "scheduler", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "would replay 1, kept 1" in dry.output
    assert await depth(channel, SCHEDULER_INBOX.dead_letter_queue) == 2
    assert await depth(channel, SCHEDULER_INBOX.name) == 0

    result = await followups(settings, "dlq", "replay", "--queue", "scheduler")
    assert result.exit_code == 0, result.output
    assert "replayed 1, kept 1" in result.output
    assert "kept 1: schema: contractor_id: Input should be a valid integer" in result.output
    assert await depth(channel, SCHEDULER_INBOX.dead_letter_queue) == 1

    inbox = await channel.declare_queue(SCHEDULER_INBOX.name, passive=True)
    replayed = await inbox.get(timeout=5)
    await replayed.ack()
    assert replayed.routing_key == "followup.cancel_requested"
    assert json.loads(replayed.body) == {"followup_id": 7, "reason": "duplicate"}
    # the quorum queue adds x-delivery-count on delivery; nothing of the dead-lettering is left
    assert {k: v for k, v in replayed.headers.items() if k != "x-delivery-count"} == {
        "x-trace-id": "t-1"
    }
    assert replayed.delivery_mode == aio_pika.DeliveryMode.PERSISTENT


async def test_replay_sends_timers_back_to_their_work_queue(settings, channel):
    timer = {
        "kind": "dispatch",
        "followup_id": 12,
        "version": 1,
        "fire_at": "2026-11-28T12:00:00+00:00",
    }
    death = {"reason": "delivery_limit", "queue": DISPATCHER_DUE.name, "count": 5}
    await dead_letter(channel, DISPATCHER_DUE.dead_letter_queue, timer, **{"x-death": [death]})

    listing = await followups(settings, "dlq", "list", "--queue", "dispatcher")
    assert "delivery_limit in followups.dispatcher.due" in listing.output
    result = await followups(settings, "dlq", "replay", "--queue", "dispatcher")
    assert "replayed 1, kept 0" in result.output

    due = await channel.declare_queue(DISPATCHER_DUE.name, passive=True)
    replayed = await due.get(timeout=5)
    await replayed.ack()
    assert json.loads(replayed.body) == timer
    assert "x-death" not in (replayed.headers or {})


async def test_purge_asks_first_and_empties_one_queue(settings, channel):
    await put_two_rejected_commands(channel)
    refused = await followups(settings, "dlq", "purge", "--queue", "scheduler", input="n\n")
    assert refused.exit_code == 1
    assert await depth(channel, SCHEDULER_INBOX.dead_letter_queue) == 2

    result = await followups(settings, "dlq", "purge", "--queue", "scheduler", "--yes")
    assert result.exit_code == 0, result.output
    assert "purged 2 message(s) from followups.scheduler.inbox.dlq" in result.output
    assert await depth(channel, SCHEDULER_INBOX.dead_letter_queue) == 0


async def test_unknown_queue_is_a_usage_error(settings):
    result = await followups(settings, "dlq", "list", "--queue", "mailer")
    assert result.exit_code == 2
    assert "followups.scheduler.inbox.dlq" in result.output
