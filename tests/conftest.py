"""Fixtures shared by every tier. Integration and e2e tests run against the real local
PostgreSQL and RabbitMQ, in a database and vhost of their own that are dropped at the end."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from shared.db import create_pool
from shared.policies import Management, QueueLimits, apply_policies
from shared.settings import DelayBackend, Settings
from shared.topology import declare_topology
from testbed.infra import Infra
from testbed.openai_server import OpenAIServer
from tests.support.infra import truncate


@pytest.fixture(scope="session")
async def infra() -> AsyncIterator[Infra]:
    created = Infra.create()
    try:
        await declare_topology(created.rabbitmq_url, backend="levels", queue_type="quorum")
        async with Management.from_settings(
            created.rabbitmq_url, created.rabbitmq_management_url
        ) as management:
            await apply_policies(management, QueueLimits())
        yield created
    finally:
        await created.drop()


@pytest.fixture(scope="session")
def settings(infra: Infra) -> Settings:
    return Settings(
        database_url=infra.database_url,
        rabbitmq_url=infra.rabbitmq_url,
        rabbitmq_management_url=infra.rabbitmq_management_url,
        delay_backend=DelayBackend.LEVELS,
        quiet_hours="off",
        log_format="json",
    )


@pytest.fixture(scope="session")
async def session_pool(infra: Infra) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(infra.database_url, max_size=10, application_name="followups-tests")
    yield pool
    await pool.close()


@pytest.fixture
async def pool(session_pool: asyncpg.Pool) -> asyncpg.Pool:
    await truncate(session_pool)
    return session_pool


@pytest.fixture
async def llm() -> AsyncIterator[OpenAIServer]:
    """An OpenAI-compatible server on loopback; tests program its replies."""
    server = OpenAIServer()
    await server.start()
    yield server
    await server.stop()
