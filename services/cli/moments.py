"""How the CLI writes times for a person: short, relative to now, in a zone that says so."""

from __future__ import annotations

from datetime import datetime, timedelta, tzinfo


def relative(moment: datetime, now: datetime) -> str:
    """`in 10 s`, `2 min ago`, `in 10 h`, `in 3 d`, or `now`: one unit, rounded to the nearest."""
    seconds = (moment - now).total_seconds()
    span = round(abs(seconds))
    if span < 1:
        return "now"
    amount = _span(span)
    return f"in {amount}" if seconds > 0 else f"{amount} ago"


def _span(seconds: int) -> str:
    if seconds < 60:
        return f"{seconds} s"
    if (minutes := round(seconds / 60)) < 60:
        return f"{minutes} min"
    if (hours := round(seconds / 3600)) < 48:
        return f"{hours} h"
    return f"{round(seconds / 86400)} d"


def duration(delta: timedelta) -> str:
    """A length of time in the same words as `relative`: `10 s`, `5 min`, `10 h`."""
    return _span(round(abs(delta.total_seconds())))


def short(moment: datetime, now: datetime, zone: tzinfo | None = None) -> str:
    """`21:12:10` on the same local day as `now`, else `Dec 03 08:00`; `zone` None: the host's."""
    local = moment.astimezone(zone)
    if local.date() == now.astimezone(zone).date():
        return f"{local:%H:%M:%S}"
    return f"{local:%b %d %H:%M}"


def wall(moment: datetime, zone: tzinfo) -> str:
    """The local time and date in `zone`, with its abbreviation: `21:12:10 EST, Tue Dec 01`."""
    local = moment.astimezone(zone)
    return f"{local:%H:%M:%S %Z, %a %b %d}"


def clock(moment: datetime, zone: tzinfo | None = None) -> str:
    """To the millisecond, for events: `21:12:10.004`."""
    local = moment.astimezone(zone)
    return f"{local:%H:%M:%S}.{local.microsecond // 1000:03d}"
