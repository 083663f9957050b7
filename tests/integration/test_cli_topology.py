"""The definitions file matches what the services declare, and `doctor` sees what is missing."""

from __future__ import annotations

import json

import aio_pika

from services.cli.definitions import definitions as export_definitions
from tests.support.cli import followups


async def test_definitions_declare_the_same_objects_as_the_services(settings):
    """Declaring with the file's arguments over what `declare_topology` made must not clash
    (RabbitMQ answers 406 to any difference)."""
    definitions = await export_definitions()
    connection = await aio_pika.connect(settings.rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        for exchange in definitions["exchanges"]:
            await channel.declare_exchange(
                exchange["name"],
                exchange["type"],
                durable=exchange["durable"],
                arguments=exchange["arguments"],
            )
        for queue in definitions["queues"]:
            await channel.declare_queue(
                queue["name"], durable=queue["durable"], arguments=queue["arguments"]
            )
    print(
        f"\ndefinitions: {len(definitions['exchanges'])} exchanges, "
        f"{len(definitions['queues'])} queues, {len(definitions['bindings'])} bindings"
    )


async def test_doctor_fails_without_consumers_and_says_how_to_fix_it(settings):
    result = await followups(settings, "doctor")
    assert result.exit_code == 1
    assert "start it: `followups run scheduler`" in result.output
    assert "backend levels (DELAY_BACKEND=levels, plugin absent)" in result.output
    assert "all applied" in result.output

    data = json.loads((await followups(settings, "doctor", "--json")).output)
    levels = {c["name"]: c["level"] for c in data}
    assert levels["database"] == levels["migrations"] == levels["broker"] == "ok"
    assert levels["timers"] == "ok"
    assert levels["queue followups.dispatcher.due"] == "FAIL"
    assert levels["webhook"] == "warn"


async def test_doctor_reports_an_unreachable_database_and_broker(settings):
    result = await followups(
        settings,
        "doctor",
        DATABASE_URL="postgresql://postgres@127.0.0.1:1/nowhere",
        RABBITMQ_URL="amqp://guest:secret@127.0.0.1:1/",
    )
    assert result.exit_code == 1
    assert "start PostgreSQL" in result.output
    assert "start RabbitMQ" in result.output
    assert "secret" not in result.output


async def test_doctor_checks_the_plugin_when_it_is_required(settings):
    result = await followups(settings, "doctor", "--json", DELAY_BACKEND="plugin")
    timers = next(c for c in json.loads(result.output) if c["name"] == "timers")
    assert timers["level"] == "FAIL"
    assert "DELAY_BACKEND=levels" in timers["fix"]
