"""The n8n gateway's code nodes, run under node as n8n runs them, on calls signed by the
dispatcher's own gateway; its claim queries on the real PostgreSQL, concurrent duplicates
included; and the delivery report it builds, read by the project's own schema."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from standardwebhooks import Webhook

from deploy.n8n.twilio_standin import twilio_signature
from deploy.n8n.workflow import CLAIM_SQL, MARK_SENT_SQL, SCHEMA_FILE, SETTLE_SQL
from services.dispatcher.app import make_gateway
from services.dispatcher.gateway import Outcome, WebhookGateway
from shared.schemas import DeliveryReported, DeliveryStatus, parse_inbound
from shared.settings import Settings
from testbed.infra import Infra
from testbed.webhook import Call, WebhookReceiver
from tests.support.data import sms
from tests.support.n8n_code import CodeNodeError, item, run_code_node

SECRET = "whsec_" + base64.b64encode(b"followups-signing-key-for-tests-32b").decode()
OLD_SECRET = "whsec_" + base64.b64encode(b"a-different-key-of-thirty-two-by").decode()
AUTH_TOKEN = "twilio-auth-token-for-the-tests"
CALLBACK_BASE = "https://n8n.example.com/webhook/followups-sms-status"
ENV = {
    "FOLLOWUPS_WEBHOOK_SECRET": SECRET,
    "FOLLOWUPS_TWILIO_AUTH_TOKEN": AUTH_TOKEN,
    "FOLLOWUPS_STATUS_CALLBACK_URL": CALLBACK_BASE,
}


async def signed_call(secret: str = SECRET, message: str | None = None) -> Call:
    """One webhook call exactly as the dispatcher makes it, caught by a loopback receiver."""
    receiver = WebhookReceiver()
    await receiver.start()
    request = sms() if message is None else replace(sms(), message=message)
    gateway = make_gateway(
        Settings(
            n8n_outbound_webhook_url=receiver.url,
            webhook_allow_insecure=True,
            webhook_signing_secret=secret,
        )
    )
    assert isinstance(gateway, WebhookGateway)
    try:
        result = await gateway.send(request)
    finally:
        await gateway.aclose()
        await receiver.stop()
    assert result.outcome is Outcome.SENT
    (call,) = receiver.calls
    return call


def verify(call_headers: dict[str, str], body: bytes, env: dict[str, str] = ENV) -> dict[str, Any]:
    parsed = json.loads(body) if body else {}
    webhook_item = item({"headers": call_headers, "body": parsed}, raw_body=body)
    (verdict,) = run_code_node("verify_webhook.js", [webhook_item], env)
    return verdict


async def test_a_call_signed_by_the_dispatcher_is_accepted():
    call = await signed_call(message="Hi Zoë, it's 20% off — reply STOP to end")
    verdict = verify(call.headers, call.body)
    assert verdict == {
        "accepted": True,
        "idempotency_key": sms().idempotency_key,
        "followup_id": 41,
        "phone": "+14155552671",
        "message": "Hi Zoë, it's 20% off — reply STOP to end",
    }
    # The dispatcher escapes non-ASCII text: only the raw bytes carry the signature.
    assert b"\\u00eb" in call.body


async def test_a_tampered_body_another_secret_and_no_signature_are_refused():
    call = await signed_call()
    tampered = json.loads(call.body) | {"phone": "+14155550000"}
    body = json.dumps(tampered, separators=(",", ":")).encode()
    assert verify(call.headers, body) == {
        "accepted": False,
        "status": 401,
        "answer": {"error": "bad_signature"},
    }

    other = await signed_call(secret=OLD_SECRET)
    assert verify(other.headers, other.body)["answer"] == {"error": "bad_signature"}

    unsigned = {k: v for k, v in call.headers.items() if not k.startswith("webhook-")}
    verdict = verify(unsigned, call.body)
    assert (verdict["status"], verdict["answer"]["error"][:8]) == (401, "unsigned")


async def test_a_replay_signed_ten_minutes_ago_is_refused():
    call = await signed_call()
    old = datetime.now(UTC) - timedelta(minutes=10)
    replayed = {
        **call.headers,
        "webhook-timestamp": str(int(old.timestamp())),
        "webhook-signature": Webhook(SECRET).sign(
            call.headers["webhook-id"], old, call.body.decode()
        ),
    }
    verdict = verify(replayed, call.body)
    assert (verdict["status"], verdict["answer"]["error"][:15]) == (401, "stale_timestamp")

    # Within the five minutes it is the signature that counts.
    recent = datetime.now(UTC) - timedelta(minutes=4)
    resigned = replayed | {
        "webhook-timestamp": str(int(recent.timestamp())),
        "webhook-signature": Webhook(SECRET).sign(
            call.headers["webhook-id"], recent, call.body.decode()
        ),
    }
    assert verify(resigned, call.body)["accepted"] is True


async def test_the_dedupe_key_must_be_the_signed_webhook_id():
    call = await signed_call()
    swapped = call.headers | {"idempotency-key": str(uuid.uuid4())}
    verdict = verify(swapped, call.body)
    assert (verdict["status"], verdict["accepted"]) == (400, False)


async def test_two_secrets_accept_a_call_signed_with_either_during_a_rotation():
    rotating = ENV | {"FOLLOWUPS_WEBHOOK_SECRET": f"{OLD_SECRET} {SECRET}"}
    for secret in (SECRET, OLD_SECRET):
        call = await signed_call(secret=secret)
        assert verify(call.headers, call.body, rotating)["accepted"] is True


async def test_a_missing_secret_or_crypto_module_stops_the_node():
    call = await signed_call()
    webhook_item = item({"headers": call.headers, "body": call.json}, raw_body=call.body)
    with pytest.raises(CodeNodeError, match="FOLLOWUPS_WEBHOOK_SECRET is unset"):
        run_code_node("verify_webhook.js", [webhook_item], {})
    with pytest.raises(CodeNodeError, match="crypto"):
        run_code_node("verify_webhook.js", [webhook_item], ENV, allow=())


# The claim, as the workflow's Postgres nodes run it.


@pytest.fixture(scope="module")
async def gateway_db(infra: Infra) -> AsyncIterator[asyncpg.Pool]:
    """The key table in the session's test database; each test uses keys of its own."""
    pool = await asyncpg.create_pool(infra.database_url, min_size=1, max_size=12)
    await pool.execute(SCHEMA_FILE.read_text())
    yield pool
    await pool.close()


