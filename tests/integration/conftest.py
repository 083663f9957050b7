from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from shared.bus import BrokerPublisher, make_broker
from shared.settings import Settings
from shared.store import FollowupStore
from shared.timers import LevelsTimer


@pytest.fixture
async def broker(settings: Settings) -> AsyncIterator:
    broker = make_broker(settings.rabbitmq_url)
    await broker.connect()
    yield broker
    await broker.stop()


@pytest.fixture
def publisher(broker) -> BrokerPublisher:
    return BrokerPublisher(broker)


@pytest.fixture
def levels_timer(publisher) -> LevelsTimer:
    return LevelsTimer(publisher)


@pytest.fixture
def store(pool: asyncpg.Pool) -> FollowupStore:
    return FollowupStore(pool)
