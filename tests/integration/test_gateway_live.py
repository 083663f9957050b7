"""The webhook gateway against a real HTTP server on loopback: what each kind of answer, or no
answer, becomes (sent, retry later, failed), and what the call carries."""

from __future__ import annotations

import json

from services.dispatcher.app import make_gateway
from services.dispatcher.gateway import GatewayResult, Outcome, WebhookGateway
from shared.settings import Settings
from testbed.loopback import free_port
from testbed.webhook import Reply, WebhookReceiver
from tests.support.data import sms


def gateway(url: str, timeout: float = 10.0) -> WebhookGateway:
    made = make_gateway(
        Settings(
            n8n_outbound_webhook_url=url,
            webhook_allow_insecure=True,
            webhook_timeout_seconds=timeout,
        )
    )
    assert isinstance(made, WebhookGateway)
    return made


async def _served(reply: Reply, **kw: float) -> tuple[WebhookReceiver, WebhookGateway]:
    receiver = WebhookReceiver(lambda _call, _previous: reply)
    await receiver.start()
    return receiver, gateway(receiver.url, **kw)


async def answer_to(reply: Reply, **kw: float) -> GatewayResult:
    """What one call becomes when the webhook answers with `reply`."""
    receiver, target = await _served(reply, **kw)
    try:
        return await target.send(sms())
    finally:
        await target.aclose()
        await receiver.stop()


async def test_a_2xx_is_sent_and_the_call_carries_the_contract_payload():
    receiver, target = await _served(Reply(200))
    try:
        first = await target.send(sms(1))
        second = await target.send(sms(2))
    finally:
        await target.aclose()
        await receiver.stop()
    assert (first.outcome, first.http_status) == (Outcome.SENT, 200)
    assert second.outcome is Outcome.SENT
    call = receiver.calls[0]
    assert call.headers["idempotency-key"] == sms(1).idempotency_key
    assert call.headers["content-type"] == "application/json"
    assert json.loads(call.body) == sms(1).payload()


async def test_a_503_with_retry_after_is_retried_after_that_long():
    result = await answer_to(Reply(503, headers={"Retry-After": "7"}))
    assert (result.outcome, result.http_status, result.retry_after) == (Outcome.RETRY, 503, 7.0)


async def test_a_400_fails_for_good():
    result = await answer_to(Reply(400))
    assert (result.outcome, result.reason) == (Outcome.FAILED, "http_400")


async def test_a_webhook_slower_than_the_timeout_is_retried():
    result = await answer_to(Reply(200, delay=2.0), timeout=0.3)
    assert (result.outcome, result.reason) == (Outcome.RETRY, "timeout")


async def test_nobody_listening_is_retried_as_a_connection_error():
    target = gateway(f"http://127.0.0.1:{free_port()}/webhook/sms")
    try:
        result = await target.send(sms())
    finally:
        await target.aclose()
    assert result.outcome is Outcome.RETRY
    assert result.reason.startswith("connection_error:")
