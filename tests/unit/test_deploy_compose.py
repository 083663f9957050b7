"""docker compose and the image, checked offline (no Docker engine here): structure, variables,
users, and the development webhook sink run for real."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from shared.settings import Settings
from testbed.loopback import free_port

ROOT = Path(__file__).resolve().parents[2]
SETTINGS_VARIABLES = {name.upper() for name in Settings.model_fields}
APP_SERVICES = ("scheduler", "personalizer", "dispatcher")


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_runs_the_whole_system():
    services = compose()["services"]
    assert set(services) == {"rabbitmq", "postgres", "webhook-sink", "migrate", *APP_SERVICES}
    for name in APP_SERVICES:
        service = services[name]
        assert service["command"] == ["run", name]
        assert service["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
        assert service["depends_on"]["rabbitmq"] == {"condition": "service_healthy"}
        assert service["depends_on"]["postgres"] == {"condition": "service_healthy"}
        assert "/readyz" in " ".join(service["healthcheck"]["test"])
        assert service["read_only"] is True
        assert service["cap_drop"] == ["ALL"]
    assert "followups migrate && followups declare" in services["migrate"]["command"][-1]
    assert services["migrate"]["restart"] == "no"
    for name in ("rabbitmq", "postgres", "webhook-sink"):
        assert services[name]["healthcheck"]["test"]
    # The timed send outweighs the work with slack when the host is busy (default weight 1024).
    assert services["dispatcher"]["cpu_shares"] > 1024
    assert "cpu_shares" not in services["personalizer"]


def test_compose_sets_only_variables_the_settings_know():
    services = compose()["services"]
    for name in (*APP_SERVICES, "migrate"):
        environment = services[name]["environment"]
        assert set(environment) <= SETTINGS_VARIABLES, set(environment) - SETTINGS_VARIABLES
        settings = Settings(**{k.lower(): v for k, v in environment.items()})
        assert settings.http_port == 8080
        if name != "migrate":
            probe = " ".join(services[name]["healthcheck"]["test"])
            assert f":{settings.http_port}/readyz" in probe


def test_the_broker_image_is_4x_with_metrics_and_levels_timers():
    dockerfile = (ROOT / "deploy/rabbitmq/Dockerfile").read_text()
    assert re.search(r"^FROM rabbitmq:\$\{RABBITMQ_VERSION\}-management$", dockerfile, re.MULTILINE)
    (version,) = re.findall(r"^ARG RABBITMQ_VERSION=(\d+)\.(\d+)\.\d+$", dockerfile, re.MULTILINE)
    assert int(version[0]) >= 4
    assert "rabbitmq_prometheus" in dockerfile.split("RUN rabbitmq-plugins")[1]
    # No delayed-message plugin is built for 4.3 and later: compose runs the levels timers.
    assert "rabbitmq_delayed_message_exchange" not in dockerfile
    services = compose()["services"]
    assert services["rabbitmq"]["build"] == "deploy/rabbitmq"
    for name in (*APP_SERVICES, "migrate"):
        assert services[name]["environment"]["DELAY_BACKEND"] == "levels"


def test_the_service_image_is_small_and_unprivileged():
    dockerfile = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)", dockerfile, re.MULTILINE)
    assert stages == ["python:3.11-slim", "python:3.11-slim"]
    user = re.findall(r"^USER (\d+):(\d+)$", dockerfile, re.MULTILINE)
    assert user == [("10001", "10001")]
    deployment = yaml.safe_load_all((ROOT / "k8s/base/scheduler.yaml").read_text())
    pod = next(d for d in deployment if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == 10001
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignored[1] == "*"


def test_the_development_webhook_sink_answers_and_masks_phones():
    port = free_port()
    sink = subprocess.Popen(
        [sys.executable, str(ROOT / "deploy/webhook-sink/sink.py"), str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert sink.stdout is not None
        assert "nothing is sent" in sink.stdout.readline()
        payload = {"followup_id": 7, "phone": "+14155552671", "message": "Hi Sam"}
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/webhook/sms",
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json", "Idempotency-Key": "k-1"},
        )
        deadline = time.monotonic() + 10
        with urllib.request.urlopen(request, timeout=deadline - time.monotonic()) as response:
            assert response.status == 200
        line = json.loads(sink.stdout.readline())
        assert line["phone"] == "+*********71"
        assert line["idempotency_key"] == "k-1"
        assert line["sink"] == "NOT SENT"
    finally:
        sink.terminate()
        sink.wait(timeout=10)
        if sink.stdout is not None:
            sink.stdout.close()
