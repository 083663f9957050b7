"""Queue policies for the tests' own queues, and reading back what the broker applied."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from shared.policies import Management, QueueLimits, work_queue_policy
from shared.settings import Settings
from shared.topology import WorkQueue

# The management API shows a queue's policy with its statistics, every 5 s by default.
STATS_PATIENCE_SECONDS = 30.0


def management(settings: Settings) -> Management:
    return Management.from_settings(settings.rabbitmq_url, settings.rabbitmq_management_url)


@asynccontextmanager
async def work_queue_policy_for(
    settings: Settings, work: WorkQueue, limits: QueueLimits | None = None
) -> AsyncIterator[None]:
    """The policy `followups declare` gives a work queue, put before the test declares it (a
    queue takes the policy that exists when it is declared) and removed afterwards."""
    policy = work_queue_policy(work, limits or QueueLimits())
    async with management(settings) as api:
        await api.put_policy(policy)
        try:
            yield
        finally:
            await api.delete_policy(policy.name)


async def applied_policy(api: Management, queue: str, name: str) -> dict[str, Any]:
    """The queue as the management API shows it once policy `name` is the one applied."""
    deadline = time.monotonic() + STATS_PATIENCE_SECONDS
    while True:
        info = await api.queue(queue) or {}
        if info.get("policy") == name or time.monotonic() > deadline:
            return info
        await asyncio.sleep(0.5)
