"""The gateway workflow in a real n8n, against loopback stand-ins (`make n8n-check`; not part of
`make test`): imports followups-gateway.json unchanged into an n8n of its own (SQLite in a
temporary folder), sends it webhooks signed by the dispatcher's own gateway, lets its Twilio
node reach a loopback Twilio (twilio_standin.py), restarts n8n, posts Twilio status callbacks,
and reads the delivery reports from a RabbitMQ vhost of its own. Prints one line per check.

    N8N_BIN=/path/to/node_modules/.bin/n8n python -m deploy.n8n.check
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aio_pika
import asyncpg
import httpx
from standardwebhooks import Webhook

from deploy.n8n.twilio_standin import TwilioStandIn, make_certificate, twilio_signature
from deploy.n8n.workflow import (
    CREDENTIALS,
    DELIVERY_REPORTED,
    PUBLIC_EXCHANGE,
    SCHEMA_FILE,
    SMS_PATH,
    STATUS_PATH,
    WORKFLOW_FILE,
    workflow,
)
from services.dispatcher.app import make_gateway
from services.dispatcher.gateway import GatewayResult, Outcome, SmsRequest
from shared.schemas import DeliveryReported, DeliveryStatus, parse_inbound
from shared.settings import Settings
from shared.topology import declare_topology
from testbed.infra import Infra
from testbed.loopback import free_port

START_TIMEOUT_SECONDS = 180.0
ACCOUNT_SID = "AC" + "0" * 32
FROM_NUMBER = "+15005550006"


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    failed: int = 0

    def check(self, ok: bool, what: str) -> None:
        self.lines.append(f"{'ok  ' if ok else 'FAIL'} {what}")
        print(self.lines[-1], flush=True)
        self.failed += not ok


class N8n:
    """One n8n process on loopback with its own user folder (SQLite) and ports."""

    def __init__(self, binary: str, folder: Path, env: dict[str, str]) -> None:
        self.binary = binary
        self.folder = folder
        self.port = free_port()
        self.env = {
            **os.environ,
            "N8N_USER_FOLDER": str(folder),
            "N8N_PORT": str(self.port),
            "N8N_LISTEN_ADDRESS": "127.0.0.1",
            "N8N_HOST": "127.0.0.1",
            "WEBHOOK_URL": f"http://127.0.0.1:{self.port}/",
            "N8N_RUNNERS_BROKER_PORT": str(free_port()),
            "N8N_RUNNERS_BROKER_LISTEN_ADDRESS": "127.0.0.1",
            "N8N_ENCRYPTION_KEY": secrets.token_hex(24),
            "N8N_DIAGNOSTICS_ENABLED": "false",
            "N8N_VERSION_NOTIFICATIONS_ENABLED": "false",
            "N8N_TEMPLATES_ENABLED": "false",
            "N8N_PERSONALIZATION_ENABLED": "false",
            **env,
        }
        self.process: asyncio.subprocess.Process | None = None
        self.log = folder / "n8n.log"

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/webhook/{path}"

    def cli(self, *args: str) -> None:
        done = subprocess.run(  # noqa: S603 (the n8n the operator named in N8N_BIN)
            [self.binary, *args], env=self.env, capture_output=True, text=True, timeout=300
        )
        if done.returncode != 0:
            raise RuntimeError(f"n8n {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")

    async def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                self.binary, "start", env=self.env, stdout=log, stderr=log
            )
        # Ready when the workflow's webhook answers: an unsigned call is refused with 401.
        deadline = asyncio.get_running_loop().time() + START_TIMEOUT_SECONDS
        async with httpx.AsyncClient(timeout=5.0) as client:
            while asyncio.get_running_loop().time() < deadline:
                if self.process.returncode is not None:
                    raise RuntimeError(f"n8n exited with {self.process.returncode}; see {self.log}")
                try:
                    answer = await client.post(self.url(SMS_PATH), content=b"{}")
                    if answer.status_code == 401:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(1.0)
        raise RuntimeError(f"n8n did not serve the workflow in {START_TIMEOUT_SECONDS} s")

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), timeout=60)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        self.process = None


def _credentials(infra: Infra, auth_token: str) -> list[dict[str, object]]:
    data = {
        "twilioApi": {"authType": "authToken", "accountSid": ACCOUNT_SID, "authToken": auth_token},
        "postgres": {
            "host": "127.0.0.1",
            "port": 5432,
            "database": infra.name,
            "user": "postgres",
            "password": "",
            "ssl": "disable",
        },
        "rabbitmq": {
            "hostname": "127.0.0.1",
            "port": 5672,
            "username": "guest",
            "password": "guest",
            "vhost": infra.name,
            "ssl": False,
        },
    }
    return [{**CREDENTIALS[kind], "type": kind, "data": data[kind]} for kind in CREDENTIALS]


def _sms(phone: str, followup_id: int) -> SmsRequest:
    return SmsRequest(
        phone=phone,
        message=f"Hi Sam, follow-up {followup_id} from the n8n check. Ünïcode stays as sent.",
        contractor_id=7,
        followup_id=followup_id,
        followup_type="check_in",
        scheduled_time=datetime.now(UTC),
        idempotency_key=str(uuid.uuid4()),
        attempt=1,
        priority=0,
    )


async def _reports(
    queue: aio_pika.abc.AbstractQueue, wait: float
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """What reached the report queue within `wait` seconds."""
    got: list[aio_pika.abc.AbstractIncomingMessage] = []
    deadline = asyncio.get_running_loop().time() + wait
    while asyncio.get_running_loop().time() < deadline:
        message = await queue.get(fail=False, no_ack=True)
        if message is None:
            await asyncio.sleep(0.2)
            continue
        got.append(message)
    return got


async def run(binary: str, folder: Path) -> Report:
    report = Report()
    secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    auth_token = secrets.token_hex(16)
    cert, key = make_certificate(folder)
    twilio = TwilioStandIn(ACCOUNT_SID, auth_token, cert, key)
    await twilio.start()
    infra = Infra.create("n8n")
    n8n: N8n | None = None
    gateway = None
    try:
        await declare_topology(infra.rabbitmq_url, backend="levels", queue_type="quorum")
        db = await asyncpg.connect(infra.database_url)
        await db.execute(SCHEMA_FILE.read_text())
        connection = await aio_pika.connect(infra.rabbitmq_url)
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(PUBLIC_EXCHANGE, DELIVERY_REPORTED)

        n8n = N8n(
            binary,
            folder / "n8n",
            {
                "N8N_BLOCK_ENV_ACCESS_IN_NODE": "false",
                "NODE_FUNCTION_ALLOW_BUILTIN": "crypto",
                "FOLLOWUPS_WEBHOOK_SECRET": secret,
                "FOLLOWUPS_TWILIO_AUTH_TOKEN": auth_token,
                "FOLLOWUPS_TWILIO_FROM": FROM_NUMBER,
                "HTTPS_PROXY": twilio.proxy_url,
                "NO_PROXY": "127.0.0.1,localhost",
                "NODE_EXTRA_CA_CERTS": str(cert),
            },
        )
        n8n.folder.mkdir()
        n8n.env["FOLLOWUPS_STATUS_CALLBACK_URL"] = n8n.url(STATUS_PATH)
        credentials_file = folder / "credentials.json"
        credentials_file.write_text(json.dumps(_credentials(infra, auth_token)))
        n8n.cli("import:credentials", f"--input={credentials_file}")
        n8n.cli("import:workflow", f"--input={WORKFLOW_FILE}")
        n8n.cli("publish:workflow", f"--id={workflow()['id']}")
        await n8n.start()
        report.check(True, f"n8n imported {WORKFLOW_FILE.name} and serves it on :{n8n.port}")

        gateway = make_gateway(
            Settings(
                n8n_outbound_webhook_url=n8n.url(SMS_PATH),
                webhook_allow_insecure=True,
                webhook_signing_secret=secret,
            )
        )
        send: Callable[[SmsRequest], Awaitable[GatewayResult]] = gateway.send

        first = _sms("+14155552671", 1)
        result = await send(first)
        sent = twilio.sent_to(first.phone)
        report.check(
            result.outcome is Outcome.SENT and len(sent) == 1,
            f"a signed call sends one SMS ({result.reason}, {len(sent)} at Twilio)",
        )
        if sent:
            form = sent[0].form
            report.check(
                form.get("Body") == first.message and form.get("From") == FROM_NUMBER,
                "Twilio got the text as signed and the configured From",
            )
            report.check(
                form.get("StatusCallback") == f"{n8n.url(STATUS_PATH)}?key={first.idempotency_key}",
                "the status callback URL carries the Idempotency-Key",
            )

            row = await db.fetchrow(
                "SELECT state, message_sid FROM followups_gateway_sends WHERE idempotency_key = $1",
                first.idempotency_key,
            )
            report.check(
                row is not None and (row["state"], row["message_sid"]) == ("sent", sent[0].sid),
                "the key is recorded sent, with Twilio's message SID",
            )

        again = await send(first)
        report.check(
            again.outcome is Outcome.SENT and len(twilio.sent_to(first.phone)) == 1,
            f"the same Idempotency-Key again: {again.reason}, still one SMS",
        )

        burst = _sms("+14155552672", 2)
        results = await asyncio.gather(*(send(burst) for _ in range(8)))
        outcomes = sorted(f"{r.outcome.value}:{r.reason}" for r in results)
        report.check(
            len(twilio.sent_to(burst.phone)) == 1
            and all(r.outcome in (Outcome.SENT, Outcome.RETRY) for r in results),
            f"8 concurrent calls with one key: one SMS; answers {outcomes}",
        )
        retried = await send(burst)
        report.check(
            retried.outcome is Outcome.SENT and len(twilio.sent_to(burst.phone)) == 1,
            "a retry of the burst after it settled is answered sent, no second SMS",
        )

        forged = make_gateway(
            Settings(
                n8n_outbound_webhook_url=n8n.url(SMS_PATH),
                webhook_allow_insecure=True,
                webhook_signing_secret="whsec_"
                + base64.b64encode(secrets.token_bytes(32)).decode(),
            )
        )
        try:
            bad = await forged.send(_sms("+14155552673", 3))
        finally:
            await forged.aclose()
        report.check(
            (bad.outcome, bad.http_status) == (Outcome.FAILED, 401)
            and not twilio.sent_to("+14155552673"),
            "a call signed with another secret: 401, nothing sent",
        )

        stale = _sms("+14155552674", 4)
        body = json.dumps(stale.payload(), separators=(",", ":"))
        old = datetime.now(UTC) - timedelta(minutes=10)
        async with httpx.AsyncClient() as client:
            answer = await client.post(
                n8n.url(SMS_PATH),
                content=body.encode(),
                headers={
                    "Content-Type": "application/json",
                    "Idempotency-Key": stale.idempotency_key,
                    "webhook-id": stale.idempotency_key,
                    "webhook-timestamp": str(int(old.timestamp())),
                    "webhook-signature": Webhook(secret).sign(stale.idempotency_key, old, body),
                },
            )
        report.check(
            answer.status_code == 401 and not twilio.sent_to(stale.phone),
            f"a correctly signed call from ten minutes ago: {answer.status_code}, nothing sent",
        )

        refused = _sms("+14155552675", 5)
        twilio.refuse_to[refused.phone] = (400, 21211)
        no = await send(refused)
        held = await db.fetchval(
            "SELECT count(*) FROM followups_gateway_sends WHERE idempotency_key = $1",
            refused.idempotency_key,
        )
        report.check(
            (no.outcome, no.http_status, held) == (Outcome.FAILED, 422, 0),
            f"Twilio refuses the number (400, 21211): {no.http_status} to the dispatcher, "
            "key released",
        )

        busy = _sms("+14155552676", 6)
        twilio.refuse_to[busy.phone] = (503, 20503)
        later = await send(busy)
        del twilio.refuse_to[busy.phone]
        then = await send(busy)
        report.check(
            (later.outcome, later.http_status, then.outcome) == (Outcome.RETRY, 503, Outcome.SENT)
            and len(twilio.sent_to(busy.phone)) == 1,
            "Twilio answers 503: the dispatcher retries, and the retry sends once",
        )

        lost = _sms("+14155552677", 7)
        twilio.hang_up.add(lost.phone)
        unanswered = await send(lost)
        twilio.hang_up.discard(lost.phone)
        retry = await send(lost)
        report.check(
            (unanswered.http_status, retry.outcome, retry.http_status) == (502, Outcome.FAILED, 409)
            and len(twilio.sent_to(lost.phone)) == 1,
            "Twilio takes the SMS but never answers: 502, and the retry is refused (409), "
            "not sent again",
        )

        await n8n.stop()
        await n8n.start()
        after = await send(first)
        report.check(
            after.outcome is Outcome.SENT and len(twilio.sent_to(first.phone)) == 1,
            "after an n8n restart the first key is still known: no second SMS",
        )

        message = twilio.sent_to(first.phone)[0]
        callback_url = message.form["StatusCallback"]

        def status_form(status: str, error_code: str = "") -> dict[str, str]:
            form = {
                "AccountSid": ACCOUNT_SID,
                "ApiVersion": "2010-04-01",
                "From": FROM_NUMBER,
                "MessageSid": message.sid,
                "MessageStatus": status,
                "SmsSid": message.sid,
                "SmsStatus": status,
                "To": first.phone,
            }
            return form | ({"ErrorCode": error_code} if error_code else {})

        async with httpx.AsyncClient() as client:

            async def callback(form: dict[str, str], token: str = auth_token) -> int:
                signature = twilio_signature(token, callback_url, form)
                answer = await client.post(
                    callback_url, data=form, headers={"X-Twilio-Signature": signature}
                )
                return answer.status_code

            step = await callback(status_form("sent"))
            quiet = await _reports(queue, 2.0)
            report.check(
                step == 204 and not quiet, f"status 'sent' is acknowledged ({step}), no report"
            )
            forged_status = await callback(status_form("delivered"), token=secrets.token_hex(16))
            quiet = await _reports(queue, 2.0)
            report.check(
                forged_status == 403 and not quiet,
                f"a callback with a wrong X-Twilio-Signature: {forged_status}, no report",
            )
            final = await callback(status_form("undelivered", "30007"))
            got = await _reports(queue, 10.0)
        parsed: DeliveryReported | None = None
        if len(got) == 1:
            incoming = got[0]
            command = parse_inbound(DELIVERY_REPORTED, incoming.body, incoming.content_type)
            assert isinstance(command, DeliveryReported)
            parsed = command
            report.check(
                incoming.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
                and incoming.content_type == "application/json",
                "the report is persistent, content type application/json",
            )
        report.check(
            final == 204
            and parsed is not None
            and parsed.idempotency_key == first.idempotency_key
            and parsed.status is DeliveryStatus.UNDELIVERED
            and parsed.error_code == "30007"
            and parsed.provider == "twilio",
            f"'undelivered' 30007 publishes one {DELIVERY_REPORTED} the project's schema accepts"
            f" ({final}, {len(got)} message(s))",
        )
        await connection.close()
        await db.close()
    finally:
        if gateway is not None:
            await gateway.aclose()
        if n8n is not None:
            await n8n.stop()
        await twilio.stop()
        await infra.drop()
    return report


def main() -> None:
    binary = os.environ.get("N8N_BIN", "n8n")
    with tempfile.TemporaryDirectory(prefix="followups-n8n-") as folder:
        try:
            report = asyncio.run(run(binary, Path(folder)))
        except Exception as exc:
            log = Path(folder) / "n8n" / "n8n.log"
            if log.exists():
                print(log.read_text()[-4000:], file=sys.stderr)
            raise SystemExit(f"n8n check could not run: {exc}") from exc
    print(f"{len(report.lines) - report.failed}/{len(report.lines)} checks passed")
    raise SystemExit(1 if report.failed else 0)


if __name__ == "__main__":
    main()
