"""Wiring common to the three services: one FastStream app consuming one work queue."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import aiormq.exceptions
import asyncpg
from faststream import FastStream
from faststream.rabbit.message import RabbitMessage

from shared.bus import AmqpPublisher, make_broker
from shared.clock import DatabaseClock, DatabaseTime
from shared.consumer import Handler, consume, work_queue_subscriber
from shared.db import CONNECTION_ERRORS, create_pool
from shared.health import Readiness, ServiceApp, metrics_middleware
from shared.logging import configure_logging, get_logger
from shared.retry_policy import (
    STARTUP_FIRST_PAUSE_SECONDS,
    STARTUP_MAX_PAUSE_SECONDS,
    STARTUP_PATIENCE_SECONDS,
)
from shared.settings import Settings
from shared.timers import Clock, Timer, make_timer, resolve_backend
from shared.topology import WorkQueue, declare_topology

T = TypeVar("T")


_UNREACHABLE: tuple[type[BaseException], ...] = (
    *CONNECTION_ERRORS,
    aiormq.exceptions.AMQPConnectionError,
)


async def when_reachable(what: str, log: Any, attempt: Callable[[], Awaitable[T]]) -> T:
    """Start-up that rides out a broker or database that is still coming up (compose, k8s)."""
    deadline = asyncio.get_running_loop().time() + STARTUP_PATIENCE_SECONDS
    pause = STARTUP_FIRST_PAUSE_SECONDS
    while True:
        try:
            return await attempt()
        except _UNREACHABLE as exc:
            if asyncio.get_running_loop().time() + pause > deadline:
                raise
            log.warning(
                f"{what} not reachable yet; waiting",
                error=exc.__class__.__name__,
                retry_in_seconds=pause,
            )
            await asyncio.sleep(pause)
            pause = min(pause * 2, STARTUP_MAX_PAUSE_SECONDS)


@dataclass(frozen=True)
class Runtime:
    """What a service's handlers may use; built once when the service starts."""

    settings: Settings
    pool: asyncpg.Pool
    publisher: AmqpPublisher
    timer: Timer
    # The database's time: what the claim compares with and the calls are recorded in.
    clock: Clock


def create_service_app(
    name: str,
    settings: Settings,
    queue: WorkQueue,
    make_handler: Callable[[Runtime], Handler],
    *,
    prefetch: int,
    background: Sequence[Callable[[Runtime], Coroutine[Any, Any, None]]] = (),
    checks: Mapping[str, Callable[[], str]] | None = None,
) -> FastStream:
    """`background` jobs run beside the consumer once the broker is connected, until shutdown;
    `checks` join the readiness checks (each answers "ok" or why not)."""
    configure_logging(settings)
    log = get_logger(f"followups.{name}").bind(service=name)
    broker = make_broker(settings.rabbitmq_url, logger=log)
    broker.add_middleware(metrics_middleware(name))
    publisher = AmqpPublisher(settings.rabbitmq_url, name=name)
    readiness = Readiness(broker, publisher, checks=dict(checks or {}))
    handlers: list[Handler] = []
    runtimes: list[Runtime] = []
    jobs: list[asyncio.Task[None]] = []

    @work_queue_subscriber(broker, queue, prefetch=prefetch)
    async def on_message(message: RabbitMessage) -> None:
        await consume(message, queue, handlers[0], publisher)

    @asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        backend = await when_reachable(
            "broker", log, lambda: resolve_backend(settings.rabbitmq_url, settings.delay_backend)
        )
        legacy = await when_reachable(
            "broker",
            log,
            lambda: declare_topology(
                settings.rabbitmq_url, backend=backend, queue_type=settings.delay_queue_type
            ),
        )
        if legacy:
            # They work as before; only their policy can't change them (README: Queue policies).
            log.warning(
                "work queues declared by an earlier release",
                queues=legacy,
                fix="stop the services, then `followups declare --migrate-queues`",
            )
        await when_reachable("broker", log, publisher.connect)
        pool = await when_reachable(
            "database",
            log,
            lambda: create_pool(
                settings.database_url,
                # Opened before the first message, not during the first burst of sends.
                min_size=settings.db_pool_size,
                max_size=settings.db_pool_size,
                application_name=f"followups-{name}",
            ),
        )
        readiness.pool = pool
        clock = await when_reachable(
            "database", log, lambda: DatabaseClock.start(DatabaseTime(pool))
        )
        runtime = Runtime(
            settings=settings,
            pool=pool,
            publisher=publisher,
            timer=make_timer(backend, publisher, clock),
            clock=clock,
        )
        handlers.append(make_handler(runtime))
        runtimes.append(runtime)
        log.info(
            "service starting", queue=queue.name, timer_backend=backend.value, prefetch=prefetch
        )
        clock_sync = asyncio.create_task(
            clock.keep_in_sync(timedelta(seconds=settings.clock_sync_interval_seconds))
        )
        try:
            yield
        finally:
            clock_sync.cancel()
            await asyncio.gather(clock_sync, return_exceptions=True)
            await pool.close()
            await publisher.close()
            log.info("service stopped")

    app = ServiceApp(broker, name=name, readiness=readiness, lifespan=lifespan, logger=log)

    @app.after_startup
    async def freeze_startup_objects() -> None:
        # Modules, settings, clients and pools live as long as the process: out of the cyclic
        # collector's sight, a full collection no longer walks them and stalls the loop for tens
        # of milliseconds in the middle of a send.
        gc.freeze()

    @app.after_startup
    async def start_background() -> None:
        jobs.extend(asyncio.create_task(job(runtimes[0])) for job in background)

    @app.on_shutdown
    async def stop_background() -> None:
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)

    return app
