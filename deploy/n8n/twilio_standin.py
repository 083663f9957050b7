"""Twilio on loopback, for the live check (`make n8n-check`): the request signature Twilio puts
on its callbacks, and a stand-in for its Messages API that the unmodified Twilio node reaches.

The Twilio node calls https://api.twilio.com, a fixed URL. n8n sends its requests through
HTTPS_PROXY; this stand-in is that proxy: it answers CONNECT api.twilio.com:443 itself, with a
certificate made for the run (n8n trusts it through NODE_EXTRA_CA_CERTS), and serves the
Messages API behind it. Any other host is refused, so nothing leaves the machine."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import shutil
import ssl
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl

TWILIO_HOST = "api.twilio.com"


def twilio_signature(token: str, url: str, form: dict[str, str]) -> str:
    """X-Twilio-Signature: base64 HMAC-SHA1 under the Auth Token of the URL Twilio called, then
    every form field's name and value, sorted by name."""
    signed = url + "".join(name + form[name] for name in sorted(form))
    return base64.b64encode(
        hmac.new(token.encode(), signed.encode(), hashlib.sha1).digest()
    ).decode()


def make_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for api.twilio.com, valid one day; returns (cert, key)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("openssl is missing (Debian: apt-get install openssl)")
    cert, key = folder / "twilio-standin.pem", folder / "twilio-standin.key"
    subprocess.run(  # noqa: S603 (fixed arguments)
        [
            openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert),
            "-subj", f"/CN={TWILIO_HOST}", "-addext", f"subjectAltName=DNS:{TWILIO_HOST}",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


@dataclass(frozen=True)
class SentMessage:
    account_sid: str
    authorized: bool
    form: dict[str, str]
    sid: str


@dataclass
class TwilioStandIn:
    """Answers POST /2010-04-01/Accounts/{sid}/Messages.json as Twilio does (201 and the message
    resource), or with `refuse_to`'s status and Twilio's error body for those numbers; for a
    number in `hang_up` it takes the message and closes the connection without answering."""

    account_sid: str
    auth_token: str
    cert: Path
    key: Path
    refuse_to: dict[str, tuple[int, int]] = field(default_factory=dict)  # To -> (status, code)
    hang_up: set[str] = field(default_factory=set)
    messages: list[SentMessage] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None

    async def start(self) -> None:
        self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._tls.load_cert_chain(self.cert, self.key)
        self._server = await asyncio.start_server(self._connect, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def sent_to(self, phone: str) -> list[SentMessage]:
        return [m for m in self.messages if m.form.get("To") == phone]

    async def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            method, target, _ = request.split("\r\n", 1)[0].split(" ", 2)
            if method != "CONNECT" or target != f"{TWILIO_HOST}:443":
                writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
                return
            writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            await writer.drain()
            await writer.start_tls(self._tls)
            while await self._serve_one(reader, writer):
                pass
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        lines = head.split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in lines[1:] if line)
        }
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        status, answer = self._answer(method, path, headers, body)
        if answer.get("to") in self.hang_up:
            return False
        payload = json.dumps(answer).encode()
        writer.write(
            f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        await writer.drain()
        return headers.get("connection", "").lower() != "close"

    def _answer(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, object]]:
        parts = path.split("?", 1)[0].strip("/").split("/")
        if method != "POST" or len(parts) != 4 or parts[3] != "Messages.json":
            return 404, {"code": 20404, "message": "The requested resource was not found"}
        expected = base64.b64encode(f"{self.account_sid}:{self.auth_token}".encode()).decode()
        authorized = headers.get("authorization") == f"Basic {expected}"
        if not authorized or parts[2] != self.account_sid:
            return 401, {"code": 20003, "message": "Authenticate", "status": 401}
        form = dict(parse_qsl(body.decode(), keep_blank_values=True))
        if form.get("To") in self.refuse_to:
            status, code = self.refuse_to[form["To"]]
            return status, {"code": code, "message": "refused by the stand-in", "status": status}
        sid = "SM" + uuid.uuid4().hex
        self.messages.append(SentMessage(parts[2], authorized, form, sid))
        return 201, {"sid": sid, "status": "queued", "to": form.get("To"), "account_sid": parts[2]}
