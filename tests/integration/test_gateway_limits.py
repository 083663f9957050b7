"""The webhook gateway against loopback servers that misbehave: a body without end is cut off at
the cap, and the address check runs on every new connection, not only at start."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from functools import partial

from services.dispatcher.app import make_gateway
from services.dispatcher.gateway import MAX_RESPONSE_BYTES, Outcome, WebhookGateway
from shared.settings import Settings
from shared.webhook_target import CheckedResolver, webhook_session
from testbed.webhook import Reply, WebhookReceiver
from tests.support.data import sms

CHUNK = b"x" * 65536
# Enough that reading it all would show, small enough that the old behaviour still ends.
BODY_LIMIT = 256 * 1024 * 1024


@dataclass
class EndlessBody:
    """Answers every request with 200 and a chunked body of up to BODY_LIMIT bytes, counting
    what it managed to write before the client hung up."""

    written: int = 0
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/webhook/sms"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            while self.written < BODY_LIMIT:
                writer.write(b"%x\r\n%s\r\n" % (len(CHUNK), CHUNK))
                await writer.drain()
                self.written += len(CHUNK)
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.finished.set()
            writer.close()


def gateway(url: str, *, allow_insecure: bool = True) -> WebhookGateway:
    made = make_gateway(
        Settings(n8n_outbound_webhook_url=url, webhook_allow_insecure=allow_insecure)
    )
    assert isinstance(made, WebhookGateway)
    return made


async def test_a_body_without_end_is_cut_off_and_the_status_decides():
    server = EndlessBody()
    await server.start()
    target = gateway(server.url)
    try:
        result = await target.send(sms())
        await server.finished.wait()
    finally:
        await target.aclose()
        await server.stop()
    assert (result.outcome, result.http_status) == (Outcome.SENT, 200)
    # What the server got out before the client hung up: the cap plus what the sockets buffer,
    # far from the whole body.
    print(f"\nserver wrote {server.written / 2**20:.1f} MiB of a {BODY_LIMIT / 2**20:.0f} MiB body")
    assert MAX_RESPONSE_BYTES <= server.written < BODY_LIMIT // 4


async def test_an_ordinary_answer_is_read_and_every_call_goes_through():
    receiver = WebhookReceiver(lambda _call, _previous: Reply(200))
    await receiver.start()
    target = gateway(receiver.url)
    try:
        results = [await target.send(sms(i)) for i in (1, 2, 3)]
    finally:
        await target.aclose()
        await receiver.stop()
    assert [r.outcome for r in results] == [Outcome.SENT] * 3
    assert len(receiver.calls) == 3


async def _loopback_answer(*, allow_insecure: bool):
    """One call to a loopback receiver named `webhook.test`, through a gateway whose every
    connection is checked (and resolved by a resolver that answers 127.0.0.1)."""
    receiver = WebhookReceiver(lambda _call, _previous: Reply(200))
    await receiver.start()

    async def resolve(host: str, port: int) -> list[str]:
        assert host == "webhook.test"
        return ["127.0.0.1"]

    connect = partial(
        webhook_session,
        allow_insecure=allow_insecure,
        max_connections=4,
        proxy=None,
        timeout_seconds=10,
        resolver=CheckedResolver(allow_insecure=allow_insecure, resolve=resolve),
    )
    target = WebhookGateway(f"http://webhook.test:{receiver.port}/webhook/sms", connect, None)
    try:
        return await target.send(sms()), receiver.calls
    finally:
        await target.aclose()
        await receiver.stop()


async def test_a_loopback_address_is_refused_at_connection_time_unless_insecure_is_allowed():
    refused, calls = await _loopback_answer(allow_insecure=False)
    assert refused.outcome is Outcome.RETRY
    assert refused.reason == "connection_error:WebhookHostRefused"
    assert calls == []
    allowed, calls = await _loopback_answer(allow_insecure=True)
    assert (allowed.outcome, allowed.http_status) == (Outcome.SENT, 200)
    assert len(calls) == 1
    assert calls[0].headers["host"].startswith("webhook.test:")  # the name, not the address
