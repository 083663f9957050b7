"""The Grafana dashboards: the Prometheus one queries only metrics that exist and shows every metric
we define; the PostgreSQL one (effectiveness) is generated from shared/effectiveness.py, runs its
queries on the templated data source, and macros become parameters the same way everywhere."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

import shared.metrics
from services.cli.dashboard import effectiveness_text
from shared import effectiveness as fx
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


@pytest.mark.parametrize("name", ["followups.json", "effectiveness.json"])
def test_panels_do_not_overlap(name):
    dashboard = json.loads((ROOT / "deploy/grafana" / name).read_text())
    cells = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, panel["title"]
                cells.add((x, y))


def effectiveness() -> dict:
    return json.loads((ROOT / "deploy/grafana/effectiveness.json").read_text())


def test_effectiveness_dashboard_is_up_to_date():
    committed = (ROOT / "deploy/grafana/effectiveness.json").read_text()
    assert committed == effectiveness_text(), (
        "deploy/grafana/effectiveness.json is out of date with shared/effectiveness.py:"
        " run `make docs` and commit it"
    )


def test_every_effectiveness_query_has_one_panel_on_the_templated_postgresql_source():
    dashboard = effectiveness()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "grafana-postgresql-datasource"
    assert variables["default_timezone"]["query"] == "America/New_York"
    targets = [t for p in dashboard["panels"] for t in p.get("targets", [])]
    assert sorted(t["refId"] for t in targets) == sorted(q.name for q in fx.QUERIES)
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert panel["datasource"]["uid"] == target["datasource"]["uid"] == "${datasource}"
            assert target["rawQuery"] is True
            assert target["editorMode"] == "code"
            query = next(q for q in fx.QUERIES if q.name == target["refId"])
            assert target["format"] == ("time_series" if query.time_series else "table")
            assert (
                panel["type"] == "timeseries"
                if query.time_series
                else panel["type"] != "timeseries"
            )


def test_every_query_is_bounded_by_the_time_range():
    for query in fx.QUERIES:
        assert fx.TIME_FROM in query.sql, query.name
        assert fx.TIME_TO in query.sql, query.name


def test_bind_numbers_each_macro_once_in_order_of_appearance():
    window = fx.Window(datetime(2025, 1, 1, tzinfo=UTC), datetime(2025, 2, 1, tzinfo=UTC), "UTC")
    sql, args = fx.bind(
        "SELECT '${default_timezone}' WHERE a < $__timeTo() AND b >= $__timeFrom()"
        " AND c < $__timeTo()",
        window,
    )
    assert sql == "SELECT $1 WHERE a < $2 AND b >= $3 AND c < $2"
    assert args == ["UTC", window.end, window.start]
    for query in fx.QUERIES:
        bound, values = fx.bind(query.sql, window)
        assert "$__" not in bound, query.name
        assert "${" not in bound, query.name
        assert len(values) == len(set(map(str, values))), query.name
