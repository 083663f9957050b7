"""A deployment whose work queues an earlier release declared (delivery limit and dead-letter
target as x-arguments) keeps sending; after `followups declare --migrate-queues` with the
services stopped, the queues take their policies and a follow-up armed before the move is sent
on time after it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from shared.bus import AmqpPublisher
from shared.db import create_pool
from shared.settings import DelayBackend, Settings
from testbed.infra import Infra
from testbed.processes import ServiceSet
from testbed.webhook import WebhookReceiver
from tests.e2e.conftest import request_followup, service_env, soon, wait_for_final
from tests.support.cli import followups
from tests.support.data import add_contractor
from tests.support.policies import declare_like_an_earlier_release, management


@pytest.fixture
async def upgraded() -> AsyncIterator[tuple[Settings, asyncpg.Pool]]:
    """A vhost and database of its own, the queues as an earlier release left them."""
    infra = await asyncio.to_thread(Infra.create, "upg")
    settings = Settings(
        database_url=infra.database_url,
        rabbitmq_url=infra.rabbitmq_url,
        rabbitmq_management_url=infra.rabbitmq_management_url,
        delay_backend=DelayBackend.LEVELS,
        quiet_hours="off",
    )
    pool = await create_pool(infra.database_url, max_size=4)
    try:
        await declare_like_an_earlier_release(settings)
        yield settings, pool
    finally:
        await pool.close()
        await infra.drop()


async def test_old_queues_keep_sending_and_move_without_losing_a_timer(
    upgraded, receiver: WebhookReceiver, tmp_path: Path
):
    settings, pool = upgraded
    contractor = await add_contractor(pool)
    services = ServiceSet(service_env(settings, receiver), tmp_path)
    services.start()
    try:
        async with AmqpPublisher(settings.rabbitmq_url, name="tests") as bus:
            await request_followup(bus, contractor, soon(2), idempotency_key="before-the-move")
            sent = await wait_for_final(pool, 1)
            assert [r["status"] for r in sent] == ["sent"], services.logs()[-3000:]
            assert "work queues declared by an earlier release" in services.logs()
            # Armed now, due after the move: its timer is in flight while the queues move.
            await request_followup(bus, contractor, soon(25), idempotency_key="across-the-move")
            await asyncio.sleep(1)
    finally:
        services.stop()

    moved = await followups(settings, "declare", "--migrate-queues")
    assert moved.exit_code == 0, moved.output
    assert "warning" not in moved.output
    async with management(settings) as api:
        info = await api.queue("followups.dispatcher.due") or {}
        assert info["arguments"] == {"x-queue-type": "quorum"}

    (tmp_path / "after").mkdir()
    services = ServiceSet(service_env(settings, receiver), tmp_path / "after")
    services.start()
    try:
        rows = await wait_for_final(pool, 2, timeout=60)
        assert [r["status"] for r in rows] == ["sent", "sent"], services.logs()[-3000:]
        assert "earlier release" not in services.logs()
        # Its own timer brought it, not the repair sweep.
        assert "re-armed lost timers" not in services.logs()
    finally:
        services.stop()
    assert len(receiver.calls) == 2
    second = rows[1]
    assert receiver.calls[1].received_at >= second["scheduled_time"].timestamp()
