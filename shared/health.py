"""A service's HTTP side, served beside its consumer: liveness, readiness and Prometheus metrics.

GET /healthz   200 while the process and its event loop answer (liveness)
GET /readyz    200 when both broker connections, the database, the consumer and the service's own
               checks (the dispatcher's repair sweep) all work, else 503
GET /metrics   the default Prometheus registry (shared.metrics and FastStream's own)
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import uvicorn
from faststream import FastStream
from faststream.asgi import AsgiFastStream, AsgiResponse, get
from faststream.prometheus import ConsumeAttrs
from faststream.prometheus.middleware import PrometheusMiddleware
from faststream.rabbit import RabbitBroker
from faststream.rabbit.prometheus.provider import RabbitMetricsSettingsProvider
from faststream.rabbit.response import RabbitPublishCommand
from prometheus_client import REGISTRY, make_asgi_app

from shared.bus import AmqpPublisher
from shared.logging import get_logger
from shared.metrics import destination_label

# One port per service, so `followups run all` serves three on one host; HTTP_PORT overrides it.
DEFAULT_HTTP_PORTS = {"scheduler": 8081, "personalizer": 8082, "dispatcher": 8083}
PROBE_TIMEOUT_SECONDS = 2.0
OK = "ok"


class FollowupsMetricsProvider(RabbitMetricsSettingsProvider):
    def get_consume_attrs_from_message(self, msg: Any) -> ConsumeAttrs:
        raw = msg.raw_message
        return {
            "destination_name": destination_label(raw.exchange or "", raw.routing_key or ""),
            "message_size": len(msg.body),
            "messages_count": 1,
        }

    def get_publish_destination_name_from_cmd(self, cmd: RabbitPublishCommand) -> str:
        return destination_label(cmd.exchange.name or "", cmd.destination)


def metrics_middleware(service: str) -> PrometheusMiddleware[Any, Any]:
    """FastStream's message metrics (received, processed, duration, published) on REGISTRY."""
    return PrometheusMiddleware(
        settings_provider_factory=lambda _msg: FollowupsMetricsProvider(),
        registry=REGISTRY,
        app_name=service,
    )


@dataclass
class Heartbeat:
    """Proof that a background loop still gets through its work: `check` is "ok" while the last
    `beat` (or the `start`, before the first one) is at most `max_age` seconds old."""

    max_age: float
    monotonic: Callable[[], float] = time.monotonic
    _last: float | None = field(default=None, init=False)

    def start(self) -> None:
        self._last = self.monotonic()

    beat = start

    def check(self) -> str:
        if self._last is None:
            return "not started"
        age = self.monotonic() - self._last
        if age > self.max_age:
            return f"no pass completed for {age:.0f} s (the limit is {self.max_age:.0f} s)"
        return OK


@dataclass
class Readiness:
    """Whether the service can do its work now. `pool` is set once the service has started;
    `checks` are the service's own, each answering "ok" or why not."""

    broker: RabbitBroker
    publisher: AmqpPublisher
    pool: asyncpg.Pool | None = None
    timeout: float = PROBE_TIMEOUT_SECONDS
    checks: Mapping[str, Callable[[], str]] = field(default_factory=dict)

    async def check(self) -> dict[str, str]:
        """Each check's result: "ok", or why it is not."""
        broker, database = await asyncio.gather(self.check_broker(), self.check_database())
        results = {"broker": broker, "database": database, "consumer": self.check_consumer()}
        results.update((name, check()) for name, check in self.checks.items())
        return results

    async def check_broker(self) -> str:
        if not self.publisher.is_connected:
            return "publishing connection down"
        return OK if await self.broker.ping(timeout=self.timeout) else "not connected"

    async def check_database(self) -> str:
        if self.pool is None:
            return "not started"
        try:
            async with asyncio.timeout(self.timeout):
                await self.pool.fetchval("SELECT 1")
        except Exception as exc:
            return f"unreachable ({exc.__class__.__name__})"
        return OK

    def check_consumer(self) -> str:
        subscribers = self.broker.subscribers
        if not subscribers or not all(s.running for s in subscribers):
            return "not consuming"
        return OK


def http_routes(readiness: Readiness) -> list[tuple[str, Any]]:
    @get(include_in_schema=False)
    async def healthz(_scope: Any) -> AsgiResponse:
        return AsgiResponse(b"ok\n", status_code=200, headers={"content-type": "text/plain"})

    @get(include_in_schema=False)
    async def readyz(_scope: Any) -> AsgiResponse:
        checks = await readiness.check()
        ready = all(result == OK for result in checks.values())
        body = {"status": "ready" if ready else "not ready", "checks": checks}
        return AsgiResponse(
            json.dumps(body).encode(),
            status_code=200 if ready else 503,
            headers={"content-type": "application/json"},
        )

    return [("/healthz", healthz), ("/readyz", readyz), ("/metrics", make_asgi_app(REGISTRY))]


@dataclass
class HttpEndpoint:
    host: str
    port: int
    _socket: socket.socket | None = field(default=None, repr=False)

    def bind(self) -> socket.socket:
        """Bind before starting, so a taken port stops the service before it consumes anything."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.set_inheritable(True)
        self._socket = sock
        return sock

    @property
    def bound_port(self) -> int:
        assert self._socket is not None
        return int(self._socket.getsockname()[1])


class ServiceApp(FastStream):
    """A service's consumer app that also knows how to serve its HTTP endpoints."""

    def __init__(self, broker: RabbitBroker, *, name: str, readiness: Readiness, **kw: Any) -> None:
        super().__init__(broker, **kw)
        self.name = name
        self.readiness = readiness

    def asgi(self) -> AsgiFastStream:
        return AsgiFastStream.from_app(self, asgi_routes=http_routes(self.readiness))

    async def serve(self, host: str, port: int | None) -> None:
        """Consume and serve HTTP until SIGINT or SIGTERM; `port` 0 picks a free one."""
        endpoint = HttpEndpoint(host, DEFAULT_HTTP_PORTS[self.name] if port is None else port)
        sock = endpoint.bind()
        config = uvicorn.Config(
            self.asgi(), lifespan="on", log_config=None, access_log=False, server_header=False
        )
        server = uvicorn.Server(config)
        get_logger(f"followups.{self.name}").info(
            "http endpoints listening", host=host, port=endpoint.bound_port
        )
        try:
            await server.serve(sockets=[sock])
        finally:
            sock.close()
        if not server.started:
            raise SystemExit(3)
