from datetime import UTC, datetime, time
from zoneinfo import ZoneInfo

import pytest

from shared.calendar import next_occurrence, quiet_until, zone_for
from shared.settings import QuietHours

NEW_YORK = ZoneInfo("America/New_York")
BERLIN = ZoneInfo("Europe/Berlin")


def test_next_occurrence_keeps_the_wall_clock_time_across_spring_forward():
    nine_est = datetime(2026, 3, 7, 14, 0, tzinfo=UTC)  # Sat 9:00 EST; DST starts Sun 8 March
    following = next_occurrence(nine_est, 1, NEW_YORK, now=nine_est)
    assert following == datetime(2026, 3, 8, 13, 0, tzinfo=UTC)
    assert following.astimezone(NEW_YORK).time() == time(9, 0)


def test_next_occurrence_keeps_the_wall_clock_time_across_fall_back():
    nine_cest = datetime(2026, 10, 20, 7, 0, tzinfo=UTC)  # 9:00 in Berlin, DST ends 25 October
    following = next_occurrence(nine_cest, 7, BERLIN, now=nine_cest)
    assert following == datetime(2026, 10, 27, 8, 0, tzinfo=UTC)
    assert following.astimezone(BERLIN).time() == time(9, 0)


def test_a_wall_time_that_does_not_exist_moves_forward_not_back():
    half_past_two = datetime(2026, 3, 7, 7, 30, tzinfo=UTC)  # 2:30 EST; 8 March has no 2:30
    following = next_occurrence(half_past_two, 1, NEW_YORK, now=half_past_two)
    assert following.astimezone(NEW_YORK).time() == time(3, 30)
    assert following > half_past_two


def test_next_occurrence_skips_ahead_of_now():
    start = datetime(2026, 1, 1, 15, 0, tzinfo=UTC)
    now = datetime(2026, 1, 10, 12, 0, tzinfo=UTC)
    assert next_occurrence(start, 3, NEW_YORK, now=now) == datetime(2026, 1, 10, 15, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("local", "window", "end"),
    [
        (datetime(2026, 6, 1, 22, 30), "21:00-08:00", datetime(2026, 6, 2, 8, 0)),
        (datetime(2026, 6, 2, 6, 0), "21:00-08:00", datetime(2026, 6, 2, 8, 0)),
        (datetime(2026, 6, 2, 12, 0), "21:00-08:00", None),
        (datetime(2026, 6, 2, 8, 0), "21:00-08:00", None),
        (datetime(2026, 6, 2, 13, 0), "12:00-14:00", datetime(2026, 6, 2, 14, 0)),
        (datetime(2026, 6, 2, 14, 0), "12:00-14:00", None),
    ],
)
def test_quiet_until_the_end_of_the_local_window(local, window, end):
    moment = local.replace(tzinfo=NEW_YORK)
    expected = end.replace(tzinfo=NEW_YORK) if end else None
    assert quiet_until(moment, QuietHours.parse(window), NEW_YORK) == expected


def test_quiet_hours_off_and_bad_values():
    assert QuietHours.parse("off") is None
    assert quiet_until(datetime.now(UTC), None, NEW_YORK) is None
    for bad in ("9pm-8am", "21:00", "10:00-10:00", "25:00-08:00"):
        with pytest.raises(ValueError):  # noqa: PT011 (the message differs per case)
            QuietHours.parse(bad)


def test_an_unusable_zone_falls_back_to_the_default_and_says_so():
    assert zone_for("Mars/Olympus_Mons", NEW_YORK) == (NEW_YORK, True)
    assert zone_for(None, NEW_YORK) == (NEW_YORK, False)
    assert zone_for("Europe/Berlin", NEW_YORK) == (BERLIN, False)
