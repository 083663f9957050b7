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

from testbed.loopback import LoopbackServer, Request

API_KEY = "sk-test-loopback"
# A follow-up the AI tests share: its template, the template rendered, and a model's rewrite.
TEMPLATE = "Hi {first_name}, please {action_item} before the {event_name}."
RENDERED = "Hi Sam, please Send the W-9 before the Spring Expo."
AI_TEXT = "Hey Sam! Could you send over your W-9 before the Spring Expo? Thanks a lot."


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


class OpenAIServer(LoopbackServer):
    """Serves /v1/chat/completions; `responder` decides each reply."""

    def __init__(self, responder: Responder | None = None) -> None:
        super().__init__()
        self.requests: list[ChatRequest] = []
        self.answered: list[ChatRequest] = []
        self.responder: Responder = responder or always(Reply.text("Hi there!"))

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def handle(self, request: Request, send: Any) -> None:
        if request.path != "/v1/chat/completions" or request.method != "POST":
            await self._send(send, Reply.error(404))
            return
        chat = ChatRequest(
            received_at=time.time(), headers=request.headers, body=json.loads(request.body)
        )
        previous = list(self.requests)
        self.requests.append(chat)
        reply = self.responder(chat, previous)
        if reply.delay:
            # Ends early when the server stops, so a slow reply never holds up the test's end.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), reply.delay)
        self.answered.append(chat)
        await self._send(send, reply)

    async def _send(self, send: Any, reply: Reply) -> None:
        headers = {"content-type": "application/json", **reply.headers}
        await self.respond(send, reply.status, headers, json.dumps(reply.body or {}).encode())
