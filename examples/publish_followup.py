"""Publish one `followup.requested`, as a service that wants an SMS sent would.

    pip install aio-pika
    RABBITMQ_URL=amqp://guest:guest@127.0.0.1:5672/ python examples/publish_followup.py 42

Prints the idempotency key it used. Publishing the same key again never creates a second
follow-up, so a publisher that is unsure whether its publish went through simply sends it again.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from datetime import UTC, datetime, timedelta

import aio_pika

EXCHANGE = "followups"


def request_body(contractor_id: int, idempotency_key: str) -> dict[str, object]:
    due = datetime.now(UTC) + timedelta(minutes=10)
    return {
        "idempotency_key": idempotency_key,
        "contractor_id": contractor_id,
        "scheduled_time": due.isoformat(),  # RFC 3339 with an offset: "+00:00"
        "followup_type": "check_in",
        "message_template": "Hi {first_name}, checking in on your plans at {company_name}.",
        "message_tone": "friendly",
        "action_item_id": None,
        "event_id": None,
        "ai_should_personalize": False,
        "ai_context_hints": {},
        "skip_if_completed": False,
        "is_recurring": False,
        "recurrence_interval_days": None,
        "priority": 0,
        "requested_by": "example-publisher",
    }


async def publish(url: str, contractor_id: int) -> str:
    key = f"example-{uuid.uuid4()}"
    connection = await aio_pika.connect_robust(url)
    async with connection:
        # Confirms: `publish` returns once the broker has the message on disk. A message that no
        # queue is bound for comes back (mandatory) and raises instead of vanishing.
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.declare_exchange(
            EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        message = aio_pika.Message(
            json.dumps(request_body(contractor_id, key)).encode(),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=key,
        )
        await exchange.publish(message, routing_key="followup.requested", mandatory=True)
    return key


def main() -> None:
    url = os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
    contractor_id = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    print(asyncio.run(publish(url, contractor_id)))


if __name__ == "__main__":
    main()
