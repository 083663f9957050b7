"""The system under test, as in production: its own database and vhost, the three services as
real processes, a loopback webhook receiver and an OpenAI-compatible stand-in."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import asyncpg

from bench.probes import BENCH_APPLICATION
from services.cli.runtime import child_environment
from shared.db import create_pool
from shared.timers import broker_has_plugin
from testbed import openai_server
from testbed.infra import PG_ADMIN, Infra, broker_node, rabbitmqctl
from testbed.openai_server import OpenAIServer
from testbed.processes import ServiceSet
from testbed.webhook_process import RemoteWebhookReceiver

SERVICES = ("scheduler", "personalizer", "dispatcher")
# With --replicas N these run N processes each; one personalizer waits on the model, not on CPU.
SCALED_OUT = ("scheduler", "dispatcher")
# Seconds each service may take to start: on a busy shared machine that can pass half a minute.
READY_TIMEOUT = 120.0
AI_TEXT = "Hi there, a quick check-in about your paperwork. Thanks!"


@dataclass(frozen=True)
class StackOptions:
    backend: str  # "levels" or "plugin"
    log_dir: Path
    ai_delay: float | None = None  # seconds the stand-in takes to answer; None: AI off
    lead: float = 10.0
    dispatch_concurrency: int = 20
    rate_limit_per_minute: int = 1_000_000
    queue_type: str = "quorum"
    log_level: str = "INFO"
    contractors: int = 1000
    replicas: int = 1  # processes of the scheduler and of the dispatcher each
    # The dispatchers' nice value: below 0 their timed sends go first when the cores are busy,
    # as a Kubernetes CPU request or compose's cpu_shares give them in a deployment.
    dispatcher_nice: int = 0
    # The scheduler and the personalizer at the niceness `followups run all` gives them (the
    # dispatcher's sends go first on busy cores); False: every service at the same priority.
    slack_nice: bool = True


async def plugin_available() -> bool:
    """Asks a throwaway vhost: a broker without the plugin closes the connection that asks."""
    name = f"followups_probe_{uuid.uuid4().hex[:10]}"
    await asyncio.to_thread(rabbitmqctl, "add_vhost", name)
    try:
        await asyncio.to_thread(rabbitmqctl, "set_permissions", "-p", name, "guest", *[".*"] * 3)
        return await broker_has_plugin(broker_node().vhost_url(name))
    finally:
        await asyncio.to_thread(rabbitmqctl, "delete_vhost", name)


def service_env(
    options: StackOptions, infra: Infra, webhook_url: str, openai_url: str | None
) -> dict[str, str]:
    return {
        "DATABASE_URL": infra.database_url,
        "RABBITMQ_URL": infra.rabbitmq_url,
        "RABBITMQ_MANAGEMENT_URL": infra.rabbitmq_management_url,
        "DELAY_BACKEND": options.backend,
        "DELAY_QUEUE_TYPE": options.queue_type,
        "N8N_OUTBOUND_WEBHOOK_URL": webhook_url,
        "WEBHOOK_ALLOW_INSECURE": "true",
        "QUIET_HOURS": "off",
        "SMS_RATE_LIMIT_PER_MINUTE": str(options.rate_limit_per_minute),
        "DISPATCH_CONCURRENCY": str(options.dispatch_concurrency),
        "PERSONALIZE_LEAD_SECONDS": str(options.lead),
        "LOG_FORMAT": "json",
        "LOG_LEVEL": options.log_level,
        "HTTP_PORT": "0",
        # Set either way, so a key in the caller's environment never reaches a real API.
        "OPENAI_API_KEY": openai_server.API_KEY if openai_url else "",
        "OPENAI_BASE_URL": openai_url or "http://127.0.0.1:9/v1",
        "OPENAI_MODEL": "loopback-model",
    }


class Stack:
    """`async with Stack(options) as stack:` everything up; on the way out everything started
    here is stopped (by its own handle) and the database and vhost are dropped."""

    def __init__(self, options: StackOptions) -> None:
        self.options = options
        self.infra: Infra | None = None
        # Its own process: its timestamps wait for no load generator nor model stand-in.
        self.receiver = RemoteWebhookReceiver()
        self.openai: OpenAIServer | None = None
        if options.ai_delay is not None:
            reply = dataclasses.replace(openai_server.Reply.text(AI_TEXT), delay=options.ai_delay)
            self.openai = OpenAIServer(openai_server.always(reply))
        self.services: ServiceSet | None = None
        self._pool: asyncpg.Pool | None = None
        self.contractor_ids: list[int] = []

    @property
    def pool(self) -> asyncpg.Pool:
        assert self._pool is not None, "the stack is not up"
        return self._pool

    @property
    def vhost(self) -> str:
        assert self.infra is not None
        return self.infra.name

    @property
    def rabbitmq_url(self) -> str:
        assert self.infra is not None
        return self.infra.rabbitmq_url

    def service_pids(self) -> dict[str, int]:
        assert self.services is not None
        pids = {}
        for name, service in self.services.services.items():
            assert service.process is not None
            pids[name] = service.process.pid
        return pids

    def broker_closed_connections(self) -> bool:
        return self.services is not None and "CONNECTION_FORCED" in self.services.logs()

    async def __aenter__(self) -> Stack:
        try:
            await self._up()
        except BaseException:
            await self._down()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self._down()

    async def _up(self) -> None:
        self.infra = await asyncio.to_thread(Infra.create, "bench")
        self._pool = await create_pool(
            self.infra.database_url, max_size=4, application_name=BENCH_APPLICATION
        )
        self.contractor_ids = await add_contractors(self._pool, self.options.contractors)
        await self.receiver.start()
        if self.openai is not None:
            await self.openai.start()
        env = service_env(
            self.options,
            self.infra,
            self.receiver.url,
            self.openai.base_url if self.openai else None,
        )
        self.options.log_dir.mkdir(parents=True, exist_ok=True)
        self.services = ServiceSet(env, self.options.log_dir, SERVICES, ready_timeout=READY_TIMEOUT)
        for name, process in self.services.services.items():
            process.env.update(self._priority(name))
        # Starting blocks while it waits for each service; the receivers keep serving meanwhile.
        await asyncio.to_thread(self.services.start)
        for replica in range(2, self.options.replicas + 1):
            for name in SCALED_OUT:
                await asyncio.to_thread(
                    self.services.add, f"{name}-{replica}", name, **self._priority(name)
                )
        if self.options.dispatcher_nice:
            for name, pid in self.service_pids().items():
                if name.startswith("dispatcher"):
                    # Raising a priority needs CAP_SYS_NICE: without it the run stops here.
                    os.setpriority(os.PRIO_PROCESS, pid, self.options.dispatcher_nice)

    def _priority(self, service: str) -> dict[str, str]:
        """What `followups run all` adds to `service`'s environment for its priority."""
        return child_environment(service, {}) if self.options.slack_nice else {}

    async def _down(self) -> None:
        if self.services is not None:
            await asyncio.to_thread(self.services.stop)
        with contextlib.suppress(Exception):
            await self.receiver.stop()
        if self.openai is not None:
            with contextlib.suppress(Exception):
                await self.openai.stop()
        if self._pool is not None:
            with contextlib.suppress(Exception):
                await self._pool.close()
        if self.infra is not None:
            await drop(self.infra)


async def drop(infra: Infra, patience: float = 120.0) -> None:
    """Drops the database, then the vhost. The broker is shared: someone else's test may have
    stopped it for a while (tests/e2e/test_broker_restart.py does), so the vhost is retried."""
    admin = await asyncpg.connect(PG_ADMIN)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{infra.name}" WITH (FORCE)')
    finally:
        await admin.close()
    deadline = time.monotonic() + patience
    while True:
        try:
            await asyncio.to_thread(rabbitmqctl, "delete_vhost", infra.name)
            return
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(3)


async def add_contractors(pool: asyncpg.Pool, count: int) -> list[int]:
    """Many contractors, so concurrent inserts don't all lock one contractor row."""
    rows = await pool.fetch(
        """INSERT INTO contractors (first_name, last_name, company_name, phone, timezone)
           SELECT 'Sam' || n, 'Rivera', 'Rivera Roofing', '+1415555' || lpad(n::text, 4, '0'),
                  'UTC'
           FROM generate_series(0, $1 - 1) AS n
           RETURNING id""",
        count,
    )
    return [row["id"] for row in rows]
