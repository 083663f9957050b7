"""The broker restarts while follow-ups fall due: the services reconnect and nothing is lost."""

from __future__ import annotations

import asyncio
import random
import subprocess

from testbed.infra import broker_node
from tests.e2e.conftest import request_followup, soon, wait_for_final
from tests.e2e.test_guarantees import assert_delivered_once_each
from tests.support.data import add_contractor


def rabbitmqctl(*args: str) -> None:
    subprocess.run(broker_node().cli(*args), check=True, capture_output=True, timeout=120)


async def test_broker_restart_mid_run_loses_nothing(pool, bus, receiver, start_services):
    contractors = [await add_contractor(pool) for _ in range(5)]
    services = start_services()
    for i in range(40):
        await request_followup(
            bus, contractors[i % 5], soon(random.uniform(3, 10)), idempotency_key=f"b-{i}"
        )
    await asyncio.sleep(4)
    await asyncio.to_thread(rabbitmqctl, "stop_app")
    try:
        await asyncio.sleep(3)
    finally:
        await asyncio.to_thread(rabbitmqctl, "start_app")
    rows = await wait_for_final(pool, 40, timeout=120)
    assert len(rows) == 40, services.logs()[-5000:]
    assert_delivered_once_each(receiver, rows)
    assert all(s.alive for s in services.services.values())
