"""The LLM call: OpenAI chat completions (any compatible server), with a per-attempt timeout and
bounded retries that all fit inside the budget the caller gives."""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import httpx2
import openai
from openai import AsyncOpenAI

from services.personalizer.prompt import Prompt
from shared.errors import FollowupsError
from shared.metrics import LLM_LATENCY, LLM_TOKENS
from shared.retry_policy import LLM_BACKOFF_SECONDS, LLM_MAX_ATTEMPTS

ATTEMPT_TIMEOUT_SECONDS = 8.0
MIN_ATTEMPT_SECONDS = 0.1  # an attempt with less time than this left is not started
MAX_COMPLETION_TOKENS = 300


@dataclass(frozen=True)
class Draft:
    """What the model wrote, or why it wrote nothing usable (`failure`, a metrics-safe word)."""

    text: str | None
    failure: str | None
    model: str
    attempts: int


class TextWriter(ABC):
    model: str

    @abstractmethod
    async def write(self, prompt: Prompt, budget: float) -> Draft:
        """Ask for the text; return within `budget` seconds whatever happens."""

    async def aclose(self) -> None:
        return None


class _Failed(FollowupsError):
    def __init__(self, reason: str, *, retry: bool, wait: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry = retry
        self.wait = wait


def retry_after(headers: Any) -> float | None:
    """Seconds from Retry-After-Ms or Retry-After (seconds or an HTTP date)."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            return max(0.0, float(raw) * scale)
        except ValueError:
            parsed = email.utils.parsedate_tz(raw)
            if parsed is not None:
                return max(0.0, email.utils.mktime_tz(parsed) - time.time())
    return None


def _classify(exc: BaseException) -> _Failed:
    if isinstance(exc, TimeoutError | openai.APITimeoutError):
        return _Failed("timeout", retry=True)
    if isinstance(exc, openai.RateLimitError):
        return _Failed("rate_limited", retry=True, wait=retry_after(exc.response.headers))
    if isinstance(exc, openai.APIStatusError):
        if exc.status_code >= 500 or exc.status_code in (408, 409):
            return _Failed("server_error", retry=True, wait=retry_after(exc.response.headers))
        return _Failed("api_error", retry=False)
    if isinstance(exc, openai.APIConnectionError):
        return _Failed("connection_error", retry=True)
    return _Failed("api_error", retry=False)


def _text_of(completion: Any) -> str:
    """The text of a chat completion read as plain JSON: building the SDK's typed model of the
    answer cost more CPU than the call itself once the transport was cheap."""
    if not isinstance(completion, dict):
        raise _Failed("api_error", retry=False)
    usage = completion.get("usage")
    if isinstance(usage, dict):
        LLM_TOKENS.labels("prompt").inc(_count(usage.get("prompt_tokens")))
        LLM_TOKENS.labels("completion").inc(_count(usage.get("completion_tokens")))
    choices = completion.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise _Failed("empty", retry=False)
    choice = choices[0]
    message = choice.get("message")
    if not isinstance(message, dict):
        raise _Failed("empty", retry=False)
    if message.get("refusal"):
        raise _Failed("refusal", retry=False)
    if choice.get("finish_reason") == "content_filter":
        raise _Failed("content_filter", retry=False)
    if choice.get("finish_reason") == "length":
        raise _Failed("truncated", retry=False)
    content = message.get("content")
    if not isinstance(content, str) or not content.strip():
        raise _Failed("empty", retry=False)
    return content


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


class OpenAIWriter(TextWriter):
    """The SDK's own retries are off (max_retries=0): this loop knows the budget, so it never
    waits out a Retry-After that would end past it."""

    def __init__(self, client: AsyncOpenAI, model: str) -> None:
        self.model = model
        self._client = client

    async def write(self, prompt: Prompt, budget: float) -> Draft:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        failure = "timeout"
        attempt = 0
        while attempt < LLM_MAX_ATTEMPTS:
            left = deadline - loop.time()
            if left < MIN_ATTEMPT_SECONDS:
                break
            attempt += 1
            started = loop.time()
            try:
                text = await self._attempt(prompt, left)
            except _Failed as failed:
                LLM_LATENCY.labels(failed.reason).observe(loop.time() - started)
                failure = failed.reason
                if not failed.retry:
                    break
                pause = max(failed.wait or 0.0, LLM_BACKOFF_SECONDS * 2 ** (attempt - 1))
                if loop.time() + pause + MIN_ATTEMPT_SECONDS > deadline:
                    break
                await asyncio.sleep(pause)
            else:
                LLM_LATENCY.labels("ok").observe(loop.time() - started)
                return Draft(text=text, failure=None, model=self.model, attempts=attempt)
        return Draft(text=None, failure=failure, model=self.model, attempts=attempt)

    async def _attempt(self, prompt: Prompt, left: float) -> str:
        body = json.dumps(
            {
                "model": self.model,
                "messages": [
                    {"role": "system", "content": prompt.system},
                    {"role": "user", "content": prompt.user},
                ],
                "max_completion_tokens": MAX_COMPLETION_TOKENS,
            }
        ).encode()
        try:
            # asyncio.timeout bounds the whole attempt; the SDK's timeout only bounds each read.
            async with asyncio.timeout(left):
                # The SDK's plain request (its auth, base URL, timeouts and errors) with the body
                # encoded here: its typed path spent more CPU on transforming the parameters and
                # building the answer's model than the call itself took.
                response = await self._client.post(
                    "/chat/completions",
                    cast_to=httpx2.Response,
                    content=body,
                    options={
                        "headers": {"Content-Type": "application/json"},
                        "timeout": min(ATTEMPT_TIMEOUT_SECONDS, left),
                    },
                )
        except (openai.OpenAIError, TimeoutError) as exc:
            raise _classify(exc) from None
        try:
            # Not streamed, so the client has read the whole body already.
            completion = json.loads(response.content)
        except ValueError:
            raise _Failed("api_error", retry=False) from None
        return _text_of(completion)

    async def aclose(self) -> None:
        await self._client.close()
