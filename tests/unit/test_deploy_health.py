"""The probes Kubernetes and compose use: liveness always answers, readiness names what is down."""

from __future__ import annotations

import httpx
import pytest
from faststream.asgi import AsgiFastStream
from faststream.rabbit import RabbitBroker

from shared.bus import AmqpPublisher
from shared.health import OK, Readiness, http_routes
from shared.metrics import MESSAGES, destination_label

UNREACHABLE = "amqp://guest:guest@127.0.0.1:1/"


class ScriptedReadiness(Readiness):
    """The real readiness with each dependency's answer given by the test."""

    def __init__(self, broker: str = OK, database: str = OK, consumer: str = OK) -> None:
        super().__init__(RabbitBroker(UNREACHABLE), AmqpPublisher(UNREACHABLE))
        self.answers = {"broker": broker, "database": database, "consumer": consumer}

    async def check_broker(self) -> str:
        return self.answers["broker"]

    async def check_database(self) -> str:
        return self.answers["database"]

    def check_consumer(self) -> str:
        return self.answers["consumer"]


async def _get(readiness: Readiness, path: str) -> httpx.Response:
    app = AsgiFastStream(readiness.broker, asgi_routes=http_routes(readiness))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://service") as client:
        return await client.get(path)


async def test_ready_when_everything_answers():
    response = await _get(ScriptedReadiness(), "/readyz")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ready",
        "checks": {"broker": "ok", "database": "ok", "consumer": "ok"},
    }


@pytest.mark.parametrize(
    "down",
    [
        {"broker": "not connected"},
        {"database": "unreachable (ConnectionRefusedError)"},
        {"consumer": "not consuming"},
    ],
)
async def test_not_ready_names_the_failing_dependency(down):
    response = await _get(ScriptedReadiness(**down), "/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "not ready"
    assert {k: v for k, v in body["checks"].items() if v != OK} == down


async def test_liveness_does_not_depend_on_anything():
    response = await _get(ScriptedReadiness(broker="x", database="y", consumer="z"), "/healthz")
    assert response.status_code == 200


async def test_unstarted_service_is_not_ready():
    readiness = Readiness(RabbitBroker(UNREACHABLE), AmqpPublisher(UNREACHABLE))
    assert await readiness.check_database() == "not started"
    assert readiness.check_consumer() == "not consuming"
    assert await readiness.check_broker() == "publishing connection down"


async def test_metrics_are_served_in_prometheus_text():
    MESSAGES.labels("scheduler", "accepted")
    response = await _get(ScriptedReadiness(), "/metrics")
    assert response.status_code == 200
    assert "followups_messages_total" in response.text


@pytest.mark.parametrize(
    ("exchange", "routing_key", "label"),
    [
        (
            "followups.timers.digit.1",
            "0.0.0.0.4.d.followups.dispatcher.due",
            "followups.timers.followups.dispatcher.due",
        ),
        (
            "followups.timers.deliver",
            "0." * 33 + "followups.personalizer.due",
            "followups.timers.followups.personalizer.due",
        ),
        (
            "followups.timers.delayed",
            "followups.dispatcher.due",
            "followups.timers.followups.dispatcher.due",
        ),
        ("followups", "followup.requested", "followups.followup.requested"),
        ("", "followups.dispatcher.due", "default.followups.dispatcher.due"),
    ],
)
def test_metric_labels_stay_bounded(exchange, routing_key, label):
    assert destination_label(exchange, routing_key) == label
