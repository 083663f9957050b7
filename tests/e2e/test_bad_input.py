"""Bad input through the real services: each bad message is dead-lettered once with its rule, every
valid one around it is sent, and nothing reaches the webhook that shouldn't."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import httpx
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from prometheus_client.parser import text_string_to_metric_families

from shared.topology import PUBLIC_EXCHANGE, SCHEDULER_INBOX
from testbed.processes import ServiceProcess
from testbed.webhook import Reply
from tests.e2e.conftest import request_followup, soon, wait_for_final
from tests.support.data import add_action_item, add_contractor

MISSING_ID = 900_000_001
CASE_HEADER = "x-test-case"


@dataclass(frozen=True)
class Bad:
    case: str
    rule: str
    body: bytes
    routing_key: str = "followup.requested"
    content_type: str | None = "application/json"
    via_default_exchange: bool = False
    reason_mentions: str = ""


def request(contractor_id: int | str, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "contractor_id": contractor_id,
        "scheduled_time": soon(2).isoformat(),
        "followup_type": "check_in",
        "message_template": "Hi {first_name}, a quick check-in from {company_name}.",
    }
    body.update(changes)
    return body


def without(body: dict[str, Any], field: str) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != field}


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


def bad_messages(contractor_id: int, foreign_item: int) -> list[Bad]:
    now = datetime.now(UTC)
    return [
        Bad(
            "too_large",
            "too_large",
            encode(request(contractor_id, message_template="x" * 17_000)),
            reason_mentions="16384",
        ),
        Bad("truncated_json", "malformed_json", b'{"contractor_id": 1, "scheduled_'),
        Bad("json_array", "malformed_json", b"[1, 2, 3]", reason_mentions="JSON object"),
        Bad("not_utf8", "malformed_json", b'{"followup_type": "\xff\xfe"}'),
        Bad("deep_nesting", "malformed_json", b"[" * 5000),
        Bad("huge_integer", "malformed_json", b'{"contractor_id": ' + b"9" * 5000 + b"}"),
        Bad(
            "wrong_content_type",
            "content_type",
            encode(request(contractor_id)),
            content_type="text/plain",
            reason_mentions="application/json",
        ),
        Bad(
            "missing_contractor_id",
            "schema",
            encode(without(request(contractor_id), "contractor_id")),
            reason_mentions="contractor_id",
        ),
        Bad(
            "contractor_id_as_text",
            "schema",
            encode(request(str(contractor_id))),
            reason_mentions="contractor_id",
        ),
        Bad(
            "contractor_id_out_of_range",
            "schema",
            encode(request(2**63)),
            reason_mentions="contractor_id",
        ),
        Bad(
            "priority_out_of_range",
            "schema",
            encode(request(contractor_id, priority=10)),
            reason_mentions="priority",
        ),
        Bad(
            "naive_timestamp",
            "schema",
            encode(request(contractor_id, scheduled_time="2030-01-01T09:00:00")),
            reason_mentions="timezone",
        ),
        Bad(
            "timestamp_years_ago",
            "schema",
            encode(request(contractor_id, scheduled_time=(now - timedelta(days=800)).isoformat())),
            reason_mentions="year",
        ),
        Bad(
            "timestamp_decades_ahead",
            "schema",
            encode(request(contractor_id, scheduled_time="2999-01-01T00:00:00+00:00")),
            reason_mentions="ten years",
        ),
        Bad(
            "timestamp_as_epoch_seconds",
            "schema",
            encode(request(contractor_id, scheduled_time=int(now.timestamp()) + 60)),
            reason_mentions="RFC 3339",
        ),
        Bad(
            "nul_in_template",
            "unstorable_value",
            encode(request(contractor_id, message_template="Hi {first_name}\u0000")),
        ),
        Bad(
            "nan_in_hints",
            "unstorable_value",
            encode(request(contractor_id, ai_context_hints={"score": float("nan")})),
        ),
        Bad(
            "lone_surrogate_in_hints",
            "unstorable_value",
            encode(request(contractor_id, ai_context_hints={"note": "\ud800"})),
        ),
        Bad(
            "timestamp_not_a_time",
            "schema",
            encode(request(contractor_id, scheduled_time="tomorrow at noon")),
            reason_mentions="scheduled_time",
        ),
        Bad(
            "unknown_routing_key",
            "unknown_routing_key",
            encode(request(contractor_id)),
            routing_key=SCHEDULER_INBOX.name,
            via_default_exchange=True,
        ),
        Bad(
            "skip_without_action_item",
            "schema",
            encode(request(contractor_id, skip_if_completed=True)),
            reason_mentions="action_item_id",
        ),
        Bad(
            "recurring_without_interval",
            "schema",
            encode(request(contractor_id, is_recurring=True)),
            reason_mentions="recurrence_interval_days",
        ),
        Bad(
            "oversized_hints",
            "schema",
            encode(request(contractor_id, ai_context_hints={"notes": "y" * 5000})),
            reason_mentions="ai_context_hints",
        ),
        Bad(
            "cancel_without_reference",
            "schema",
            encode({"reason": "no longer needed"}),
            routing_key="followup.cancel_requested",
            reason_mentions="followup_id",
        ),
        Bad(
            "response_with_bad_phone",
            "schema",
            encode({"phone": "555-0100", "text": "yes"}),
            routing_key="followup.response_received",
            reason_mentions="phone",
        ),
        Bad(
            "response_with_unparseable_phone",
            "schema",
            encode({"phone": "+999123456", "text": "yes"}),
            routing_key="followup.response_received",
            reason_mentions="phone",
        ),
        Bad(
            "hints_nested_too_deep",
            "too_deep",
            encode(request(contractor_id, ai_context_hints=nested(40))),
            reason_mentions="32",
        ),
        Bad(
            "charset_not_utf8",
            "content_type",
            encode(request(contractor_id)),
            content_type="application/json; charset=iso-8859-1",
            reason_mentions="utf-8",
        ),
        Bad(
            "unknown_contractor",
            "unknown_reference",
            encode(request(MISSING_ID)),
            reason_mentions="contractor_id",
        ),
        Bad(
            "unknown_action_item",
            "unknown_reference",
            encode(
                request(
                    contractor_id,
                    action_item_id=MISSING_ID,
                    message_template="Hi {first_name}, about {action_item}.",
                )
            ),
            reason_mentions="action_item_id",
        ),
        Bad(
            "another_contractors_action_item",
            "unknown_reference",
            encode(
                request(
                    contractor_id,
                    action_item_id=foreign_item,
                    skip_if_completed=True,
                    message_template="Hi {first_name}, about {action_item}.",
                )
            ),
            reason_mentions="another contractor",
        ),
        Bad(
            "unknown_event",
            "unknown_reference",
            encode(request(contractor_id, event_id=MISSING_ID)),
            reason_mentions="event_id",
        ),
        Bad(
            "unknown_placeholder",
            "template",
            encode(request(contractor_id, message_template="Hi {nickname}!")),
            reason_mentions="{nickname}",
        ),
        Bad(
            "placeholder_without_its_source",
            "template",
            encode(request(contractor_id, message_template="About {action_item}.")),
            reason_mentions="action_item_id",
        ),
        Bad(
            "broken_template_syntax",
            "template",
            encode(request(contractor_id, message_template="Hi {first_name")),
        ),
    ]


@pytest.fixture
async def channel(settings) -> AsyncIterator[AbstractChannel]:
    connection = await aio_pika.connect(settings.rabbitmq_url)
    async with connection:
        yield await connection.channel()


async def publish(
    channel: AbstractChannel,
    bad: Bad | None,
    body: bytes | None = None,
    content_type: str = "application/json",
) -> None:
    message = aio_pika.Message(
        body if bad is None else bad.body,
        content_type=content_type if bad is None else bad.content_type,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        headers={CASE_HEADER: "valid" if bad is None else bad.case},
    )
    if bad is not None and bad.via_default_exchange:
        await channel.default_exchange.publish(message, routing_key=bad.routing_key)
        return
    exchange = await channel.get_exchange(PUBLIC_EXCHANGE, ensure=False)
    await exchange.publish(
        message, routing_key="followup.requested" if bad is None else bad.routing_key
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def drain_dead_letters(
    channel: AbstractChannel, expected: int, timeout: float = 30.0
) -> dict[str, list[AbstractIncomingMessage]]:
    queue = await channel.get_queue(SCHEDULER_INBOX.dead_letter_queue, ensure=False)
    found: dict[str, list[AbstractIncomingMessage]] = {}
    deadline = time.monotonic() + timeout
    while sum(len(v) for v in found.values()) < expected and time.monotonic() < deadline:
        message = await queue.get(no_ack=False, fail=False)
        if message is None:
            await asyncio.sleep(0.1)
            continue
        await message.ack()
        found.setdefault(_text((message.headers or {}).get(CASE_HEADER, "?")), []).append(message)
    # Anything else would be a second copy of a case: give it a moment to show up.
    await asyncio.sleep(1.0)
    while (message := await queue.get(no_ack=False, fail=False)) is not None:
        await message.ack()
        found.setdefault(_text((message.headers or {}).get(CASE_HEADER, "?")), []).append(message)
    return found


async def test_bad_messages_are_dead_lettered_with_their_rule_and_valid_ones_are_sent(
    pool, receiver, start_services, channel
):
    contractor = await add_contractor(pool)
    await add_action_item(pool, contractor)
    foreign_item = await add_action_item(pool, await add_contractor(pool, first_name="Alex"))
    dlq = await channel.get_queue(SCHEDULER_INBOX.dead_letter_queue, ensure=False)
    await dlq.purge()
    services = start_services()

    cases = bad_messages(contractor, foreign_item)
    valid = 0
    for i, bad in enumerate(cases):
        await publish(channel, None, encode(request(contractor, idempotency_key=f"before-{i}")))
        await publish(channel, bad)
        valid += 1
    dead = await drain_dead_letters(channel, len(cases))

    # The services are still there and still working after every bad message. A charset
    # parameter is fine as long as it says UTF-8, and a field this version doesn't know is
    # ignored (a publisher upgraded first), counted and logged once.
    for i in range(5):
        await publish(
            channel,
            None,
            encode(request(contractor, idempotency_key=f"after-{i}", send_via="carrier_pigeon")),
            content_type="application/json; charset=utf-8",
        )
        valid += 1
    rows = await wait_for_final(pool, valid)
    logs = services.logs()

    assert all(services[name].alive for name in ("scheduler", "personalizer", "dispatcher"))
    assert len(rows) == valid, logs[-4000:]
    assert {r["status"] for r in rows} == {"sent"}
    assert len(receiver.calls) == valid
    assert {c.json["contractor_id"] for c in receiver.calls} == {contractor}

    for case, copies in sorted(dead.items()):
        for copy in copies:
            headers = copy.headers or {}
            print(
                f"{case:30} {_text(headers.get('x-error-rule')):20} "
                f"{_text(headers.get('x-error-reason'))[:70]} "
                f"(delivery count {headers.get('x-delivery-count')})"
            )
    assert sorted(dead) == sorted(bad.case for bad in cases), f"unexpected: {dead.keys()}"
    for bad in cases:
        copies = dead[bad.case]
        assert len(copies) == 1, f"{bad.case}: {len(copies)} copies"
        headers = copies[0].headers or {}
        rule, reason = _text(headers.get("x-error-rule")), _text(headers.get("x-error-reason"))
        assert rule == bad.rule, f"{bad.case}: rule {rule!r}, reason {reason!r}"
        assert bad.reason_mentions in reason, f"{bad.case}: reason {reason!r}"
        assert headers.get("x-delivery-count", 0) == 0, f"{bad.case} was delivered again"
        assert "x-death" not in headers, f"{bad.case} was dead-lettered by the broker"
        assert copies[0].body == bad.body
    assert "message returned to the queue" not in logs
    assert logs.count("message rejected to the dead-letter queue") == len(cases)
    expected: dict[str, float] = {}
    for bad in cases:
        expected[bad.rule] = expected.get(bad.rule, 0) + 1
    assert await rejected_by_rule(services["scheduler"]) == expected
    assert logs.count("unknown field ignored") == 1
    unknown = await scheduler_samples(services["scheduler"], "followups_unknown_fields_total")
    assert unknown == {(("command", "followup.requested"), ("field", "send_via")): 5.0}


async def scheduler_samples(service: ServiceProcess, sample_name: str) -> dict[tuple, float]:
    """One metric's samples from the service's /metrics, by their labels."""
    port = next(
        json.loads(line)["port"]
        for line in service.log_text().splitlines()
        if "http endpoints listening" in line
    )
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == sample_name
    }


async def rejected_by_rule(service: ServiceProcess) -> dict[str, float]:
    """followups_rejected_total of the scheduler's inbox, by rule, from the service's /metrics."""
    port = next(
        json.loads(line)["port"]
        for line in service.log_text().splitlines()
        if "http endpoints listening" in line
    )
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    return {
        sample.labels["rule"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "followups_rejected"
        for sample in family.samples
        if sample.name == "followups_rejected_total"
        and sample.labels["queue"] == SCHEDULER_INBOX.name
    }


async def test_nothing_reaches_the_webhook_for_a_bad_phone_and_redirects_are_not_followed(
    pool, receiver, start_services, bus
):
    good = await add_contractor(pool, first_name="Good")
    no_phone = await add_contractor(pool, phone=None)
    bad_numbers = {
        await add_contractor(pool, phone=phone): phone
        for phone in (
            "+12005550100",
            "555-0100",
            "+1 415 555 CALL",
            "١٢٣٤٥٦٧٨٩٠",
            "1234567890123456",
        )
    }
    redirected = await add_contractor(pool, first_name="Redirected")

    def reply(call, _previous) -> Reply:
        if call.json.get("contractor_id") == redirected:
            return Reply(302, {"Location": f"http://127.0.0.1:{receiver.port}/elsewhere"})
        return Reply(200)

    receiver.responder = reply
    services = start_services()
    contractors = [good, no_phone, *bad_numbers, redirected]
    for contractor in contractors:
        await request_followup(bus, contractor, soon(1.5), idempotency_key=f"phone-{contractor}")

    rows = {r["contractor_id"]: r for r in await wait_for_final(pool, len(contractors))}
    assert len(rows) == len(contractors), services.logs()[-4000:]
    assert rows[good]["status"] == "sent"
    for contractor in (no_phone, *bad_numbers):
        row = rows[contractor]
        print(f"contractor {contractor}: {row['status']} {row['status_reason']}")
        assert row["status"] == "failed"
        assert row["status_reason"].startswith("invalid_phone: ")
    assert "missing" in rows[no_phone]["status_reason"]
    assert rows[redirected]["status"] == "failed"
    assert rows[redirected]["status_reason"] == "http_302"

    # One call each for the two good numbers; a followed redirect would have made a third.
    assert len(receiver.calls) == 2
    assert sorted(c.json["contractor_id"] for c in receiver.calls) == sorted([good, redirected])
    assert all(c.json["phone"] == "+14155552671" for c in receiver.calls)
    for phone in bad_numbers.values():
        digits = "".join(ch for ch in phone if ch.isdigit())
        assert digits not in services.logs()
