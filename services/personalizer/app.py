"""Personalizer wiring: settings, broker, pool, the LLM client and the due-timer subscriber."""

from __future__ import annotations

from datetime import timedelta
from functools import partial

from faststream import FastStream
from openai import AsyncOpenAI, DefaultAioHttpClient

from services.personalizer.handlers import PersonalizerDeps, handle
from services.personalizer.llm import OpenAIWriter, TextWriter
from services.personalizer.repository import PersonalizerRepository
from services.personalizer.variants import VariantPlan
from shared.consumer import Handler
from shared.logging import get_logger
from shared.outbound_proxy import configured_proxy
from shared.service import Runtime, create_service_app
from shared.settings import OPENAI_DEFAULT_BASE_URL, Settings
from shared.topology import PERSONALIZER_DUE


def make_writer(settings: Settings) -> TextWriter | None:
    key = settings.openai_api_key.get_secret_value().strip() if settings.openai_api_key else ""
    if not key:
        return None
    proxy = configured_proxy(settings, settings.openai_base_url or OPENAI_DEFAULT_BASE_URL)
    # Retries are the writer's (within the lead), so the SDK makes none of its own. The proxy
    # comes from the settings (environment or .env), as the webhook's does, not from the HTTP
    # client's own reading of the environment. The aiohttp transport (C HTTP parser) takes a
    # quarter less CPU per call than the SDK's default one.
    client = AsyncOpenAI(
        api_key=key,
        base_url=settings.openai_base_url,
        max_retries=0,
        http_client=DefaultAioHttpClient(proxy=proxy, trust_env=False),
    )
    return OpenAIWriter(client, settings.openai_model)


def create_app(settings: Settings) -> FastStream:
    variants = VariantPlan.parse(settings.prompt_variants)
    writer = make_writer(settings)

    def _handler(runtime: Runtime) -> Handler:
        log = get_logger("followups.personalizer")
        if writer is None:
            log.warning("AI personalisation off: OPENAI_API_KEY is not set; templates are sent")
        else:
            log.info("AI personalisation on", model=writer.model, prompt_variants=str(variants))
        deps = PersonalizerDeps(
            store=PersonalizerRepository(
                runtime.pool, in_flight=runtime.settings.personalize_concurrency
            ),
            timer=runtime.timer,
            publisher=runtime.publisher,
            clock=runtime.clock,
            writer=writer,
            variants=variants,
            personalize_lead=timedelta(seconds=settings.personalize_lead_seconds),
            dispatch_margin=timedelta(milliseconds=settings.dispatch_margin_ms),
            default_zone=settings.default_zone,
        )
        return partial(handle, deps=deps)

    app = create_service_app(
        "personalizer",
        settings,
        PERSONALIZER_DUE,
        _handler,
        prefetch=settings.personalize_concurrency,
    )
    if writer is not None:
        app.after_shutdown(writer.aclose)
    return app
