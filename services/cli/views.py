"""Commands that read the record: list and show (stats: services/cli/stats.py)."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime, timedelta, tzinfo
from typing import Annotated, Any

import typer
from rich import box
from rich.table import Table

from services.cli.common import (
    console,
    fail,
    iso,
    load_settings,
    milliseconds,
    parse_moment,
    print_json,
    utcnow,
    with_pool,
)
from services.cli.moments import duration, relative, short
from shared.queries import PENDING, Filter, Summary, find_followups, history
from shared.rows import Reference

STATUSES = ("scheduled", "sending", "sent", "cancelled", "skipped", "failed")


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
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Follow-ups in a table, by due time; the latest LIMIT that match, soonest first.

    The due time is relative to now ("in 10 s", "2 min ago"); the last column says why a pending
    one waits (quiet hours, a place in the send window, a retry) or how a final one ended. From
    100 columns it adds the clock time, priority and text source; from 140, more of the why.

    Example: [bold]followups list --status scheduled --due-before 1h --type onboarding[/bold]
    """
    statuses = tuple(status or ())
    unknown = set(statuses) - set(STATUSES)
    if unknown:
        raise fail(f"unknown status {', '.join(sorted(unknown))}; use {', '.join(STATUSES)}", 2)
    settings = load_settings()
    now = utcnow()
    where = Filter(
        statuses=PENDING if overdue else statuses,
        contractor_id=contractor,
        followup_type=followup_type,
        due_after=parse_moment(due_after, now) if due_after else None,
        due_before=now if overdue else (parse_moment(due_before, now) if due_before else None),
        limit=limit,
    )
    rows = with_pool(settings, lambda pool: find_followups(pool, where))
    if as_json:
        print_json([asdict(row) for row in reversed(rows)])
        return
    console.print(
        followups_table(list(reversed(rows)), now, settings.dispatch_max_attempts, console.width)
    )
    if len(rows) == limit:
        console.print(f"[dim]showing the latest {limit}; --limit shows more[/dim]")


def waiting_note(
    row: Summary,
    now: datetime,
    max_attempts: int,
    *,
    detail: bool = False,
    zone: tzinfo | None = None,
) -> str:
    """Why a pending follow-up has not gone yet, or how a final one ended; empty if nothing to say.

    A quiet-hours move sets `deferred_until` to its next attempt, a full send window keeps
    `waiting_since`, and a failed call leaves `last_error` with the attempts used so far.
    `detail` adds the window, the zone and the clock time of the next attempt."""
    if row.status in PENDING:
        when = row.next_attempt_at
        goes = ""
        if when is not None and when > now:
            goes = (
                f", goes {short(when, now)} ({relative(when, now)})"
                if detail
                else (f", goes {relative(when, now)}")
            )
        if row.waiting_since is not None:
            since = f" for {duration(now - row.waiting_since)}" if detail else ""
            return f"waiting for a send place{since}{goes}"
        if when is not None and when == row.deferred_until and row.deferred_reason:
            reason = row.deferred_reason if detail else row.deferred_reason.split(" ", 1)[0]
            return f"deferred: {reason.replace('_', ' ', 1)}{goes}"
        if row.status == "scheduled" and row.last_error and row.attempts > 0:
            return f"retry {row.attempts + 1}/{max_attempts}{goes}: {row.last_error}"
        return ""
    if row.status == "sent" and row.lateness_ms is not None:
        tries = f", try {row.attempts}" if row.attempts > 1 else ""
        reason = f"; {row.status_reason}" if row.status_reason else ""
        return f"{_late(row.lateness_ms)}{tries}{reason}"
    return row.status_reason or row.last_error or ""


def _late(ms: float) -> str:
    if ms >= 1000:
        return f"{duration(timedelta(milliseconds=ms))} late"
    return f"{ms:.1f} ms late" if ms >= 0 else f"{-ms:.1f} ms early"


WIDE = 100  # columns from which `list` adds the clock time, priority and text source
DETAILED = 140  # and from which the note gives the window, the zone and the clock time


def followups_table(
    rows: list[Summary], now: datetime, max_attempts: int, width: int, zone: tzinfo | None = None
) -> Table:
    """`followups list` for a terminal `width` columns wide: every column readable at 80; a wider
    terminal adds columns and detail, the due time stays short (in `zone`, None: the host's).
    Status and due never wrap or shorten; type and note wrap."""
    wide = width >= WIDE
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, collapse_padding=True)
    table.add_column("id", justify="right", no_wrap=True)
    table.add_column("contractor", justify="right", no_wrap=True)
    table.add_column("type", overflow="fold", max_width=20 if wide else 12)
    table.add_column("status", no_wrap=True, min_width=9)
    table.add_column("due", no_wrap=True, min_width=9)
    if wide:
        table.add_column(f"at ({now.astimezone(zone).tzname()})", no_wrap=True)
        table.add_column("prio", justify="right", no_wrap=True)
        table.add_column("text", no_wrap=True)
    table.add_column("note", overflow="fold")
    for r in rows:
        # a sent one shows the provider's word on it: sent/delivered, sent/failed
        status = f"{r.status}/{r.delivery_status}" if r.delivery_status else r.status
        cells = [str(r.id), str(r.contractor_id), r.followup_type, status]
        cells.append(relative(r.scheduled_time, now))
        if wide:
            cells += [short(r.scheduled_time, now, zone), str(r.priority), r.text_source or ""]
        cells.append(waiting_note(r, now, max_attempts, detail=width >= DETAILED, zone=zone))
        table.add_row(*cells)
    return table


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
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
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
    if as_json:
        print_json(
            {
                "followup": {name: getattr(row, name, None) for name in _ROW_FIELDS},
                "text": _text_path(row),
                "lateness_ms": found.lateness_ms,
                "transitions": [asdict(t) for t in found.transitions],
                "calls": [asdict(c) for c in found.calls],
            }
        )
        return
    table = Table(show_header=False, box=None, title=f"follow-up {row.id}", title_justify="left")
    for name in _ROW_FIELDS:
        value = getattr(row, name, None)
        table.add_row(name, iso(value) if hasattr(value, "isoformat") else str(value))
    table.add_row("text", _text_path(row))
    table.add_row("lateness ms", milliseconds(found.lateness_ms))
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
