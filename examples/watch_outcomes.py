"""Print the outcome of follow-ups as the system reports them: one JSON line per event.

    RABBITMQ_URL=amqp://guest:guest@127.0.0.1:5672/ python examples/watch_outcomes.py [QUEUE]

Without QUEUE it listens on a queue of its own that goes away with it (events published while
it is not running are not seen). A service that must not miss an outcome passes a durable queue
name of its own (not starting with `followups.`, which is the system's) and gets every event
published since its first run. `--count N` stops after N events.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os

import aio_pika

EXCHANGE = "followups"
# Bound one by one: `followup.*` would match the commands (followup.requested, ...) too.
EVENTS = (
    "followup.scheduled",
    "followup.sent",
    "followup.skipped",
    "followup.cancelled",
    "followup.failed",
    "followup.response_recorded",
    "followup.delivery_recorded",
    "followup.send_rate_changed",
)


async def watch(url: str, queue_name: str, count: int | None) -> None:
    connection = await aio_pika.connect_robust(url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=50)
        exchange = await channel.declare_exchange(
            EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        if queue_name:
            queue = await channel.declare_queue(
                queue_name, durable=True, arguments={"x-queue-type": "quorum"}
            )
        else:
            queue = await channel.declare_queue(exclusive=True)
        for routing_key in EVENTS:
            await queue.bind(exchange, routing_key=routing_key)
        print(json.dumps({"listening": queue.name}), flush=True)
        seen = 0
        async with queue.iterator() as messages:
            async for message in messages:
                async with message.process():
                    event = json.loads(message.body)
                    # followup_id, contractor_id, followup_type, status, occurred_at, and
                    # `reason` on skipped and failed; never a phone number or the text.
                    print(json.dumps(event), flush=True)
                seen += 1
                if count is not None and seen >= count:
                    return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("queue", nargs="?", default="", help="a durable queue of your own")
    parser.add_argument("--count", type=int, default=None, help="stop after this many events")
    args = parser.parse_args()
    url = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
    asyncio.run(watch(url, args.queue, args.count))


if __name__ == "__main__":
    main()
