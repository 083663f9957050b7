"""followup.delivery_reported at the edge: what is accepted, and each bad input's rule."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest

from shared.errors import InvalidMessage
from shared.schemas import DeliveryReported, DeliveryStatus, LifecycleEvent, parse_inbound

KEY = "6f1c2a8e-0000-4000-8000-000000000041"


def parse(**body) -> DeliveryReported:
    data = {"idempotency_key": KEY, "status": "delivered", **body}
    data.setdefault("reported_at", datetime.now(UTC).isoformat())
    report = parse_inbound(
        "followup.delivery_reported", json.dumps(data).encode(), "application/json"
    )
    assert isinstance(report, DeliveryReported)
    return report


def test_a_report_with_every_field():
    an_hour_ago = (datetime.now(UTC) - timedelta(hours=1)).replace(microsecond=0)
    eastern = an_hour_ago.astimezone(timezone(timedelta(hours=-5)))
    report = parse(
        status="undelivered",
        error_code="30007",
        provider="twilio",
        reported_at=eastern.isoformat(),
    )
    assert report.status is DeliveryStatus.UNDELIVERED
    assert report.error_code == "30007"
    assert report.reported_at == an_hour_ago


def test_error_code_and_provider_are_optional():
    report = parse()
    assert report.error_code is None
    assert report.provider is None


@pytest.mark.parametrize(
    ("changes", "mentions"),
    [
        ({"status": "read"}, "status"),
        ({"status": None}, "status"),
        ({"reported_at": "2026-12-01T09:00:00"}, "reported_at"),
        ({"reported_at": "yesterday"}, "reported_at"),
        ({"reported_at": 1764600000}, "RFC 3339"),
        ({"reported_at": "2020-01-01T00:00:00Z"}, "year"),
        ({"reported_at": (datetime.now(UTC) + timedelta(hours=1)).isoformat()}, "future"),
        ({"idempotency_key": ""}, "idempotency_key"),
        ({"error_code": 30007}, "error_code"),
    ],
)
def test_bad_reports_are_rejected_with_the_schema_rule(changes, mentions):
    with pytest.raises(InvalidMessage) as raised:
        parse(**changes)
    assert raised.value.rule == "schema"
    assert mentions in raised.value.detail


def test_a_field_the_report_does_not_have_is_ignored_not_kept():
    # Unknown fields are tolerated (README: Versioning the messages); a phone number sent along
    # goes nowhere: the model has no place for it.
    report = parse(phone="+14155552671")
    assert "phone" not in report.model_dump()


def test_a_report_without_its_key_or_time_is_rejected():
    for missing in ("idempotency_key", "reported_at", "status"):
        body = {
            "idempotency_key": KEY,
            "status": "failed",
            "reported_at": datetime.now(UTC).isoformat(),
        }
        body.pop(missing)
        with pytest.raises(InvalidMessage, match=missing):
            parse_inbound("followup.delivery_reported", json.dumps(body).encode(), None)


def test_the_events_carry_no_phone_or_text():
    fields = set(LifecycleEvent.model_fields)
    assert {"delivery_status", "error_code", "limit_per_minute", "cause"} <= fields
    assert not {"phone", "message", "text", "prepared_text"} & fields
