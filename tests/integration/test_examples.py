"""The publishing examples of the README, run as a publisher would run them, against the real
broker: what they publish is taken from a queue bound to the public exchange and must pass the
services' own validation."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import aio_pika
import pytest

from shared.bus import AmqpPublisher, publish_event
from shared.schemas import FollowupRequested, LifecycleEvent, Status, parse_inbound
from shared.topology import PUBLIC_EXCHANGE, SCHEDULER_INBOX
from testbed.infra import broker_node, rabbitmqctl
from tests.support.npm import npm_install

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# The version the README tells a Node publisher to install.
AMQPLIB = "amqplib@2.3.1"


@pytest.fixture(scope="module")
def node_modules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """amqplib from the npm registry, in a folder of the test's own (never in the repo)."""
    if shutil.which("node") is None:
        pytest.fail("the Node example needs node on PATH (Debian: apt-get install nodejs)")
    return npm_install(tmp_path_factory.mktemp("npm"), AMQPLIB)


def _command(language: str, node_modules: Path | None) -> tuple[list[str], dict[str, str]]:
    if language == "python":
        return [sys.executable, str(EXAMPLES / "publish_followup.py")], {}
    assert node_modules is not None
    return ["node", str(EXAMPLES / "publish_followup.js")], {"NODE_PATH": str(node_modules)}


async def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    process = await asyncio.create_subprocess_exec(
        *argv,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return subprocess.CompletedProcess(argv, process.returncode, out.decode(), err.decode())


@pytest.fixture
async def command_queue(settings) -> AsyncIterator[aio_pika.abc.AbstractQueue]:
    """A queue of the test's own bound to the public exchange for `followup.requested`; the
    scheduler's inbox (declared, with no scheduler running) is emptied afterwards."""
    connection = await aio_pika.connect(settings.rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(PUBLIC_EXCHANGE, "followup.requested")
        yield queue
        inbox = await channel.declare_queue(SCHEDULER_INBOX.name, passive=True)
        await inbox.purge()


@pytest.fixture
def bare_vhost() -> Iterator[str]:
    """A vhost where nothing is declared: nobody listens, so a mandatory publish comes back."""
    name = f"followups_t_bare_{uuid.uuid4().hex[:10]}"
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield broker_node().vhost_url(name)
    finally:
        rabbitmqctl("delete_vhost", name)


@pytest.mark.parametrize("language", ["python", "node"])
async def test_the_example_publishes_a_request_the_scheduler_accepts(
    request, language, settings, command_queue
):
    node = request.getfixturevalue("node_modules") if language == "node" else None
    argv, env = _command(language, node)

    result = await _run([*argv, "7"], {**env, "RABBITMQ_URL": settings.rabbitmq_url})

    assert result.returncode == 0, result.stderr
    key = result.stdout.strip()
    message = await command_queue.get(timeout=5)
    await message.ack()
    assert message.routing_key == "followup.requested"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.content_type == "application/json"
    assert message.message_id == key
    parsed = parse_inbound(message.routing_key, message.body, message.content_type)
    assert isinstance(parsed, FollowupRequested)
    assert parsed.idempotency_key == key
    assert parsed.contractor_id == 7
    assert parsed.scheduled_time > datetime.now(UTC)
    # Every field of the command is spelled out, so a reader sees them all.
    assert set(json.loads(message.body)) == set(FollowupRequested.model_fields)


@pytest.mark.parametrize("language", ["python", "node"])
async def test_the_example_fails_loudly_when_nothing_would_receive_the_request(
    request, language, bare_vhost
):
    node = request.getfixturevalue("node_modules") if language == "node" else None
    argv, env = _command(language, node)

    result = await _run(argv, {**env, "RABBITMQ_URL": bare_vhost})

    assert result.returncode != 0
    assert "NO_ROUTE" in result.stderr or "routed the message nowhere" in result.stderr


async def _readline(stream: asyncio.StreamReader) -> dict[str, object]:
    line = await asyncio.wait_for(stream.readline(), timeout=30)
    assert line, "the watcher stopped without printing"
    value: dict[str, object] = json.loads(line)
    return value


async def test_the_watcher_prints_each_outcome_event_and_no_command(settings):
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLES / "watch_outcomes.py"),
        "--count",
        "1",
        env={**os.environ, "RABBITMQ_URL": settings.rabbitmq_url},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        assert "listening" in await _readline(process.stdout)
        sent = LifecycleEvent(
            event="followup.sent",
            followup_id=11,
            contractor_id=7,
            followup_type="check_in",
            status=Status.SENT,
            occurred_at=datetime.now(UTC),
        )
        async with AmqpPublisher(settings.rabbitmq_url, name="tests") as publisher:
            # A command on the same exchange first: the watcher must not take it for an event.
            await publisher.publish(
                b"{}", exchange=PUBLIC_EXCHANGE, routing_key="followup.cancel_requested"
            )
            await publish_event(publisher, sent)

        printed = await _readline(process.stdout)
        assert LifecycleEvent.model_validate(printed) == sent
        assert await asyncio.wait_for(process.wait(), timeout=30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        connection = await aio_pika.connect(settings.rabbitmq_url)
        async with connection:
            channel = await connection.channel()
            inbox = await channel.declare_queue(SCHEDULER_INBOX.name, passive=True)
            await inbox.purge()
