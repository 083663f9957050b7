"""Scheduler wiring: settings, broker, pool and the inbox subscriber."""

from __future__ import annotations

from datetime import timedelta
from functools import partial

from faststream import FastStream

from services.scheduler.handlers import SchedulerDeps, handle
from services.scheduler.repository import SchedulerRepository
from shared.consumer import Handler
from shared.deliveries import CarrierCodes, DeliveryStore
from shared.service import Runtime, create_service_app
from shared.settings import Settings
from shared.topology import SCHEDULER_INBOX

# Deliveries handled at once.
PREFETCH = 32


def _handler(runtime: Runtime) -> Handler:
    deps = SchedulerDeps(
        store=SchedulerRepository(runtime.pool, in_flight=PREFETCH),
        timer=runtime.timer,
        publisher=runtime.publisher,
        personalize_lead=timedelta(seconds=runtime.settings.personalize_lead_seconds),
        dispatch_margin=timedelta(milliseconds=runtime.settings.dispatch_margin_ms),
        clock=runtime.clock,
        deliveries=DeliveryStore(
            runtime.pool,
            runtime.settings.rate_policy,
            CarrierCodes(
                throttle=runtime.settings.throttle_codes,
                undeliverable=runtime.settings.undeliverable_codes,
            ),
        ),
    )
    return partial(handle, deps=deps)


def create_app(settings: Settings) -> FastStream:
    return create_service_app("scheduler", settings, SCHEDULER_INBOX, _handler, prefetch=PREFETCH)
