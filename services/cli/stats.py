"""`followups stats`: counts by status and type, send lateness, the adaptive send rate and the
effectiveness dashboard's figures, in a terminal or as JSON."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime, timedelta
from typing import Annotated, Any

import typer
from rich.table import Table

from services.cli.common import (
    console,
    iso,
    load_settings,
    milliseconds,
    parse_moment,
    percent,
    utcnow,
    with_pool,
)
from services.cli.dashboard import heading
from services.cli.moments import duration
from services.cli.views import STATUSES
from shared.effectiveness import QUERIES, Window, figures
from shared.queries import Stats, stats
from shared.send_rate_store import RateReport, rate_report

EFFECTIVENESS_DAYS = timedelta(days=30)  # the window `stats` shows without --since, as Grafana


def _stats_json(
    result: Stats, send_rate: RateReport, window: Window, effect: dict[str, list[dict[str, Any]]]
) -> str:
    data = asdict(result)
    data["response_rate"] = result.response_rate
    for group in ("by_prompt_variant", "by_tone"):
        for item, rate in zip(data[group], getattr(result, group), strict=True):
            item["rate"] = rate.rate
    data["send_rate"] = asdict(send_rate)
    data["effectiveness"] = {"window": asdict(window), "figures": effect}
    return json.dumps(data, default=_json_value, indent=2)


def _json_value(value: Any) -> str:
    return value.isoformat() if isinstance(value, datetime) else str(value)


# How `stats` shows a column of the effectiveness figures (as the dashboard's units do).
_RATES = {"response_rate", "delivery_rate", "share", "opt_out_rate"}


def _cell(column: str, value: Any) -> str:
    if value is None:
        return ""
    if column in _RATES:
        return percent(value)
    if column == "median_response_seconds":
        return duration(timedelta(seconds=value))
    if isinstance(value, datetime):
        return iso(value)
    return str(value)


def _print_effectiveness(window: Window, effect: dict[str, list[dict[str, Any]]]) -> None:
    console.print(
        f"[bold]effectiveness[/bold] of follow-ups sent from {iso(window.start)}"
        f" until {iso(window.end)} (the dashboard's panels)"
    )
    for query in QUERIES:
        rows = effect[query.name]
        if not rows:
            console.print(f"{query.title}: nothing in this window")
            continue
        headers = (heading(query, c) for c in query.columns)
        table = Table(*headers, title=query.title, title_justify="left")
        for row in rows:
            table.add_row(*(_cell(c, row[c]) for c in query.columns))
        console.print(table)


def _print_send_rate(report: RateReport) -> None:
    console.print(f"send rate: [bold]{report.current}[/bold] per minute (ceiling {report.ceiling})")
    if not report.changes:
        return
    table = Table(
        "at", "limit", "from", "cause", "follow-up", title="last changes", title_justify="left"
    )
    for change in report.changes:
        table.add_row(
            iso(change.at),
            str(change.limit_per_minute),
            str(change.previous_limit),
            change.cause,
            "" if change.followup_id is None else str(change.followup_id),
        )
    console.print(table)


def stats_(
    since: Annotated[
        str | None,
        typer.Option(
            help="only follow-ups due (counts) or sent (effectiveness) since: -7d, a time"
        ),
    ] = None,
    until: Annotated[
        str | None, typer.Option(help="effectiveness: only follow-ups sent before this; now")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Counts by status and type, send lateness, the adaptive send rate with its last changes,
    and the effectiveness dashboard's figures: responses by type, tone, prompt variant, text
    source and local hour, delivery, error codes, opt-outs and the rate over time.

    The effectiveness figures count follow-ups sent in [--since, --until): by default the last
    30 days, as the dashboard opens.

    Example: [bold]followups stats --since -7d[/bold]   or   [bold]followups stats --json[/bold]
    """
    now = utcnow()
    start = parse_moment(since, now) if since else None
    settings = load_settings()
    window = Window(
        start or now - EFFECTIVENESS_DAYS,
        parse_moment(until, now) if until else now,
        settings.default_timezone,
    )

    async def _read(pool: Any) -> tuple[Stats, RateReport, dict[str, list[dict[str, Any]]]]:
        return (
            await stats(pool, start),
            await rate_report(pool, settings.sms_rate_limit_per_minute),
            await figures(pool, window),
        )

    result, send_rate, effect = with_pool(settings, _read)
    if as_json:
        console.print_json(_stats_json(result, send_rate, window, effect))
        return
    scope = f"due since {iso(start)}" if start else "all time"
    console.print(f"[bold]{result.total}[/bold] follow-ups, {scope}")
    by_type = Table("type", *STATUSES, title="by type and status", title_justify="left")
    for followup_type, counts in result.by_type.items():
        by_type.add_row(followup_type, *(str(counts.get(s, 0)) for s in STATUSES))
    by_type.add_row("[bold]all[/bold]", *(str(result.by_status.get(s, 0)) for s in STATUSES))
    console.print(by_type)
    median = result.median_response_seconds
    summary = Table(show_header=False, box=None)
    summary.add_row("responses", f"{result.responded} of {result.sent} sent")
    summary.add_row("response rate", percent(result.response_rate))
    summary.add_row("median time to response", "" if median is None else f"{median:.0f} s")
    summary.add_row(
        "lateness p50 / p99 / max ms",
        " / ".join(
            milliseconds(v)
            for v in (result.lateness_p50_ms, result.lateness_p99_ms, result.lateness_max_ms)
        ),
    )
    console.print(summary)
    _print_send_rate(send_rate)
    _print_effectiveness(window, effect)
