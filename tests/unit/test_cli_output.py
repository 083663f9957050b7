"""What the CLI prints for a person: relative times, `list` at 80 and 120 columns, the quiet-hours
warning of `schedule`, the demo contractor's zone and `watch`'s lines."""

from __future__ import annotations

import io
import re
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from rich.console import Console
from typer.testing import CliRunner

from services.cli.commands import daytime_zone, due_lines, quiet_starts
from services.cli.main import app
from services.cli.moments import relative, short, wall
from services.cli.views import followups_table, waiting_note
from services.cli.watch import event_line
from services.dispatcher.gateway import ConsoleSink, Outcome, SmsRequest
from shared.calendar import quiet_until
from shared.queries import Summary
from shared.settings import QuietHours, Settings

NOW = datetime(2026, 12, 2, 2, 11, tzinfo=UTC)  # 21:11 in New York: inside 21:00-08:00
NIGHT = QuietHours.parse("21:00-08:00")
NEW_YORK = ZoneInfo("America/New_York")


@pytest.mark.parametrize(
    ("offset", "text"),
    [
        (0.4, "now"),
        (9.998, "in 10 s"),
        (59.4, "in 59 s"),
        (59.6, "in 1 min"),
        (-120, "2 min ago"),
        (3599, "in 1 h"),
        (10 * 3600 - 40, "in 10 h"),
        (47 * 3600, "in 47 h"),
        (-3 * 86400, "3 d ago"),
    ],
)
def test_relative_times_read_like_speech(offset, text):
    assert relative(NOW + timedelta(seconds=offset), NOW) == text


def test_short_times_drop_the_date_on_the_same_day():
    assert short(NOW + timedelta(minutes=5), NOW, UTC) == "02:16:00"
    assert short(NOW + timedelta(days=1), NOW, UTC) == "Dec 03 02:11"
    assert wall(NOW, NEW_YORK) == "21:11:00 EST, Tue Dec 01"


def _row(id_: int, status: str, due: datetime, **extra) -> Summary:
    fields = {
        "id": id_,
        "contractor_id": 1,
        "followup_type": "manual",
        "status": status,
        "priority": 0,
        "scheduled_time": due,
        "sent_at": None,
        "lateness_ms": None,
        "attempts": 0,
        "text_source": None,
    }
    return Summary(**(fields | extra))


MORNING = NOW + timedelta(hours=10)
ROWS = [
    _row(  # moved to the end of quiet hours (attempt not counted)
        1,
        "scheduled",
        NOW - timedelta(minutes=2),
        next_attempt_at=MORNING,
        deferred_until=MORNING,
        deferred_reason="quiet_hours 21:00-08:00 in America/New_York",
    ),
    _row(  # the send window is full: waits for its place
        2,
        "scheduled",
        NOW - timedelta(seconds=3),
        next_attempt_at=NOW + timedelta(seconds=4),
        waiting_since=NOW - timedelta(seconds=3),
        last_error="rate_limited",
        priority=5,
    ),
    _row(  # one failed call
        3,
        "scheduled",
        NOW - timedelta(seconds=30),
        next_attempt_at=NOW + timedelta(seconds=30),
        last_error="http_503",
        attempts=1,
    ),
    _row(
        4,
        "sent",
        NOW - timedelta(minutes=2),
        sent_at=NOW,
        lateness_ms=4.2,
        attempts=1,
        text_source="template",
        followup_type="payment_reminder_overdue",
    ),
    _row(5, "cancelled", NOW + timedelta(hours=3), status_reason="contractor called back"),
    _row(123456, "skipped", NOW + timedelta(days=3), status_reason="action_item_completed"),
    _row(7, "scheduled", NOW + timedelta(seconds=10)),
]
DUE = ["2 min ago", "3 s ago", "30 s ago", "2 min ago", "in 3 h", "in 3 d", "in 10 s"]


def _render(width: int) -> str:
    console = Console(width=width, file=io.StringIO(), color_system=None)
    console.print(followups_table(ROWS, NOW, 3, width, UTC))
    output = console.file.getvalue()
    assert isinstance(output, str)
    return output


