"""Local-time rules: contractors' time zones, quiet hours and recurring occurrences."""

from __future__ import annotations

from datetime import datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from shared.settings import QuietHours


def zone_for(name: str | None, default: ZoneInfo) -> tuple[ZoneInfo, bool]:
    """The contractor's zone, or the default; the flag says the stored name was unusable."""
    if not name:
        return default, False
    try:
        return ZoneInfo(name), False
    except (ZoneInfoNotFoundError, ValueError):
        return default, True


def _local(day: datetime, at: time, zone: ZoneInfo) -> datetime:
    return datetime.combine(day.date(), at, tzinfo=zone)


def quiet_until(moment: datetime, window: QuietHours | None, zone: ZoneInfo) -> datetime | None:
    """When `moment` falls inside the quiet window in `zone`, the instant the window ends."""
    if window is None:
        return None
    local = moment.astimezone(zone)
    now_t = local.time().replace(tzinfo=None)
    if window.start < window.end:
        inside = window.start <= now_t < window.end
        end_day = local
    else:  # the window wraps past midnight, e.g. 21:00-08:00
        inside = now_t >= window.start or now_t < window.end
        end_day = local + timedelta(days=1) if now_t >= window.start else local
    if not inside:
        return None
    return _local(end_day, window.end, zone)


def next_occurrence(
    scheduled_time: datetime, interval_days: int, zone: ZoneInfo, now: datetime
) -> datetime:
    """The same wall-clock time `interval_days` later in the contractor's zone (so 9:00 stays
    9:00 across a DST change), moved on by whole intervals until it lies in the future."""
    local = scheduled_time.astimezone(zone)
    wall = local.replace(tzinfo=None)
    step = 1
    while True:
        candidate = (wall + timedelta(days=interval_days * step)).replace(tzinfo=zone)
        # A wall time that does not exist (spring forward) resolves to the same instant as
        # the hour before; normalising through UTC gives the real instant.
        candidate = candidate.astimezone(ZoneInfo("UTC"))
        if candidate > now:
            return candidate
        step += 1