def verified(key: str) -> list[dict[str, Any]]:
    return [item({"accepted": True, "idempotency_key": key, "phone": "+14155552671",
                  "message": "Hi Sam", "followup_id": 41})]  # fmt: skip


async def claim(pool: asyncpg.Pool, key: str) -> dict[str, Any]:
    row = await pool.fetchrow(CLAIM_SQL, key)
    assert row is not None
    (routed,) = run_code_node(
        "route_claim.js",
        [item(dict(row))],
        ENV,
        nodes={"Verify signature": verified(key)},
    )
    return routed


async def test_the_first_claim_sends_with_the_key_in_the_status_callback(gateway_db):
    key = str(uuid.uuid4())
    routed = await claim(gateway_db, key)
    assert routed == {
        "action": "send",
        "idempotency_key": key,
        "phone": "+14155552671",
        "message": "Hi Sam",
        "status_callback": f"{CALLBACK_BASE}?key={key}",
    }
    # While the first call is at Twilio, a repeat waits; once sent, it is answered sent.
    busy = await claim(gateway_db, key)
    assert (busy["action"], busy["status"], busy["retry_after"]) == ("answer", 503, "30")
    await gateway_db.execute(MARK_SENT_SQL, key, "SM" + "1" * 32)
    assert await claim(gateway_db, key) == {
        "action": "answer",
        "status": 200,
        "answer": {"outcome": "duplicate"},
    }
    assert (
        await gateway_db.fetchval(
            "SELECT message_sid FROM followups_gateway_sends WHERE idempotency_key = $1", key
        )
        == "SM" + "1" * 32
    )


async def test_a_released_claim_sends_again_and_an_unknown_one_never(gateway_db):
    released, unknown = str(uuid.uuid4()), str(uuid.uuid4())
    for key, settle in ((released, "release"), (unknown, "unknown")):
        assert (await claim(gateway_db, key))["action"] == "send"
        await gateway_db.execute(SETTLE_SQL, key, settle)
    assert (await claim(gateway_db, released))["action"] == "send"
    refused = await claim(gateway_db, unknown)
    assert (refused["status"], refused["answer"]) == (409, {"error": "outcome_unknown"})


async def test_concurrent_duplicates_claim_once(gateway_db):
    key = str(uuid.uuid4())
    rows = await asyncio.gather(*(gateway_db.fetchrow(CLAIM_SQL, key) for _ in range(12)))
    claims = sorted(row["claim"] for row in rows)
    assert claims.count("claimed") == 1
    assert set(claims) - {"claimed"} <= {"sending", "contended"}


async def test_the_claim_route_needs_the_callback_url():
    with pytest.raises(CodeNodeError, match="FOLLOWUPS_STATUS_CALLBACK_URL"):
        run_code_node(
            "route_claim.js",
            [item({"claim": "claimed"})],
            {k: v for k, v in ENV.items() if k != "FOLLOWUPS_STATUS_CALLBACK_URL"},
            nodes={"Verify signature": verified(str(uuid.uuid4()))},
        )


# What the Twilio node's error output means. The messages are n8n-workflow's NodeApiError
# texts for an HTTP status, or for a network error code.


