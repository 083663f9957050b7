"""Personalizer wiring: settings, broker, pool and the due-timer subscriber."""

from __future__ import annotations

from functools import partial

from faststream import FastStream

from services.personalizer.handlers import PersonalizerDeps, handle
from shared.consumer import Handler
from shared.service import Runtime, create_service_app
from shared.settings import Settings
from shared.timers import utcnow
from shared.topology import PERSONALIZER_DUE


def _handler(runtime: Runtime) -> Handler:
    deps = PersonalizerDeps(store=runtime.store, timer=runtime.timer, clock=utcnow)
    return partial(handle, deps=deps)


def create_app(settings: Settings) -> FastStream:
    return create_service_app("personalizer", settings, PERSONALIZER_DUE, _handler, prefetch=16)
