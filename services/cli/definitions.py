"""The broker topology as a RabbitMQ definitions file, recorded from shared.topology's own
declarations so that the file operators import is exactly what the services declare, with the
queue policies of shared.policies that `followups declare` applies."""

from __future__ import annotations

from typing import Any, cast

from aio_pika.abc import AbstractChannel

from shared import topology
from shared.policies import QueueLimits, policies


class _Exchange:
    def __init__(self, recorder: _Recorder, name: str) -> None:
        self._recorder = recorder
        self.name = name

    async def bind(self, source: _Exchange, routing_key: str = "") -> None:
        self._recorder.bind(source.name, self.name, "exchange", routing_key)


class _Queue:
    def __init__(self, recorder: _Recorder, name: str) -> None:
        self._recorder = recorder
        self.name = name

    async def bind(self, source: _Exchange | str, routing_key: str | None = None) -> None:
        # aio-pika binds with the queue's own name when no routing key is given.
        name = source if isinstance(source, str) else source.name
        self._recorder.bind(
            name, self.name, "queue", self.name if routing_key is None else routing_key
        )


class _Recorder:
    """Stands in for an aio-pika channel and writes down what would be declared."""

    def __init__(self, vhost: str) -> None:
        self.vhost = vhost
        self.exchanges: dict[str, dict[str, Any]] = {}
        self.queues: dict[str, dict[str, Any]] = {}
        self.bindings: list[dict[str, Any]] = []

    async def declare_exchange(
        self, name: str, type: Any, durable: bool = False, arguments: dict[str, Any] | None = None
    ) -> _Exchange:
        self.exchanges[name] = {
            "name": name,
            "vhost": self.vhost,
            "type": getattr(type, "value", type),
            "durable": durable,
            "auto_delete": False,
            "internal": False,
            "arguments": dict(arguments or {}),
        }
        return _Exchange(self, name)

    async def declare_queue(
        self, name: str, durable: bool = False, arguments: dict[str, Any] | None = None
    ) -> _Queue:
        self.queues[name] = {
            "name": name,
            "vhost": self.vhost,
            "durable": durable,
            "auto_delete": False,
            "arguments": dict(arguments or {}),
        }
        return _Queue(self, name)

    async def get_queue(self, name: str, ensure: bool = True) -> _Queue:
        return _Queue(self, name)

    def bind(self, source: str, destination: str, kind: str, routing_key: str) -> None:
        self.bindings.append(
            {
                "source": source,
                "vhost": self.vhost,
                "destination": destination,
                "destination_type": kind,
                "routing_key": routing_key,
                "arguments": {},
            }
        )


async def definitions(
    vhost: str = "/", queue_type: str = "quorum", limits: QueueLimits | None = None
) -> dict[str, Any]:
    """Exchanges, queues and bindings of the `levels` timer backend (the plugin-free one, which
    any broker can import), and the policies with `limits` (the settings' defaults if None)."""
    recorder = _Recorder(vhost)
    channel = cast(AbstractChannel, recorder)
    public = await channel.declare_exchange(topology.PUBLIC_EXCHANGE, "topic", durable=True)
    await topology._declare_work_queues(channel, public)
    await topology._declare_levels(channel, queue_type)
    return {
        "vhosts": [{"name": vhost}],
        "policies": [
            {"vhost": vhost, "name": policy.name, **policy.body()}
            for policy in policies(limits or QueueLimits())
        ],
        "exchanges": sorted(recorder.exchanges.values(), key=lambda e: e["name"]),
        "queues": sorted(recorder.queues.values(), key=lambda q: q["name"]),
        "bindings": sorted(
            recorder.bindings,
            key=lambda b: (b["source"], b["destination"], b["routing_key"]),
        ),
    }
