"""Runs `followups …` in-process, as an operator would from a shell, against a test's own infra."""

from __future__ import annotations

import asyncio

from click.testing import Result
from typer.testing import CliRunner

from services.cli import common
from services.cli.main import app
from shared.settings import Settings
from testbed.infra import broker_node


async def followups(settings: Settings, *args: str, input: str | None = None, **env: str) -> Result:
    """Run one command in a worker thread (it runs its own event loop) and return its result."""
    environment = {
        "DATABASE_URL": settings.database_url,
        "RABBITMQ_URL": settings.rabbitmq_url,
        "DELAY_BACKEND": broker_node().delay_backend,
        **env,
    }
    if settings.rabbitmq_management_url:
        environment.setdefault("RABBITMQ_MANAGEMENT_URL", settings.rabbitmq_management_url)
    # Wide enough that no table cell wraps, so tests can look for whole phrases.
    common.console.width = common.err.width = 250
    return await asyncio.to_thread(
        CliRunner().invoke, app, list(args), input=input, env=environment, catch_exceptions=False
    )
