import io
from datetime import UTC, datetime, timedelta

import pytest

from services.dispatcher.gateway import (
    ConsoleSink,
    Outcome,
    SmsRequest,
    classify,
    parse_retry_after,
)
from shared.retry_policy import backoff

NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (200, Outcome.SENT),
        (202, Outcome.SENT),
        (204, Outcome.SENT),
        (408, Outcome.RETRY),
        (429, Outcome.RETRY),
        (500, Outcome.RETRY),
        (503, Outcome.RETRY),
        (301, Outcome.FAILED),
        (400, Outcome.FAILED),
        (401, Outcome.FAILED),
        (404, Outcome.FAILED),
        (422, Outcome.FAILED),
    ],
)
def test_status_classification_follows_the_contract(status, outcome):
    assert classify(status, None, NOW).outcome is outcome


def test_retry_after_in_seconds_or_as_a_date():
    assert parse_retry_after("2", NOW) == 2.0
    assert parse_retry_after("Sat, 28 Nov 2026 12:00:30 GMT", NOW) == 30.0
    assert parse_retry_after("soon", NOW) is None
    assert parse_retry_after("-5", NOW) == 0.0
    assert parse_retry_after("999999", NOW) == 3600.0
    assert classify(429, "7", NOW).retry_after == 7.0


def test_backoff_grows_and_honours_retry_after():
    for attempt in range(1, 6):
        low = 2.0 * 2 ** (attempt - 1) / 2
        assert low <= backoff(attempt, None).total_seconds() <= 2 * low
    assert backoff(1, 30.0) >= timedelta(seconds=30)


async def test_console_sink_says_it_did_not_send_and_masks_the_phone():
    stream = io.StringIO()
    result = await ConsoleSink(stream).send(
        SmsRequest(
            phone="+14155552671",
            message="Hi Sam",
            contractor_id=1,
            followup_id=9,
            followup_type="check_in",
            scheduled_time=NOW,
            idempotency_key="k",
            attempt=1,
            priority=0,
        )
    )
    out = stream.getvalue()
    assert result.outcome is Outcome.SENT
    assert "NOT SENT" in out
    assert "Hi Sam" in out
    assert "4155552671" not in out
    assert ConsoleSink.sent_by != "dispatcher"
