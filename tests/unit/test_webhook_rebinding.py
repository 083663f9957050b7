"""The webhook's addresses are checked on every new connection: a name that resolved to a public
address at start and to a private one later (DNS rebinding) is refused, and the connection goes
to the address that was checked."""

from __future__ import annotations

from collections.abc import Iterable

import httpcore
import httpx
import pytest

from services.dispatcher.app import make_gateway
from services.dispatcher.gateway import WebhookGateway
from shared.settings import Settings
from shared.webhook_target import CheckedAddresses

PUBLIC = "93.184.215.14"


class Resolver:
    """Answers what the test says, as a DNS server under someone else's control might."""

    def __init__(self, *answers: list[str]) -> None:
        self.answers = list(answers)
        self.asked: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append((host, port))
        return self.answers.pop(0)


class Recorder(httpcore.AsyncNetworkBackend):
    """Connects nowhere: records where it was asked to connect, and fails as a refused port."""

    def __init__(self) -> None:
        self.connected_to: list[tuple[str, int]] = []

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        self.connected_to.append((host, port))
        raise httpcore.ConnectError("recorded")


async def test_a_name_rebound_to_a_private_address_is_refused_before_connecting():
    resolver, inner = Resolver([PUBLIC], ["10.0.0.7"]), Recorder()
    backend = CheckedAddresses(allow_insecure=False, resolve=resolver, inner=inner)
    with pytest.raises(httpcore.ConnectError, match="recorded"):
        await backend.connect_tcp("n8n.example.com", 443)
    with pytest.raises(httpcore.ConnectError, match="a private address"):
        await backend.connect_tcp("n8n.example.com", 443)
    # The first connection went to the address that was checked, not to the name.
    assert inner.connected_to == [(PUBLIC, 443)]
    assert resolver.asked == [("n8n.example.com", 443)] * 2


@pytest.mark.parametrize(
    "answer", [["127.0.0.1"], ["169.254.169.254"], [PUBLIC, "192.168.1.5"], ["::ffff:10.0.0.1"]]
)
async def test_one_refused_address_in_the_answer_refuses_the_connection(answer):
    inner = Recorder()
    backend = CheckedAddresses(allow_insecure=False, resolve=Resolver(answer), inner=inner)
    with pytest.raises(httpcore.ConnectError, match="webhook host resolves to"):
        await backend.connect_tcp("n8n.example.com", 443)
    assert inner.connected_to == []


async def test_each_checked_address_is_tried_in_turn():
    second = "2606:2800:21f:cb07:6820:80da:af6b:8b2c"
    inner = Recorder()
    backend = CheckedAddresses(
        allow_insecure=False, resolve=Resolver([PUBLIC, second]), inner=inner
    )
    with pytest.raises(httpcore.ConnectError):
        await backend.connect_tcp("n8n.example.com", 443)
    assert inner.connected_to == [(PUBLIC, 443), (second, 443)]


async def test_the_development_flag_lets_any_address_through():
    inner = Recorder()
    backend = CheckedAddresses(allow_insecure=True, resolve=Resolver(["127.0.0.1"]), inner=inner)
    with pytest.raises(httpcore.ConnectError, match="recorded"):
        await backend.connect_tcp("localhost", 5678)
    assert inner.connected_to == [("127.0.0.1", 5678)]


async def test_the_dispatchers_gateway_checks_every_connection():
    gateway = make_gateway(Settings(n8n_outbound_webhook_url="https://93.184.215.14/webhook/sms"))
    assert isinstance(gateway, WebhookGateway)
    try:
        pool = gateway._transport._pool
        assert isinstance(pool._network_backend, CheckedAddresses)
    finally:
        await gateway.aclose()
    assert isinstance(gateway._transport, httpx.AsyncHTTPTransport)
