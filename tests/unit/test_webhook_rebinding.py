"""The webhook's addresses are checked on every new connection: a name that resolved to a public
address at start and to a private one later (DNS rebinding) is refused, and the connection goes
to the address that was checked."""

from __future__ import annotations

import socket

import pytest

from services.dispatcher.app import make_gateway
from services.dispatcher.gateway import WebhookGateway
from shared.settings import Settings
from shared.webhook_target import CheckedResolver, WebhookHostRefused

PUBLIC = "93.184.215.14"


class Resolver:
    """Answers what the test says, as a DNS server under someone else's control might."""

    def __init__(self, *answers: list[str]) -> None:
        self.answers = list(answers)
        self.asked: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append((host, port))
        return self.answers.pop(0)


def hosts(results) -> list[tuple[str, int]]:
    return [(result["host"], result["port"]) for result in results]


async def test_a_name_rebound_to_a_private_address_is_refused_before_connecting():
    resolver = Resolver([PUBLIC], ["10.0.0.7"])
    checked = CheckedResolver(allow_insecure=False, resolve=resolver)
    first = await checked.resolve("n8n.example.com", 443)
    with pytest.raises(WebhookHostRefused, match="a private address"):
        await checked.resolve("n8n.example.com", 443)
    # The pool connects to the address that was checked, never to the name.
    assert hosts(first) == [(PUBLIC, 443)]
    assert first[0]["hostname"] == "n8n.example.com"
    assert resolver.asked == [("n8n.example.com", 443)] * 2


@pytest.mark.parametrize(
    "answer", [["127.0.0.1"], ["169.254.169.254"], [PUBLIC, "192.168.1.5"], ["::ffff:10.0.0.1"]]
)
async def test_one_refused_address_in_the_answer_refuses_the_connection(answer):
    checked = CheckedResolver(allow_insecure=False, resolve=Resolver(answer))
    with pytest.raises(WebhookHostRefused, match="webhook host resolves to"):
        await checked.resolve("n8n.example.com", 443)


async def test_every_checked_address_is_handed_on_in_order_with_its_family():
    second = "2606:2800:21f:cb07:6820:80da:af6b:8b2c"
    checked = CheckedResolver(allow_insecure=False, resolve=Resolver([PUBLIC, second]))
    results = await checked.resolve("n8n.example.com.", 443)
    assert hosts(results) == [(PUBLIC, 443), (second, 443)]
    assert [r["family"] for r in results] == [socket.AF_INET, socket.AF_INET6]


async def test_a_name_that_does_not_resolve_is_refused_as_such():
    async def fails(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with pytest.raises(WebhookHostRefused, match="does not resolve"):
        await CheckedResolver(allow_insecure=False, resolve=fails).resolve("n8n.example.com")
    with pytest.raises(WebhookHostRefused, match="has no address"):
        await CheckedResolver(allow_insecure=False, resolve=Resolver([])).resolve("n8n.test")


async def test_the_development_flag_lets_any_address_through():
    checked = CheckedResolver(allow_insecure=True, resolve=Resolver(["127.0.0.1"]))
    assert hosts(await checked.resolve("localhost", 5678)) == [("127.0.0.1", 5678)]


async def test_the_dispatchers_gateway_checks_every_connection():
    gateway = make_gateway(Settings(n8n_outbound_webhook_url="https://93.184.215.14/webhook/sms"))
    assert isinstance(gateway, WebhookGateway)
    session = gateway._connect()
    try:
        connector = session.connector
        assert connector is not None
        assert isinstance(connector._resolver, CheckedResolver)
        assert connector.use_dns_cache is False
    finally:
        await session.close()
