"""The Grafana dashboard queries only metrics that exist, and shows every metric we define."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import REGISTRY

import shared.metrics
from shared.health import metrics_middleware

ROOT = Path(__file__).resolve().parents[2]
# From RabbitMQ's prometheus plugin (/metrics/per-object), scraped beside the services.
RABBITMQ_METRICS = {"rabbitmq_queue_messages", "rabbitmq_queue_consumers"}
_METRIC = re.compile(r"\b((?:followups|faststream|rabbitmq)_[a-z_]+)\b")


def exposed_names() -> dict[str, str]:
    """Every sample name the services expose, mapped to its metric family."""
    metrics_middleware("dashboard-check")  # registers FastStream's metrics on REGISTRY
    names: dict[str, str] = {}
    for family in REGISTRY.collect():
        suffixes = {
            "counter": ("_total",),
            "histogram": ("_bucket", "_sum", "_count"),
            "gauge": ("",),
        }.get(family.type, ("",))
        for suffix in suffixes:
            names[family.name + suffix] = family.name
    return names


def queried() -> set[str]:
    dashboard = json.loads((ROOT / "deploy/grafana/followups.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert exprs
    return {name for expr in exprs for name in _METRIC.findall(expr)}


def test_every_queried_metric_exists():
    known = set(exposed_names()) | RABBITMQ_METRICS
    missing = queried() - known
    assert not missing, f"the dashboard queries metrics nobody exposes: {sorted(missing)}"


def test_every_project_metric_is_on_the_dashboard():
    shown = {exposed_names().get(name) for name in queried()}
    ours = {
        metric._name
        for metric in vars(shared.metrics).values()
        if hasattr(metric, "_name") and hasattr(metric, "_type")
    }
    assert ours
    assert ours <= shown, f"not on the dashboard: {sorted(ours - shown)}"


def test_panels_do_not_overlap():
    dashboard = json.loads((ROOT / "deploy/grafana/followups.json").read_text())
    cells = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, panel["title"]
                cells.add((x, y))