def _first_lines(output: str) -> dict[str, str]:
    """Each row's first line, by id (the rows below the header rule)."""
    lines = output.splitlines()
    rule = next(i for i, line in enumerate(lines) if line.startswith("───"))
    found = {}
    for line in lines[rule + 1 :]:
        if match := re.match(r"^\s*(\d+)\s", line):
            found[match[1]] = line
    return found


def _notes(output: str) -> str:
    """The table's text with wrapped cells joined, enough to find a whole phrase."""
    return " ".join(" ".join(output.split()).split())


@pytest.mark.parametrize("width", [80, 120])
def test_list_is_readable_at_80_and_at_120_columns(width):
    output = _render(width)
    print(f"\n{output}")
    assert "…" not in output
    assert max(len(line) for line in output.splitlines()) <= width
    rows = _first_lines(output)
    assert sorted(rows, key=int) == [str(r.id) for r in sorted(ROWS, key=lambda r: r.id)]
    for row, due in zip(ROWS, DUE, strict=True):
        line = rows[str(row.id)]
        # Status in full and the due time short and relative, on the row's own line.
        assert re.search(rf"\s{row.status}\s+{re.escape(due)}(\s|$)", line), line
    text = _notes(output)
    for phrase in (
        "deferred: quiet hours",
        "waiting for a send place",
        "retry 2/3",
        "4.2 ms late",
        "contractor called back",
    ):
        assert phrase in text, phrase


def test_wider_terminals_add_columns_not_longer_timestamps():
    narrow, wide = _render(80), _render(120)
    header = next(line for line in wide.splitlines() if "status" in line)
    assert "prio" in header
    assert "text" in header
    assert "prio" not in narrow
    assert "template" in wide
    assert "template" not in narrow
    # The clock time is short: no date on the same day, no seconds' fractions or offsets.
    assert re.search(r"\s02:09:00\s", _first_lines(wide)["1"])
    assert "+00:00" not in wide
    assert "2026" not in wide


def test_very_wide_terminals_say_more_of_why():
    console = Console(width=160, file=io.StringIO(), color_system=None)
    console.print(followups_table(ROWS, NOW, 3, 160, UTC))
    text = _notes(console.file.getvalue())
    assert "deferred: quiet hours 21:00-08:00 in America/New_York, goes 12:11:00 (in 10 h)" in text


def test_notes_for_each_reason_to_wait():
    deferred, waiting, retry, sent, _, skipped, plain = ROWS
    assert waiting_note(deferred, NOW, 3) == "deferred: quiet hours, goes in 10 h"
    assert waiting_note(waiting, NOW, 3) == "waiting for a send place, goes in 4 s"
    assert waiting_note(retry, NOW, 3) == "retry 2/3, goes in 30 s: http_503"
    assert waiting_note(sent, NOW, 3) == "4.2 ms late"
    assert waiting_note(skipped, NOW, 3) == "action_item_completed"
    assert waiting_note(plain, NOW, 3) == ""
    # After its quiet-hours move came due, an old deferred_reason explains nothing any more.
    woke = _row(
        8,
        "scheduled",
        NOW - timedelta(hours=1),
        next_attempt_at=NOW - timedelta(minutes=1),
        deferred_until=NOW - timedelta(hours=2),
        deferred_reason="quiet_hours 21:00-08:00 in America/New_York",
    )
    assert waiting_note(woke, NOW, 3) == ""


def _settings(**values: str) -> Settings:
    return Settings(**values)  # type: ignore[arg-type]


def test_schedule_warns_inside_quiet_hours_and_says_when_it_goes():
    settings = _settings(quiet_hours="21:00-08:00", default_timezone="America/New_York")
    lines = due_lines(NOW + timedelta(seconds=10), NOW, settings, None)
    assert lines[0] == "  due 21:11:10 EST, Tue Dec 01 in America/New_York (in 10 s)"
    warning = " ".join(lines[1:])
    assert "inside quiet hours 21:00-08:00 in America/New_York" in warning
    # The dispatcher's own rule says 08:00 the next morning, and so does the warning.
    goes = quiet_until(NOW + timedelta(seconds=10), NIGHT, NEW_YORK)
    assert goes is not None
    assert wall(goes, NEW_YORK) == "08:00:00 EST, Wed Dec 02"
    assert "08:00:00 EST, Wed Dec 02 (in 11 h)" in warning


