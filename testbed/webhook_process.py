"""The webhook stand-in in a process of its own, for measurements: a receiver that shares its
event loop with a load generator and a model stand-in stamps a call when that loop gets to it,
not when the call arrives, and so adds its own queueing to every lateness it reports.

`python -m testbed.webhook_process PORT` serves the webhook (200 to every POST) and, on
`GET /calls/N`, the calls from the N-th on; `RemoteWebhookReceiver` starts it and mirrors its calls.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from typing import Any

import httpx
import uvloop

from testbed.loopback import Request, free_port
from testbed.webhook import Call, WebhookReceiver

CALLS_PATH = "/calls/"
START_TIMEOUT_SECONDS = 30.0


class CallLog(WebhookReceiver):
    """The receiver inside the process: also answers `GET /calls/N`."""

    def __init__(self, port: int) -> None:
        super().__init__()
        self.port = port

    async def handle(self, request: Request, send: Any) -> None:
        if request.method == "GET" and request.path.startswith(CALLS_PATH):
            since = int(request.path.removeprefix(CALLS_PATH) or 0)
            body = json.dumps(
                [
                    {
                        "received_at": call.received_at,
                        "headers": call.headers,
                        "body": call.body.decode(),
                    }
                    for call in self.calls[since:]
                ]
            ).encode()
            await self.respond(send, 200, {"content-type": "application/json"}, body)
            return
        await super().handle(request, send)


async def _serve(port: int) -> None:
    receiver = CallLog(port)
    await receiver.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await receiver.stop()


class RemoteWebhookReceiver:
    """The bench's side: starts the process, and `refresh()` copies the calls it has seen since
    the last refresh into `calls` (same `Call`s as the in-process receiver's)."""

    def __init__(self, path: str = "/webhook/sms") -> None:
        self.port = free_port()
        self.path = path
        self.calls: list[Call] = []
        self.process: subprocess.Popen[bytes] | None = None
        self._client: httpx.AsyncClient | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    @property
    def pid(self) -> int:
        assert self.process is not None, "the receiver is not started"
        return self.process.pid

    async def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "testbed.webhook_process", str(self.port)]
        )
        self._client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}", timeout=10)
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the webhook receiver exited with {self.process.returncode}")
            try:
                await self.refresh()
                return
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the webhook receiver did not start listening") from None
                await asyncio.sleep(0.05)

    async def refresh(self) -> None:
        assert self._client is not None, "the receiver is not started"
        response = await self._client.get(f"{CALLS_PATH}{len(self.calls)}")
        response.raise_for_status()
        self.calls.extend(
            Call(
                received_at=float(call["received_at"]),
                headers=dict(call["headers"]),
                body=str(call["body"]).encode(),
            )
            for call in response.json()
        )

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.aclose()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.process.wait, 10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                await asyncio.to_thread(self.process.wait)


if __name__ == "__main__":
    uvloop.run(_serve(int(sys.argv[1])))
