"""A loopback TCP balancer in front of the cluster's AMQP ports.

Neither aio-pika's robust connection nor FastStream's RabbitBroker can be given more than one
broker address: a robust connection reconnects to the address it started with. So the services
get one address, this balancer's, and each connection they open is piped to the node with the
fewest open connections that accepts it (ties in turn), so the services' long-lived connections
spread over the nodes. When a node dies, the balancer closes the client side of every connection
that went to it; the client's robust reconnect then opens a new connection, which lands on a node
that is still up. A load balancer (or DNS name) in front of the nodes plays this part in a real
deployment.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from dataclasses import dataclass

from testbed.loopback import free_port

CONNECT_TIMEOUT_SECONDS = 2.0
CHUNK = 64 * 1024


@dataclass(frozen=True)
class Target:
    label: str  # the node's name
    host: str
    port: int


class Balancer:
    def __init__(self, targets: list[Target]) -> None:
        if not targets:
            raise ValueError("a balancer needs at least one target")
        self.targets = targets
        self.port = free_port()
        self._next = 0
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.Task[None]] = set()
        self._open: Counter[str] = Counter()
        self.refused = 0  # client connections no node accepted

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def connections_on(self, label: str) -> int:
        """Client connections piped to node `label` right now."""
        return self._open[label]

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.cancel()
        await asyncio.gather(*self._links, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._links.add(task)
        try:
            await self._link(reader, writer)
        finally:
            self._links.discard(task)

    async def _link(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        upstream = await self._connect_next()
        if upstream is None:
            self.refused += 1
            await _close(client_out)
            return
        target, node_in, node_out = upstream
        self._open[target.label] += 1
        try:
            pipes = [
                asyncio.create_task(_pipe(client_in, node_out)),
                asyncio.create_task(_pipe(node_in, client_out)),
            ]
            # Either side ending ends the link: a dead node must drop its clients, so that
            # they reconnect (through here, to another node).
            _, pending = await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            for pipe in pending:
                pipe.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        finally:
            self._open[target.label] -= 1
            await _close(node_out)
            await _close(client_out)

    async def _connect_next(
        self,
    ) -> tuple[Target, asyncio.StreamReader, asyncio.StreamWriter] | None:
        for target in self.choices():
            try:
                node_in, node_out = await asyncio.wait_for(
                    asyncio.open_connection(target.host, target.port), CONNECT_TIMEOUT_SECONDS
                )
            except (OSError, TimeoutError):
                continue
            self._next = (self.targets.index(target) + 1) % len(self.targets)
            return target, node_in, node_out
        return None

    def choices(self) -> list[Target]:
        """Every target, the one to try first first: fewest open connections, ties in turn."""
        count = len(self.targets)
        in_turn = [self.targets[(self._next + step) % count] for step in range(count)]
        return sorted(in_turn, key=lambda target: self._open[target.label])


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await source.read(CHUNK):
            sink.write(data)
            await sink.drain()


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