@pytest.mark.parametrize(
    ("message", "settle", "status"),
    [
        ("The service is receiving too many requests from you", "release", 429),
        ("Bad request - please check your parameters", "release", 422),
        ("Your request is invalid or could not be processed by the service", "release", 422),
        ("Authorization failed - please check your credentials", "release", 502),
        ("The resource you are requesting could not be found", "release", 502),
        ("Service unavailable - try again later", "release", 503),
        ("The service refused the connection - perhaps it is offline", "release", 503),
        ("The connection timed out, consider setting the 'Retry on Fail' option", "unknown", 502),
        ("The connection to the server was closed unexpectedly", "unknown", 502),
        ("Gateway timed out - perhaps try again later?", "unknown", 502),
        ("something n8n has not said before", "unknown", 502),
    ],
)  # fmt: skip
def test_a_refusal_releases_the_key_only_when_twilio_cannot_have_sent(message, settle, status):
    key = str(uuid.uuid4())
    (refusal,) = run_code_node(
        "provider_refusal.js",
        [item({"error": message})],
        ENV,
        nodes={"Verify signature": verified(key)},
    )
    assert (refusal["settle"], refusal["status"], refusal["idempotency_key"]) == (
        settle,
        status,
        key,
    )
    assert refusal["retry_after"] == ("60" if status == 429 else "")


# The status callback.


def test_the_signature_matches_twilios_documented_example():
    form = {
        "CallSid": "CA1234567890ABCDE",
        "Caller": "+14158675309",
        "Digits": "1234",
        "From": "+14158675309",
        "To": "+18005551212",
    }
    url = "https://mycompany.com/myapp.php?foo=1&bar=2"
    assert twilio_signature("12345", url, form) == "RSOYDt4T1cUTdK1PDd93/VVr8B8="


def status_callback(
    key: str, form: dict[str, str], token: str = AUTH_TOKEN, url_key: str | None = None
) -> dict[str, Any]:
    url = f"{CALLBACK_BASE}?key={url_key or key}"
    headers = {"x-twilio-signature": twilio_signature(token, url, form)}
    webhook_item = item({"headers": headers, "query": {"key": key}, "body": form})
    (routed,) = run_code_node("status_callback.js", [webhook_item], ENV)
    return routed


def twilio_form(status: str, error_code: str | None = None) -> dict[str, str]:
    form = {
        "AccountSid": "AC" + "0" * 32,
        "ApiVersion": "2010-04-01",
        "From": "+15005550006",
        "MessageSid": "SM" + "2" * 32,
        "MessageStatus": status,
        "SmsSid": "SM" + "2" * 32,
        "SmsStatus": status,
        "To": "+14155552671",
    }
    return form | ({"ErrorCode": error_code} if error_code else {})


def as_command(report: dict[str, Any]) -> DeliveryReported:
    command = parse_inbound(
        "followup.delivery_reported", json.dumps(report).encode(), "application/json"
    )
    assert isinstance(command, DeliveryReported)
    return command


def test_an_undelivered_callback_becomes_a_report_the_schema_accepts():
    key = sms().idempotency_key
    routed = status_callback(key, twilio_form("undelivered", "30007"))
    assert (routed["action"], routed["status"]) == ("publish", 204)
    command = as_command(routed["report"])
    assert command.idempotency_key == key
    assert command.status is DeliveryStatus.UNDELIVERED
    assert (command.error_code, command.provider) == ("30007", "twilio")
    assert abs((datetime.now(UTC) - command.reported_at).total_seconds()) < 60
    # Never the phone number: the report names the occurrence by its key.
    assert "+14155552671" not in json.dumps(routed["report"])


@pytest.mark.parametrize(
    ("twilio_status", "status"),
    [
        ("delivered", DeliveryStatus.DELIVERED),
        ("read", DeliveryStatus.DELIVERED),
        ("undelivered", DeliveryStatus.UNDELIVERED),
        ("partially_delivered", DeliveryStatus.UNDELIVERED),
        ("failed", DeliveryStatus.FAILED),
        ("canceled", DeliveryStatus.FAILED),
    ],
)
def test_each_final_twilio_status_maps_to_a_delivery_status(twilio_status, status):
    routed = status_callback(sms().idempotency_key, twilio_form(twilio_status))
    command = as_command(routed["report"])
    assert command.status is status
    assert command.error_code is None


@pytest.mark.parametrize("twilio_status", ["queued", "sending", "sent", "accepted", "scheduled"])
def test_a_status_on_the_way_reports_nothing(twilio_status):
    routed = status_callback(sms().idempotency_key, twilio_form(twilio_status))
    assert routed == {"action": "ignore", "status": 204}


def test_a_callback_not_signed_by_twilio_for_this_key_is_refused():
    key = sms().idempotency_key
    refused = {"action": "refuse", "status": 403}
    assert status_callback(key, twilio_form("delivered"), token="another-token") == refused
    # Signed for another key: the key in the URL is part of what Twilio signs.
    assert status_callback(key, twilio_form("delivered"), url_key=str(uuid.uuid4())) == refused
    assert status_callback("not a key", twilio_form("delivered")) == refused
