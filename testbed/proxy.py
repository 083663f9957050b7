"""A forward HTTP proxy on 127.0.0.1 for tests of HTTPS_PROXY/HTTP_PROXY: it forwards plain
requests to their target and refuses CONNECT tunnels, recording the request line of both."""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit

from testbed.loopback import free_port


class ForwardProxy:
    def __init__(self) -> None:
        self.port = free_port()
        self.requests: list[str] = []
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            request_line, *header_lines = head.split("\r\n")
            self.requests.append(request_line)
            method, target, _version = request_line.split(" ", 2)
            if method == "CONNECT":
                writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
                return
            headers = [line for line in header_lines if line and ":" in line]
            length = next(
                (
                    int(h.split(":", 1)[1])
                    for h in headers
                    if h.lower().startswith("content-length")
                ),
                0,
            )
            body = await reader.readexactly(length)
            writer.write(await self._forward(method, target, headers, body))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _forward(self, method: str, target: str, headers: list[str], body: bytes) -> bytes:
        parts = urlsplit(target)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        kept = [h for h in headers if not h.lower().startswith(("connection:", "proxy-"))]
        upstream_reader, upstream_writer = await asyncio.open_connection(
            parts.hostname, parts.port or 80
        )
        try:
            lines = [f"{method} {path} HTTP/1.1", *kept, "Connection: close", "", ""]
            upstream_writer.write("\r\n".join(lines).encode("latin-1") + body)
            await upstream_writer.drain()
            return await upstream_reader.read()
        finally:
            upstream_writer.close()
            with contextlib.suppress(ConnectionError):
                await upstream_writer.wait_closed()
