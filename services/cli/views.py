"""Commands that read the record: list, show and stats."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated, Any

import typer
from rich.table import Table

from services.cli.common import (
    console,
    fail,
    iso,
    load_settings,
    parse_moment,
    utcnow,
    with_pool,
)
from shared.queries import PENDING, Filter, Stats, find_followups, history, stats
from shared.send_rate_store import RateReport, rate_report
from shared.store import Reference

_STATUSES = ("scheduled", "sending", "sent", "cancelled", "skipped", "failed")


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def _pct(value: float | None) -> str:
    return "" if value is None else f"{value:.1%}"


def list_(
    status: Annotated[
        list[str] | None,
        typer.Option(help="scheduled, sending, sent, cancelled, skipped, failed; repeatable"),
    ] = None,
    contractor: Annotated[int | None, typer.Option(help="contractor id")] = None,
    followup_type: Annotated[str | None, typer.Option("--type", help="follow-up type")] = None,
    due_after: Annotated[
        str | None, typer.Option(help="due at or after: now, -1h, 2h or an RFC 3339 time")
    ] = None,
    due_before: Annotated[str | None, typer.Option(help="due before: now, 30m, ...")] = None,
    overdue: Annotated[bool, typer.Option(help="pending although due: the repair sweep's work")] = (
        False
    ),
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 50,
) -> None:
    """Follow-ups in a table, by due time; the latest LIMIT that match, soonest first.

    Example: [bold]followups list --status scheduled --due-before 1h --type onboarding[/bold]
    """
    statuses = tuple(status or ())
    unknown = set(statuses) - set(_STATUSES)
    if unknown:
        raise fail(f"unknown status {', '.join(sorted(unknown))}; use {', '.join(_STATUSES)}", 2)
    now = utcnow()
    where = Filter(
        statuses=PENDING if overdue else statuses,
        contractor_id=contractor,
        followup_type=followup_type,
        due_after=parse_moment(due_after, now) if due_after else None,
        due_before=now if overdue else (parse_moment(due_before, now) if due_before else None),
        limit=limit,
    )
    rows = with_pool(load_settings(), lambda pool: find_followups(pool, where))
    table = Table(
        "id", "contractor", "type", "status", "prio", "due", "sent", "late ms", "tries", "text"
    )
    for r in reversed(rows):
        table.add_row(
            str(r.id),
            str(r.contractor_id),
            r.followup_type,
            r.status,
            str(r.priority),
            iso(r.scheduled_time),
            iso(r.sent_at),
            _ms(r.lateness_ms),
            str(r.attempts),
            r.text_source or "",
        )
    console.print(table)
    if len(rows) == limit:
        console.print(f"[dim]showing the latest {limit}; --limit shows more[/dim]")


_ROW_FIELDS = (
    "id",
    "contractor_id",
    "followup_type",
    "status",
    "status_reason",
    "priority",
    "scheduled_time",
    "sent_at",
    "sent_by",
    "attempts",
    "next_attempt_at",
    "last_error",
    "deferred_until",
    "deferred_reason",
    "message_tone",
    "requested_by",
    "idempotency_key",
    "send_key",
    "version",
    "is_recurring",
    "recurrence_interval_days",
    "occurrence",
    "series_id",
    "next_occurrence_id",
    "response_received_at",
    "delivery_status",
    "delivery_error_code",
    "delivery_reported_at",
    "created_at",
    "updated_at",
)


def _text_path(row: Any) -> str:
    """Where the text came from: the LLM, or the template and why."""
    if row.text_source is None:
        return "not prepared yet" if row.status in PENDING else "never prepared"
    if row.text_source == "ai":
        return f"ai (model {row.ai_model or '?'}, prompt {row.prompt_variant or '?'})"
    reason = row.text_fallback_reason
    return "template" + (f" (fallback: {reason})" if reason else "")


def show(
    followup_id: Annotated[int | None, typer.Argument(help="follow-up id")] = None,
    key: Annotated[str | None, typer.Option("--key", "-k", help="its idempotency key")] = None,
) -> None:
    """One follow-up: its row, text path, lateness, timeline and webhook attempts.

    Example: [bold]followups show 42[/bold]   or   [bold]followups show --key onboarding-17[/bold]
    """
    if (followup_id is None) == (key is None):
        raise fail("give exactly one of a follow-up ID or --key", 2)
    reference = Reference(followup_id=followup_id, idempotency_key=key)
    found = with_pool(load_settings(), lambda pool: history(pool, reference))
    if found is None:
        raise fail(f"no follow-up {followup_id if key is None else repr(key)}")
    row = found.followup
    table = Table(show_header=False, box=None, title=f"follow-up {row.id}", title_justify="left")
    for name in _ROW_FIELDS:
        value = getattr(row, name, None)
        table.add_row(name, iso(value) if hasattr(value, "isoformat") else str(value))
    table.add_row("text", _text_path(row))
    table.add_row("lateness ms", _ms(found.lateness_ms))
    console.print(table)
    timeline = Table("at", "stage", "from", "to", "detail", title="timeline", title_justify="left")
    for t in found.transitions:
        timeline.add_row(
            iso(t.at), t.stage, t.from_status or "", t.to_status or "", json.dumps(t.detail)
        )
    console.print(timeline)
    if found.calls:
        calls = Table(
            "attempt",
            "called",
            "finished",
            "outcome",
            "http",
            title="webhook calls",
            title_justify="left",
        )
        for c in found.calls:
            calls.add_row(
                str(c.attempt),
                iso(c.called_at),
                iso(c.finished_at),
                c.outcome or "",
                "" if c.http_status is None else str(c.http_status),
            )
        console.print(calls)


def _stats_json(result: Stats, send_rate: RateReport) -> str:
    data = asdict(result)
    data["response_rate"] = result.response_rate
    for group in ("by_prompt_variant", "by_tone"):
        for item, rate in zip(data[group], getattr(result, group), strict=True):
            item["rate"] = rate.rate
    data["send_rate"] = asdict(send_rate)
    return json.dumps(data, default=str, indent=2)


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
        str | None, typer.Option(help="only follow-ups due since: -7d, -24h or a time")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Counts by status and type, response rates, time to response, send lateness, and the
    adaptive send rate with its last changes.

    Example: [bold]followups stats --since -7d[/bold]   or   [bold]followups stats --json[/bold]
    """
    start = parse_moment(since, utcnow()) if since else None
    settings = load_settings()

    async def _read(pool: Any) -> tuple[Stats, RateReport]:
        return await stats(pool, start), await rate_report(pool, settings.sms_rate_limit_per_minute)

    result, send_rate = with_pool(settings, _read)
    if as_json:
        console.print_json(_stats_json(result, send_rate))
        return
    window = f"due since {iso(start)}" if start else "all time"
    console.print(f"[bold]{result.total}[/bold] follow-ups, {window}")
    by_type = Table("type", *_STATUSES, title="by type and status", title_justify="left")
    for followup_type, counts in result.by_type.items():
        by_type.add_row(followup_type, *(str(counts.get(s, 0)) for s in _STATUSES))
    by_type.add_row("[bold]all[/bold]", *(str(result.by_status.get(s, 0)) for s in _STATUSES))
    console.print(by_type)
    median = result.median_response_seconds
    summary = Table(show_header=False, box=None)
    summary.add_row("responses", f"{result.responded} of {result.sent} sent")
    summary.add_row("response rate", _pct(result.response_rate))
    summary.add_row("median time to response", "" if median is None else f"{median:.0f} s")
    summary.add_row(
        "lateness p50 / p99 / max ms",
        " / ".join(
            _ms(v) for v in (result.lateness_p50_ms, result.lateness_p99_ms, result.lateness_max_ms)
        ),
    )
    console.print(summary)
    for title, rates in (("prompt variant", result.by_prompt_variant), ("tone", result.by_tone)):
        table = Table(
            title, "sent", "responded", "rate", title=f"responses by {title}", title_justify="left"
        )
        for rate in rates:
            table.add_row(rate.group, str(rate.sent), str(rate.responded), _pct(rate.rate))
        console.print(table)
    _print_send_rate(send_rate)
