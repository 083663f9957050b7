"""The webhook and OpenAI calls through a real forward proxy on loopback: HTTP_PROXY/HTTPS_PROXY
are honoured, NO_PROXY goes direct, and behind a proxy the webhook host is the proxy's to reach."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from services.dispatcher.app import make_gateway
from services.dispatcher.gateway import Outcome, WebhookGateway
from services.personalizer.app import make_writer
from services.personalizer.prompt import Prompt
from shared.errors import ConfigurationError
from shared.settings import Settings
from testbed.openai_server import API_KEY, OpenAIServer
from testbed.proxy import ForwardProxy
from testbed.webhook import Reply, WebhookReceiver
from tests.support.data import sms

# A public address written as a literal: the start-up check accepts it without DNS, and no
# connection is ever made to it (the proxy refuses the tunnel).
PUBLIC_TARGET = "https://93.184.216.34/webhook/sms"


@pytest.fixture
async def proxy() -> AsyncIterator[ForwardProxy]:
    server = ForwardProxy()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    server = WebhookReceiver(lambda _call, _previous: Reply(200))
    await server.start()
    yield server
    await server.stop()


def gateway(**settings: object) -> WebhookGateway:
    made = make_gateway(Settings(webhook_timeout_seconds=5, **settings))  # type: ignore[arg-type]
    assert isinstance(made, WebhookGateway)
    return made


async def test_a_development_target_is_called_through_http_proxy(proxy, receiver):
    target = gateway(
        n8n_outbound_webhook_url=receiver.url, webhook_allow_insecure=True, http_proxy=proxy.url
    )
    try:
        result = await target.send(sms(1))
    finally:
        await target.aclose()
    assert result.outcome is Outcome.SENT
    assert proxy.requests == [f"POST {receiver.url} HTTP/1.1"]
    assert receiver.calls[0].headers["idempotency-key"] == sms(1).idempotency_key


async def test_no_proxy_sends_the_call_directly(proxy, receiver):
    target = gateway(
        n8n_outbound_webhook_url=receiver.url,
        webhook_allow_insecure=True,
        http_proxy=proxy.url,
        no_proxy="localhost,127.0.0.1",
    )
    try:
        result = await target.send(sms(1))
    finally:
        await target.aclose()
    assert result.outcome is Outcome.SENT
    assert proxy.requests == []
    assert len(receiver.calls) == 1


async def test_an_https_target_is_tunnelled_and_a_refused_tunnel_is_retried(proxy):
    target = gateway(n8n_outbound_webhook_url=PUBLIC_TARGET, https_proxy=proxy.url)
    try:
        result = await target.send(sms(1))
    finally:
        await target.aclose()
    assert proxy.requests == ["CONNECT 93.184.216.34:443 HTTP/1.1"]
    assert result.outcome is Outcome.RETRY


def test_behind_a_proxy_a_private_target_is_still_refused_at_start(proxy):
    with pytest.raises(ConfigurationError, match="private address"):
        make_gateway(
            Settings(n8n_outbound_webhook_url="https://10.0.0.5/webhook", https_proxy=proxy.url)
        )


async def test_the_openai_calls_go_through_the_same_proxy_settings(proxy, llm: OpenAIServer):
    writer = make_writer(
        Settings(openai_api_key=API_KEY, openai_base_url=llm.base_url, http_proxy=proxy.url)
    )
    assert writer is not None
    try:
        draft = await writer.write(Prompt(system="rules", user="data"), budget=10)
    finally:
        await writer.aclose()
    assert (draft.failure, draft.attempts) == (None, 1)
    assert proxy.requests == [f"POST {llm.base_url}/chat/completions HTTP/1.1"]
