"""The services' broker account in Kubernetes (k8s/base/rabbitmq-access.yaml) is enough for
everything they do in their vhost, and no more: a user with exactly those permission patterns
and tags runs `followups declare` (the topology, and the queue policies through the management
API), publishes a command and a dead-letter copy, reads a queue and follows events on a
server-named queue, and is refused a name outside the project's."""

from __future__ import annotations

import secrets
import uuid
from pathlib import Path
from urllib.parse import quote

import aio_pika
import aiormq.exceptions
import pytest
import yaml

from services.cli.declaring import declare_broker
from shared.bus import AmqpPublisher
from shared.settings import Settings
from shared.topology import PUBLIC_EXCHANGE, SCHEDULER_INBOX
from testbed.infra import rabbitmqctl

ROOT = Path(__file__).resolve().parents[2]


def access(kind: str) -> dict:
    docs = yaml.safe_load_all((ROOT / "k8s/base/rabbitmq-access.yaml").read_text())
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc["spec"]


def permission_patterns() -> dict[str, str]:
    return access("Permission")["permissions"]


@pytest.fixture
def restricted_url():
    vhost = f"followups_access_{uuid.uuid4().hex[:10]}"
    user = f"followups_access_{uuid.uuid4().hex[:10]}"
    # rabbitmqctl reads an argument that starts with '-' as an option, and a urlsafe token may.
    password = secrets.token_hex(24)
    patterns = permission_patterns()
    rabbitmqctl("add_vhost", vhost)
    try:
        rabbitmqctl("add_user", user, password)
        try:
            rabbitmqctl("set_user_tags", user, *access("User")["tags"])
            rabbitmqctl(
                "set_permissions",
                "-p",
                vhost,
                user,
                patterns["configure"],
                patterns["write"],
                patterns["read"],
            )
            yield f"amqp://{user}:{password}@127.0.0.1:5672/{quote(vhost, safe='')}"
        finally:
            rabbitmqctl("delete_user", user)
    finally:
        rabbitmqctl("delete_vhost", vhost)


async def test_the_services_account_does_all_they_do_in_their_vhost(restricted_url):
    declared = await declare_broker(Settings(rabbitmq_url=restricted_url, delay_backend="auto"))
    assert declared.policies
    async with AmqpPublisher(restricted_url, name="tests") as publisher:
        await publisher.publish(b"{}", exchange=PUBLIC_EXCHANGE, routing_key="followup.requested")
        await publisher.publish(b"{}", exchange="", routing_key=SCHEDULER_INBOX.dead_letter_queue)
    connection = await aio_pika.connect(restricted_url)
    async with connection:
        channel = await connection.channel()
        inbox = await channel.declare_queue(SCHEDULER_INBOX.name, passive=True)
        message = await inbox.get(no_ack=False, fail=True)
        await message.nack(requeue=True)
        dlq = await channel.declare_queue(SCHEDULER_INBOX.dead_letter_queue, passive=True)
        assert (await dlq.get(no_ack=True, fail=True)).body == b"{}"
        # `followups watch`: a server-named exclusive queue bound to the public exchange.
        watch = await channel.declare_queue(exclusive=True, auto_delete=True)
        assert watch.name.startswith("amq.gen-")
        await watch.bind(PUBLIC_EXCHANGE, routing_key="followup.#")
    connection = await aio_pika.connect(restricted_url)
    async with connection:
        channel = await connection.channel()
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await channel.declare_queue("elsewhere", durable=True)
    print(
        f"\nbackend {declared.backend}, policies {declared.policies}: declared, published and"
        f" consumed under {permission_patterns()}, tags {access('User')['tags']}"
    )
