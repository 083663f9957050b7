"""A real OpenAI-compatible HTTP server on loopback (chat completions only), with programmable
replies; it records every request it received, prompts included."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn

from tests.support.webhook import free_port

API_KEY = "sk-test-loopback"


@dataclass(frozen=True)
class ChatRequest:
    received_at: float  # epoch seconds
    headers: dict[str, str]
    body: dict[str, Any]

    @property
    def messages(self) -> list[dict[str, Any]]:
        return list(self.body.get("messages", []))

    @property
    def prompt(self) -> str:
        """Every message's content, joined: what the model was shown."""
        return "\n".join(str(m.get("content", "")) for m in self.messages)


@dataclass(frozen=True)
class Reply:
    status: int = 200
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0

    @classmethod
    def text(cls, content: str | None, *, finish_reason: str = "stop") -> Reply:
        return cls(body=_completion(content, None, finish_reason))

    @classmethod
    def refusal(cls, refusal: str = "I'm sorry, I can't help with that.") -> Reply:
        return cls(body=_completion(None, refusal, "stop"))

    @classmethod
    def error(cls, status: int, headers: dict[str, str] | None = None) -> Reply:
        body = {"error": {"message": f"loopback error {status}", "type": "server_error"}}
        return cls(status=status, body=body, headers=headers or {})

    @classmethod
    def rate_limited(cls, retry_after: float) -> Reply:
        return cls.error(429, {"retry-after": f"{retry_after:g}"})

    @classmethod
    def slow(cls, seconds: float, content: str = "Too late to matter.") -> Reply:
        return cls(body=_completion(content, None, "stop"), delay=seconds)


def _completion(content: str | None, refusal: str | None, finish_reason: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-loopback",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": "loopback-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": refusal},
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 120, "completion_tokens": 30, "total_tokens": 150},
    }


Responder = Callable[[ChatRequest, list[ChatRequest]], Reply]


def always(reply: Reply) -> Responder:
    return lambda request, previous: reply


def in_turn(*replies: Reply) -> Responder:
    """The n-th request gets the n-th reply; the last one repeats."""
    return lambda request, previous: replies[min(len(previous), len(replies) - 1)]


class OpenAIServer:
    """ASGI app served by uvicorn at /v1/chat/completions; `responder` decides each reply."""

    def __init__(self, responder: Responder | None = None) -> None:
        self.requests: list[ChatRequest] = []
        self.answered: list[ChatRequest] = []
        self.responder: Responder = responder or always(Reply.text("Hi there!"))
        self.port = free_port()
        self._stopping = asyncio.Event()
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["path"] != "/v1/chat/completions" or scope["method"] != "POST":
            await self._send(send, Reply.error(404))
            return
        request = ChatRequest(
            received_at=time.time(),
            headers={k.decode().lower(): v.decode() for k, v in scope["headers"]},
            body=json.loads(raw),
        )
        previous = list(self.requests)
        self.requests.append(request)
        reply = self.responder(request, previous)
        if reply.delay:
            # Ends early when the server stops, so a slow reply never holds up the test's end.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), reply.delay)
        self.answered.append(request)
        await self._send(send, reply)

    async def _send(self, send: Any, reply: Reply) -> None:
        headers = {"content-type": "application/json", **reply.headers}
        await send(
            {
                "type": "http.response.start",
                "status": reply.status,
                "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
            }
        )
        await send({"type": "http.response.body", "body": json.dumps(reply.body or {}).encode()})

    async def start(self) -> None:
        config = uvicorn.Config(
            self,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="on",
            access_log=False,
        )
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        self._stopping.set()
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task