def test_schedule_says_nothing_of_quiet_hours_outside_them_or_when_off():
    daytime = _settings(quiet_hours="21:00-08:00")
    assert len(due_lines(NOW, NOW, daytime, "Asia/Tokyo")) == 1
    off = _settings(quiet_hours="off")
    assert len(due_lines(NOW, NOW, off, None)) == 1


def test_schedule_names_an_unusable_stored_zone():
    lines = due_lines(NOW, NOW, _settings(quiet_hours="off"), "Mars/Olympus")
    assert "unusable" in lines[1]
    assert "America/New_York" in lines[0]


@pytest.mark.parametrize("hour", range(24))
def test_the_demo_contractor_lives_where_it_is_daytime_at_any_hour(hour):
    now = datetime(2026, 12, 2, hour, 11, tzinfo=UTC)
    zone = daytime_zone(now, NIGHT, NEW_YORK)
    assert quiet_until(now, NIGHT, zone) is None
    assert quiet_starts(now, NIGHT, zone) - now >= timedelta(hours=1)
    if quiet_until(now, NIGHT, NEW_YORK) is None and (
        quiet_starts(now, NIGHT, NEW_YORK) - now >= timedelta(hours=1)
    ):
        assert zone == NEW_YORK  # the default whenever it stays daytime there for an hour


def test_the_demo_zone_is_the_default_without_quiet_hours():
    assert daytime_zone(NOW, None, NEW_YORK) == NEW_YORK


def test_watch_lines_read_one_event_each():
    scheduled = {
        "event": "followup.scheduled",
        "followup_id": 7,
        "contractor_id": 1,
        "followup_type": "manual",
        "status": "scheduled",
        "occurred_at": "2026-12-02T02:11:00.004+00:00",
        "scheduled_time": "2026-12-02T02:11:10+00:00",
    }
    line = event_line(scheduled)
    assert "follow-up 7" in line
    assert "contractor 1" in line
    assert "scheduled" in line
    assert "(in 10 s)" in line
    sent = scheduled | {"event": "followup.sent", "status": "sent", "lateness_ms": 4.25}
    assert "sent" in event_line(sent)
    assert "4.2 ms late" in event_line(sent)
    skipped = scheduled | {"event": "followup.skipped", "status": "skipped", "reason": "opted_out"}
    assert "opted_out" in event_line(skipped)
    assert "\n" not in event_line(skipped)


async def test_the_console_sink_shows_whom_what_when_due_when_out_and_how_late():
    stream = io.StringIO()
    request = SmsRequest(
        phone="+14155552671",
        message="Hi Sam, checking in.",
        contractor_id=1,
        followup_id=9,
        followup_type="manual",
        scheduled_time=datetime.now(UTC) - timedelta(milliseconds=5),
        idempotency_key="k",
        attempt=1,
        priority=0,
    )
    assert (await ConsoleSink(stream).send(request)).outcome is Outcome.SENT
    out = stream.getvalue()
    print(out)
    assert "NOT SENT" in out
    assert "to contractor 1 at +*********71" in out
    assert "text     Hi Sam, checking in." in out
    due = re.search(r"^due      (\S+ \S+) UTC$", out, re.M)
    went = re.search(r"^went out (\S+ \S+) UTC · ([\d,.]+) ms late$", out, re.M)
    assert due, out
    assert went, out
    due_at = request.scheduled_time
    assert due[1] == f"{due_at:%Y-%m-%d %H:%M:%S}.{due_at.microsecond // 1000:03d}"
    assert went[1] > due[1]
    assert float(went[2].replace(",", "")) >= 5


def test_schedule_refuses_what_the_scheduler_would_reject_before_publishing():
    runner = CliRunner()
    base = ["schedule", "-c", "1", "--in", "10s", "-t", "Hi"]
    lonely = runner.invoke(app, [*base, "--skip-if-completed"])
    assert lonely.exit_code == 2
    assert "skip_if_completed needs action_item_id" in lonely.output
    bad_hint = runner.invoke(app, [*base, "--hint", "no-equals-sign"])
    assert bad_hint.exit_code == 2
    assert "KEY=VALUE" in bad_hint.output
