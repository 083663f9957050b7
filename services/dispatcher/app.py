"""Dispatcher wiring: settings, broker, pool, the gateway and the due-timer subscriber."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from datetime import timedelta
from functools import partial
from typing import Any

from faststream import FastStream
from standardwebhooks import Webhook

from services.dispatcher.gateway import ConsoleSink, Gateway, WebhookGateway
from services.dispatcher.handlers import DispatcherDeps, handle
from services.dispatcher.repository import DispatchRepository
from services.dispatcher.sweep import Sweeper, SweepQueries, sweep_heartbeat
from shared.consumer import Handler
from shared.outbound_proxy import configured_proxy
from shared.service import Runtime, create_service_app
from shared.settings import Settings
from shared.topology import DISPATCHER_DUE
from shared.webhook_target import check_signing_secret, check_webhook_target, webhook_session


def make_gateway(settings: Settings) -> Gateway:
    if settings.n8n_outbound_webhook_url is None:
        return ConsoleSink()
    url = str(settings.n8n_outbound_webhook_url)
    proxy = configured_proxy(settings, url)
    check_webhook_target(
        url, allow_insecure=settings.webhook_allow_insecure, proxied=proxy is not None
    )
    connect = partial(
        webhook_session,
        allow_insecure=settings.webhook_allow_insecure,
        max_connections=settings.dispatch_concurrency,
        proxy=proxy,
        timeout_seconds=settings.webhook_timeout_seconds,
    )
    secret = settings.webhook_signing_secret
    if secret:
        check_signing_secret(secret.get_secret_value())
    signer = Webhook(secret.get_secret_value()) if secret else None
    return WebhookGateway(str(settings.n8n_outbound_webhook_url), connect, signer)


def create_app(settings: Settings) -> FastStream:
    gateway = make_gateway(settings)

    def _handler(runtime: Runtime) -> Handler:
        deps = DispatcherDeps(
            repository=DispatchRepository(runtime.pool),
            timer=runtime.timer,
            publisher=runtime.publisher,
            gateway=gateway,
            clock=runtime.clock,
            rate_limit_per_minute=settings.sms_rate_limit_per_minute,
            max_attempts=settings.dispatch_max_attempts,
            lease=timedelta(seconds=settings.webhook_timeout_seconds * 2 + 5),
            personalize_lead=timedelta(seconds=settings.personalize_lead_seconds),
            quiet_hours=settings.quiet_window,
            default_zone=settings.default_zone,
            margin=timedelta(milliseconds=settings.dispatch_margin_ms),
            call_lead=timedelta(milliseconds=settings.dispatch_call_lead_ms),
            calls_in_flight=asyncio.Semaphore(settings.dispatch_concurrency),
            rate_floor=settings.sms_rate_min_per_minute,
            recovery_deliveries=settings.sms_rate_recovery_deliveries,
        )
        return partial(handle, deps=deps)

    heartbeat = sweep_heartbeat(timedelta(seconds=settings.sweep_interval_seconds))

    def _sweep(runtime: Runtime) -> Coroutine[Any, Any, None]:
        sweeper = Sweeper(
            dsn=settings.database_url,
            store=SweepQueries(runtime.pool),
            timer=runtime.timer,
            clock=runtime.clock,
            interval=timedelta(seconds=settings.sweep_interval_seconds),
            grace=timedelta(seconds=settings.sweep_grace_seconds),
            lead=timedelta(seconds=settings.personalize_lead_seconds),
            heartbeat=heartbeat,
        )
        return sweeper.run_forever()

    app = create_service_app(
        "dispatcher",
        settings,
        DISPATCHER_DUE,
        _handler,
        # Send timers arrive up to a timer quantum plus the margin early and wait for their exact
        # instant in memory, holding a place meanwhile: at 800 follow-ups/s that is ~400.
        prefetch=max(512, settings.dispatch_concurrency * 4),
        background=[_sweep],
        checks={"sweep": heartbeat.check},
    )
    app.after_shutdown(gateway.aclose)
    return app
