"""The effectiveness dashboard (deploy/grafana/effectiveness.json), generated from the queries of
shared/effectiveness.py so the panels run the SQL the CLI and the tests run."""

from __future__ import annotations

import json
from typing import Any

from shared import effectiveness as fx

PLUGIN = "grafana-postgresql-datasource"
DATASOURCE = {"type": PLUGIN, "uid": "${datasource}"}

# Where each query goes: (panel type, x, y, width, height) on Grafana's 24-column grid, by row.
_ROWS: tuple[tuple[str, tuple[tuple[fx.Query, str, int, int], ...]], ...] = (
    (
        "Responses",
        (
            (fx.RESPONSES, "stat", 24, 4),
            (fx.BY_TYPE, "table", 12, 8),
            (fx.BY_TONE, "table", 12, 8),
            (fx.BY_PROMPT_VARIANT, "table", 12, 8),
            (fx.BY_TEXT_SOURCE, "table", 12, 8),
            (fx.BY_LOCAL_HOUR, "table", 24, 9),
        ),
    ),
    (
        "Delivery",
        ((fx.DELIVERY, "stat", 12, 7), (fx.ERROR_CODES, "table", 12, 7)),
    ),
    (
        "Opt-outs and the send rate",
        ((fx.OPT_OUTS, "table", 12, 8), (fx.SEND_RATE, "timeseries", 12, 8)),
    ),
)

# Column name: (how a panel or `followups stats` heads it, Grafana's unit).
COLUMNS = {
    "sent": ("sent", "none"),
    "responded": ("responded", "none"),
    "response_rate": ("response rate", "percentunit"),
    "median_response_seconds": ("median time to response", "s"),
    "reported": ("reported", "none"),
    "delivered": ("delivered", "none"),
    "undelivered": ("undelivered", "none"),
    "failed": ("failed", "none"),
    "delivery_rate": ("delivery rate", "percentunit"),
    "error_code": ("error code", "none"),
    "reports": ("reports", "none"),
    "share": ("share", "percentunit"),
    "opt_outs": ("opt-outs", "none"),
    "opt_out_rate": ("opt-out rate", "percentunit"),
    "limit_per_minute": ("per minute", "none"),
}


def heading(query: fx.Query, column: str) -> str:
    """How a panel and `followups stats` head a column of `query`."""
    if column == "group":
        return query.group_heading
    return COLUMNS[column][0] if column in COLUMNS else column


def _overrides(query: fx.Query) -> list[dict[str, Any]]:
    overrides = []
    for column in query.columns:
        unit = COLUMNS[column][1] if column in COLUMNS else None
        properties: list[dict[str, Any]] = [{"id": "displayName", "value": heading(query, column)}]
        if unit:
            properties.append({"id": "unit", "value": unit})
        if unit == "percentunit":
            properties.append({"id": "decimals", "value": 1})
        overrides.append({"matcher": {"id": "byName", "options": column}, "properties": properties})
    return overrides


def _options(kind: str) -> dict[str, Any]:
    if kind == "stat":
        return {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "none",
            "graphMode": "none",
            "textMode": "value_and_name",
        }
    if kind == "timeseries":
        return {"legend": {"displayMode": "list", "placement": "bottom"}}
    return {"showHeader": True, "cellHeight": "sm"}


def _panel(query: fx.Query, kind: str, panel_id: int, grid: dict[str, int]) -> dict[str, Any]:
    defaults: dict[str, Any] = {}
    if kind == "timeseries":
        defaults = {
            "custom": {"lineInterpolation": "stepAfter", "showPoints": "always"},
            "min": 0,
        }
    return {
        "type": kind,
        "title": query.title,
        "description": query.description,
        "datasource": DATASOURCE,
        "id": panel_id,
        "gridPos": grid,
        "fieldConfig": {"defaults": defaults, "overrides": _overrides(query)},
        "options": _options(kind),
        "targets": [
            {
                "datasource": DATASOURCE,
                "refId": query.name,
                "editorMode": "code",
                "rawQuery": True,
                "format": "time_series" if query.time_series else "table",
                "rawSql": query.sql,
            }
        ],
    }


def _panels() -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = []
    y = 0
    for title, row in _ROWS:
        panels.append(
            {
                "type": "row",
                "title": title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "id": len(panels) + 1,
                "panels": [],
            }
        )
        y += 1
        x = height = 0
        for query, kind, width, h in row:
            if x + width > 24:
                x, y, height = 0, y + height, 0
            grid = {"h": h, "w": width, "x": x, "y": y}
            panels.append(_panel(query, kind, len(panels) + 1, grid))
            x, height = x + width, max(height, h)
        y += height
    return panels


def effectiveness_dashboard() -> dict[str, Any]:
    return {
        "title": "followups effectiveness",
        "uid": "followups-effectiveness",
        "description": (
            "What the follow-ups achieve, from the record in PostgreSQL: responses, delivery,"
            " opt-outs and the adaptive send rate (queries of shared/effectiveness.py; read with"
            " the role of deploy/grafana/readonly-role.sql)."
        ),
        "tags": ["followups", "sms", "postgresql"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "5m",
        "time": {"from": "now-30d", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "PostgreSQL",
                    "type": "datasource",
                    "query": PLUGIN,
                    "current": {},
                    "hide": 0,
                },
                {
                    "name": "default_timezone",
                    "label": "Zone of contractors without one (DEFAULT_TIMEZONE)",
                    "type": "textbox",
                    "query": "America/New_York",
                    "current": {"text": "America/New_York", "value": "America/New_York"},
                    "hide": 0,
                },
            ]
        },
        "annotations": {"list": []},
        "panels": _panels(),
    }


def effectiveness_text() -> str:
    return json.dumps(effectiveness_dashboard(), indent=2, ensure_ascii=False) + "\n"
