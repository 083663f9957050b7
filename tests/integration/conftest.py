from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from services.scheduler.repository import SchedulerRepository
from shared.bus import AmqpPublisher, make_broker
from shared.settings import Settings
from shared.timers import LevelsTimer


@pytest.fixture
async def broker(settings: Settings) -> AsyncIterator:
    broker = make_broker(settings.rabbitmq_url)
    await broker.connect()
    yield broker
    await broker.stop()


@pytest.fixture
async def publisher(settings: Settings) -> AsyncIterator[AmqpPublisher]:
    async with AmqpPublisher(settings.rabbitmq_url, name="tests") as publisher:
        yield publisher


@pytest.fixture
def levels_timer(publisher) -> LevelsTimer:
    return LevelsTimer(publisher)


@pytest.fixture
def store(pool: asyncpg.Pool) -> SchedulerRepository:
    return SchedulerRepository(pool)
