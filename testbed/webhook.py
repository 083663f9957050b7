"""A stand-in for the n8n webhook on loopback; it records every call."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from testbed.loopback import LoopbackServer, Request


@dataclass(frozen=True)
class Call:
    received_at: float  # epoch seconds
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.body)


@dataclass(frozen=True)
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


Responder = Callable[[Call, list[Call]], Reply]


class WebhookReceiver(LoopbackServer):
    """Records every POST; `responder` decides each reply (default: 200)."""

    def __init__(self, responder: Responder | None = None, path: str = "/webhook/sms") -> None:
        super().__init__()
        self.calls: list[Call] = []
        self.probes: list[tuple[str, str]] = []
        self.responder: Responder = responder or (lambda call, calls: Reply())
        self.path = path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    async def handle(self, request: Request, send: Any) -> None:
        if request.method != "POST":
            # Reachability checks (doctor) and redirected GETs are answered, not SMS calls.
            self.probes.append((request.method, request.path))
            await self.respond(send, 204, {}, b"")
            return
        call = Call(received_at=time.time(), headers=request.headers, body=request.body)
        previous = list(self.calls)
        self.calls.append(call)
        reply = self.responder(call, previous)
        if reply.delay:
            await asyncio.sleep(reply.delay)
        await self.respond(send, reply.status, reply.headers, b"{}")

    def calls_for(self, followup_id: int) -> list[Call]:
        return [c for c in self.calls if c.json.get("followup_id") == followup_id]
