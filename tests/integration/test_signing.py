"""The dispatcher's webhook calls, as a receiver sees them on loopback: signed so that
`standardwebhooks.Webhook(secret).verify` accepts them, and never redirected."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from services.dispatcher.app import make_gateway
from services.dispatcher.gateway import Outcome, WebhookGateway
from shared.settings import Settings
from testbed.webhook import Call, Reply, WebhookReceiver
from tests.support.data import sms

SECRET = "whsec_" + base64.b64encode(b"followups-signing-key-for-tests-32b").decode()
OTHER_SECRET = "whsec_" + base64.b64encode(b"a-different-key-of-thirty-two-by").decode()


def verifying(secret: str):
    """A receiver that does what the README tells n8n to do: verify, else answer 401."""

    def reply(call: Call, _previous: list[Call]) -> Reply:
        try:
            Webhook(secret).verify(call.body, call.headers)
        except WebhookVerificationError:
            return Reply(401)
        return Reply(204)

    return reply


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    server = WebhookReceiver(verifying(SECRET))
    await server.start()
    yield server
    await server.stop()


def gateway_for(receiver: WebhookReceiver, secret: str | None) -> WebhookGateway:
    gateway = make_gateway(
        Settings(
            n8n_outbound_webhook_url=receiver.url,
            webhook_allow_insecure=True,
            webhook_signing_secret=secret,
        )
    )
    assert isinstance(gateway, WebhookGateway)
    return gateway


async def test_a_signed_call_verifies_with_the_shared_secret(receiver):
    gateway = gateway_for(receiver, SECRET)
    try:
        result = await gateway.send(sms())
    finally:
        await gateway.aclose()

    assert result.outcome is Outcome.SENT, result
    (call,) = receiver.calls
    headers = call.headers
    assert headers["webhook-id"] == headers["idempotency-key"] == sms().idempotency_key
    assert abs(int(headers["webhook-timestamp"]) - datetime.now(UTC).timestamp()) < 300
    version, signature = headers["webhook-signature"].split(",", 1)
    assert version == "v1"
    assert len(base64.b64decode(signature)) == 32  # HMAC-SHA256
    payload = Webhook(SECRET).verify(call.body, headers)
    assert payload["followup_id"] == 41
    assert payload["phone"] == "+14155552671"


async def test_the_verifier_refuses_a_tampered_body_an_old_timestamp_and_another_secret(receiver):
    gateway = gateway_for(receiver, SECRET)
    try:
        await gateway.send(sms())
    finally:
        await gateway.aclose()
    (call,) = receiver.calls
    verifier = Webhook(SECRET)

    tampered = json.loads(call.body) | {"phone": "+14155550000"}
    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        verifier.verify(json.dumps(tampered, separators=(",", ":")).encode(), call.headers)

    # A replay: the same body and id, signed correctly, but ten minutes ago.
    old = datetime.now(UTC) - timedelta(minutes=10)
    replayed = {
        **call.headers,
        "webhook-timestamp": str(int(old.timestamp())),
        "webhook-signature": Webhook(SECRET).sign(
            call.headers["webhook-id"], old, call.body.decode()
        ),
    }
    with pytest.raises(WebhookVerificationError, match="too old"):
        verifier.verify(call.body, replayed)

    with pytest.raises(WebhookVerificationError, match="No matching signature"):
        Webhook(OTHER_SECRET).verify(call.body, call.headers)

    unsigned = {k: v for k, v in call.headers.items() if not k.startswith("webhook-")}
    with pytest.raises(WebhookVerificationError, match="Missing required headers"):
        verifier.verify(call.body, unsigned)


async def test_a_receiver_with_another_secret_or_none_refuses_the_call(receiver):
    for secret in (OTHER_SECRET, None):
        gateway = gateway_for(receiver, secret)
        try:
            result = await gateway.send(sms())
        finally:
            await gateway.aclose()
        # 401 is a 4xx other than 408/429: failed at once, never retried.
        assert (result.outcome, result.http_status) == (Outcome.FAILED, 401)


@pytest.mark.parametrize("status", [302, 307])
async def test_a_redirect_from_the_target_is_not_followed(receiver, status):
    def redirect_first(call: Call, previous: list[Call]) -> Reply:
        elsewhere = f"http://127.0.0.1:{receiver.port}/elsewhere"
        return Reply(200) if previous else Reply(status, {"Location": elsewhere})

    receiver.responder = redirect_first
    gateway = gateway_for(receiver, SECRET)
    try:
        result = await gateway.send(sms())
    finally:
        await gateway.aclose()
    assert (result.outcome, result.reason) == (Outcome.FAILED, f"http_{status}")
    assert len(receiver.calls) == 1

    # Control: a client that follows redirects does reach the second URL, so the test can tell.
    receiver.calls.clear()
    async with httpx.AsyncClient(follow_redirects=True) as client:
        await client.post(receiver.url, content=b"{}")
    assert len(receiver.calls) + len(receiver.probes) == 2
