"""Each running service answers /healthz, /readyz and /metrics, and its metrics move with work."""

from __future__ import annotations

import json
import os
import re

import httpx

from testbed.infra import broker_node
from testbed.processes import ServiceProcess
from tests.e2e.conftest import request_followup, soon, wait_for_final
from tests.support.data import add_contractor


def http_port(service: ServiceProcess) -> int:
    for line in service.log_text().splitlines():
        if "http endpoints listening" in line:
            return int(json.loads(line)["port"])
    raise AssertionError(f"{service.name} never said where it listens:\n{service.log_text()}")


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of every sample of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if match and all(f'{k}="{v}"' in (match[1] or "") for k, v in labels.items()):
            total += float(match[2])
    return total


async def test_every_service_serves_health_readiness_and_metrics(pool, bus, start_services):
    services = start_services()
    ports = {name: http_port(services[name]) for name in services.services}
    assert len(set(ports.values())) == 3

    async with httpx.AsyncClient(timeout=10) as client:
        for name, port in ports.items():
            base = f"http://127.0.0.1:{port}"
            live = await client.get(f"{base}/healthz")
            assert live.status_code == 200, name
            ready = await client.get(f"{base}/readyz")
            assert ready.status_code == 200, ready.text
            own = {"sweep": "ok"} if name == "dispatcher" else {}
            assert ready.json() == {
                "status": "ready",
                "checks": {"broker": "ok", "database": "ok", "consumer": "ok", **own},
            }
            assert (await client.get(f"{base}/nothing")).status_code == 404

        contractor = await add_contractor(pool)
        await request_followup(bus, contractor, soon(1.5), idempotency_key="health-1")
        rows = await wait_for_final(pool, 1)
        assert [r["status"] for r in rows] == ["sent"], services.logs()[-3000:]

        scraped = {
            name: (await client.get(f"http://127.0.0.1:{port}/metrics")).text
            for name, port in ports.items()
        }

    scheduler, dispatcher = scraped["scheduler"], scraped["dispatcher"]
    received = metric(
        scheduler,
        "faststream_received_messages_total",
        app_name="scheduler",
        handler="followups.followup.requested",
    )
    assert received >= 1
    # A follow-up without AI gets one timer: its send.
    backend = broker_node().delay_backend
    assert metric(scheduler, "followups_timers_armed_total", backend=backend) == 1
    assert metric(dispatcher, "followups_sends_total", outcome="sent") == 1
    assert metric(dispatcher, "followups_send_lateness_seconds_count") == 1
    # The sweep's first pass runs at start.
    assert metric(dispatcher, "followups_sweep_last_pass_timestamp_seconds") > 0
    timer_handlers = set(re.findall(r'handler="(followups\.timers\.[^"]*)"', dispatcher))
    assert timer_handlers == {"followups.timers.followups.dispatcher.due"}
    lateness = metric(dispatcher, "followups_send_lateness_seconds_sum") * 1000
    print(f"\nhealth e2e: ports {ports}, one send, lateness {lateness:.1f} ms")


def nice_value(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        # The command name, in parentheses, may hold spaces: count fields after it.
        after_name = stat.read().rsplit(")", 1)[1].split()
    return int(after_name[16])


async def test_each_service_lowers_its_priority_by_cpu_nice(start_services):
    services = start_services(CPU_NICE="3")
    for name, service in services.services.items():
        assert service.process is not None
        assert nice_value(service.process.pid) == os.getpriority(os.PRIO_PROCESS, 0) + 3, name
