"""Where an SMS goes: the n8n webhook (README: Security, signing), or a console sink that
sends nothing."""

from __future__ import annotations

import json
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import Any, TextIO

import aiohttp
import yarl
from standardwebhooks import Webhook

from shared.logging import mask_phone
from shared.retry_policy import MAX_RETRY_AFTER_SECONDS, transient_status
from shared.webhook_target import WebhookHostRefused

# The outcome depends on the status alone. A body up to this size is read, so the connection
# can be used again; past it the rest is discarded with the connection, so a webhook answering
# without end can neither hold a call nor fill the dispatcher's memory.
MAX_RESPONSE_BYTES = 64 * 1024


class Outcome(StrEnum):
    SENT = "sent"
    RETRY = "retry"
    FAILED = "failed"


@dataclass(frozen=True)
class SmsRequest:
    phone: str
    message: str
    contractor_id: int
    followup_id: int
    followup_type: str
    scheduled_time: datetime
    idempotency_key: str
    attempt: int
    priority: int

    def payload(self) -> dict[str, Any]:
        return {
            "phone": self.phone,
            "message": self.message,
            "contractor_id": self.contractor_id,
            "followup_id": self.followup_id,
            "followup_type": self.followup_type,
            "scheduled_time": self.scheduled_time.isoformat(),
            "idempotency_key": self.idempotency_key,
            "priority": self.priority,
        }


@dataclass(frozen=True)
class GatewayResult:
    outcome: Outcome
    reason: str
    http_status: int | None = None
    retry_after: float | None = None


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = (parsedate_to_datetime(value) - now).total_seconds()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)


def classify(status: int, retry_after: str | None, now: datetime) -> GatewayResult:
    if 200 <= status < 300:
        return GatewayResult(Outcome.SENT, f"http_{status}", status)
    if transient_status(status):
        return GatewayResult(
            Outcome.RETRY, f"http_{status}", status, parse_retry_after(retry_after, now)
        )
    return GatewayResult(Outcome.FAILED, f"http_{status}", status)


class Gateway(ABC):
    sent_by: str

    @abstractmethod
    async def send(self, request: SmsRequest) -> GatewayResult: ...

    async def aclose(self) -> None:
        return None


class WebhookGateway(Gateway):
    """POSTs to the configured webhook; signs with Standard Webhooks when a secret is set.

    `connect` builds the connection pool on the first call, inside the event loop that makes
    the calls (an aiohttp session belongs to one loop)."""

    sent_by = "dispatcher"

    def __init__(
        self, url: str, connect: Callable[[], aiohttp.ClientSession], signer: Webhook | None
    ) -> None:
        self._url = yarl.URL(url)
        self._connect = connect
        self._session: aiohttp.ClientSession | None = None
        self._signer = signer

    def _headers(self, request: SmsRequest, body: str) -> dict[str, str]:
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": request.idempotency_key,
            "User-Agent": "followups-dispatcher",
        }
        if self._signer is not None:
            now = datetime.now(UTC)
            headers["webhook-id"] = request.idempotency_key
            headers["webhook-timestamp"] = str(int(now.timestamp()))
            headers["webhook-signature"] = self._signer.sign(request.idempotency_key, now, body)
        return headers

    async def send(self, request: SmsRequest) -> GatewayResult:
        if self._session is None:
            self._session = self._connect()
        body = json.dumps(request.payload(), separators=(",", ":"))
        try:
            async with self._session.post(
                self._url,
                data=body.encode(),
                headers=self._headers(request, body),
                allow_redirects=False,
            ) as response:
                # Leaving the block with the body read returns the connection to the pool;
                # with a part left unread it closes the connection, dropping the rest.
                await _read_at_most(response, MAX_RESPONSE_BYTES)
        except TimeoutError:
            return GatewayResult(Outcome.RETRY, "timeout")
        except aiohttp.ClientError as exc:
            return GatewayResult(Outcome.RETRY, f"connection_error:{_failure_name(exc)}")
        return classify(response.status, response.headers.get("Retry-After"), datetime.now(UTC))

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


def _failure_name(exc: aiohttp.ClientError) -> str:
    """A refused or unresolvable webhook host says so by name, whatever aiohttp wraps it in."""
    cause = exc.__cause__ or getattr(exc, "os_error", None)
    if isinstance(cause, WebhookHostRefused):
        return "WebhookHostRefused"
    return exc.__class__.__name__


async def _read_at_most(response: aiohttp.ClientResponse, limit: int) -> None:
    received = 0
    async for chunk in response.content.iter_any():
        received += len(chunk)
        if received >= limit:
            return


class ConsoleSink(Gateway):
    """For `make run` without a webhook: shows what would be sent and says plainly it was not:
    to whom, the text, when it was due, when it went out and how late."""

    sent_by = "console-sink"

    def __init__(self, stream: TextIO = sys.stdout) -> None:
        self._stream = stream

    async def send(self, request: SmsRequest) -> GatewayResult:
        now = datetime.now(UTC)
        lateness = (now - request.scheduled_time).total_seconds() * 1000
        late = f"{lateness:,.1f} ms late" if lateness >= 0 else f"{-lateness:,.1f} ms early"
        self._stream.write(
            "\n──── CONSOLE SINK · NOT SENT: N8N_OUTBOUND_WEBHOOK_URL is unset ────\n"
            f"to contractor {request.contractor_id} at {mask_phone(request.phone)} · "
            f"follow-up {request.followup_id} ({request.followup_type}), "
            f"attempt {request.attempt}\n"
            f"due      {_utc(request.scheduled_time)}\n"
            f"went out {_utc(now)} · {late}\n"
            f"text     {request.message}\n"
            "────────────────────────────────────────────────────────────────────\n"
        )
        self._stream.flush()
        return GatewayResult(Outcome.SENT, "console_sink")


def _utc(moment: datetime) -> str:
    utc = moment.astimezone(UTC)
    return f"{utc:%Y-%m-%d %H:%M:%S}.{utc.microsecond // 1000:03d} UTC"
