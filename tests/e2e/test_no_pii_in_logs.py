"""Follow-ups of every kind through the services at DEBUG: no log line and no dead-letter header
carries a phone number, a message text, hints or a contractor's reply."""

from __future__ import annotations

import asyncio
import json
import time

import aio_pika

from shared.topology import PUBLIC_EXCHANGE, WORK_QUEUES
from testbed.webhook import Call, Reply
from tests.e2e.conftest import request_followup, soon, wait_for_final
from tests.support.data import add_contractor

# Distinctive values, so that any appearance in the output is a leak and not a coincidence.
PHONES = {
    "sent": "+12125550199",  # E.164, so that a reply by phone finds the contractor
    "refused_by_gateway": "+1 646 555 0142",
    "retried": "718.555.0163",
    "invalid": "+1 200 555 0117",
}
TEMPLATE = "Hi {first_name}, the Quillfeather permit is ready at {company_name}."
HINTS = {"note": "prefers mornings; dog named Bramblewick"}
REPLY = "Thanks, Ottoline here, call me after lunch"
SECRET_WORDS = ("Quillfeather", "Bramblewick", "Ottoline", "Zephyrine", "Hollowmere")


def phone_forms(raw: str) -> set[str]:
    digits = "".join(c for c in raw if c.isdigit())
    national = digits[1:] if digits.startswith("1") and len(digits) == 11 else digits
    return {raw, digits, national, f"+{digits}", f"+1{national}"}


async def test_no_personal_data_in_debug_logs_or_dead_letter_headers(
    pool, bus, receiver, start_services, settings
):
    contractors = {
        case: await add_contractor(
            pool, phone=phone, first_name="Zephyrine", company_name="Hollowmere Roofing"
        )
        for case, phone in PHONES.items()
    }
    gateway_calls: dict[int, int] = {}

    def reply(call: Call, _previous: list[Call]) -> Reply:
        contractor = call.json["contractor_id"]
        gateway_calls[contractor] = gateway_calls.get(contractor, 0) + 1
        if contractor == contractors["refused_by_gateway"]:
            return Reply(400)
        if contractor == contractors["retried"] and gateway_calls[contractor] == 1:
            return Reply(503, {"Retry-After": "1"})
        return Reply(200)

    receiver.responder = reply
    services = start_services(LOG_LEVEL="DEBUG", DISPATCH_MAX_ATTEMPTS="3")

    for case, contractor in contractors.items():
        await request_followup(
            bus,
            contractor,
            soon(1.5),
            idempotency_key=f"pii-{case}",
            message_template=TEMPLATE,
            ai_should_personalize=True,
            ai_context_hints=HINTS,
        )
    # Cancelled: its timers still fire, and are dropped as stale (logged at DEBUG).
    await request_followup(
        bus, contractors["sent"], soon(1.5), idempotency_key="pii-cancelled", ai_context_hints=HINTS
    )
    await _row_exists(pool, "key:pii-cancelled")
    await bus.publish(
        json.dumps(
            {"idempotency_key": "pii-cancelled", "reason": "asked by phone, +1 212 555 0199"}
        ).encode(),
        exchange=PUBLIC_EXCHANGE,
        routing_key="followup.cancel_requested",
        mandatory=False,
    )
    # Rejected at the edge, with the text and a phone number inside.
    await bus.publish(
        json.dumps(
            {
                "contractor_id": contractors["sent"],
                "scheduled_time": soon(1).isoformat(),
                "followup_type": "check_in",
                "message_template": TEMPLATE + " Call 212-555-0199 \u0000",
                "ai_context_hints": HINTS,
            }
        ).encode(),
        exchange=PUBLIC_EXCHANGE,
        routing_key="followup.requested",
        mandatory=False,
    )
    await bus.publish(
        json.dumps({"phone": "+12125550199", "text": REPLY + " \u0000"}).encode(),
        exchange=PUBLIC_EXCHANGE,
        routing_key="followup.response_received",
        mandatory=False,
    )

    finals = await wait_for_final(pool, len(contractors) + 1)
    assert len(finals) == len(contractors) + 1, services.logs()[-3000:]
    rows = {r["idempotency_key"]: r for r in finals}
    assert rows["key:pii-cancelled"]["status"] == "cancelled"
    rows = {r["contractor_id"]: r for r in finals if r["status"] != "cancelled"}
    assert rows[contractors["sent"]]["status"] == "sent"
    assert rows[contractors["retried"]]["status"] == "sent"
    assert rows[contractors["refused_by_gateway"]]["status"] == "failed"
    assert rows[contractors["invalid"]]["status"] == "failed"

    # A reply recorded on a sent follow-up goes through the scheduler as well.
    await bus.publish(
        json.dumps({"phone": "+12125550199", "text": REPLY}).encode(),
        exchange=PUBLIC_EXCHANGE,
        routing_key="followup.response_received",
        mandatory=False,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        text = await pool.fetchval(
            "SELECT response_text FROM contractor_followup_schedules"
            " WHERE contractor_id = $1 AND status = 'sent'",
            contractors["sent"],
        )
        if text:
            break
        await asyncio.sleep(0.2)
    assert text == REPLY

    sent_messages = {c.json["message"] for c in receiver.calls}
    assert any("Quillfeather" in m for m in sent_messages)
    logs = services.logs()
    headers = await _dead_letter_headers(settings.rabbitmq_url)
    print(f"\nscanned {len(logs.splitlines())} log lines, {len(headers)} dead-letter headers")
    # Debug lines show up once the cancelled follow-up's timers are dropped as stale.
    deadline = time.monotonic() + 10
    while '"level": "debug"' not in logs and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        logs = services.logs()
    assert '"level": "debug"' in logs
    assert any(h.startswith("x-error-rule=") for h in headers)

    forbidden = {
        *(form for phone in PHONES.values() for form in phone_forms(phone)),
        *sent_messages,
        *SECRET_WORDS,
        REPLY,
        HINTS["note"],
    }
    for where, text in (("service logs", logs), ("dead-letter headers", "\n".join(headers))):
        leaks = sorted(word for word in forbidden if word in text)
        assert not leaks, f"{where} contain {leaks}"


async def _row_exists(pool, stored_key: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if await pool.fetchval(
            "SELECT 1 FROM contractor_followup_schedules WHERE idempotency_key = $1", stored_key
        ):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{stored_key} was never scheduled")


async def _dead_letter_headers(url: str) -> list[str]:
    """Every header of every message parked in a dead-letter queue, as `name=value` text."""
    found: list[str] = []
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        for work in WORK_QUEUES:
            queue = await channel.get_queue(work.dead_letter_queue, ensure=False)
            while (message := await queue.get(no_ack=False, fail=False)) is not None:
                found.extend(f"{name}={value!r}" for name, value in (message.headers or {}).items())
                await message.ack()
    return found
