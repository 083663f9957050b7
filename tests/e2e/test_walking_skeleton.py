"""A follow-up request goes through the three real services and reaches the webhook on time."""

from __future__ import annotations

import random
import statistics
import uuid

from tests.e2e.conftest import request_followup, soon, wait_for_final
from tests.support.data import add_contractor

CONTRACT_FIELDS = {
    "phone",
    "message",
    "contractor_id",
    "followup_id",
    "followup_type",
    "scheduled_time",
}


async def test_fifty_followups_arrive_once_each_on_time(pool, bus, receiver, start_services):
    contractors = [await add_contractor(pool, first_name=f"Sam{i}") for i in range(5)]
    services = start_services()
    for i in range(50):
        await request_followup(
            bus, contractors[i % 5], soon(random.uniform(2.0, 5.0)), idempotency_key=f"walk-{i}"
        )

    rows = await wait_for_final(pool, 50)
    assert len(rows) == 50, services.logs()[-4000:]
    assert {r["status"] for r in rows} == {"sent"}
    assert all(r["sent_by"] == "dispatcher" for r in rows)

    by_id = {r["id"]: r for r in rows}
    assert len(receiver.calls) == 50
    lateness = []
    for call in receiver.calls:
        payload = call.json
        assert payload.keys() >= CONTRACT_FIELDS
        row = by_id[payload["followup_id"]]
        assert payload["phone"] == "+14155552671"
        assert payload["message"].startswith("Hi Sam")
        assert "Rivera Roofing" in payload["message"]
        assert call.headers["idempotency-key"] == str(row["send_key"])
        uuid.UUID(call.headers["idempotency-key"])
        assert call.headers["content-type"] == "application/json"
        late_ms = (call.received_at - row["scheduled_time"].timestamp()) * 1000
        assert late_ms >= 0, f"follow-up {row['id']} arrived {-late_ms:.1f} ms early"
        lateness.append(late_ms)
    assert len({c.headers["idempotency-key"] for c in receiver.calls}) == 50
    lateness.sort()
    print(
        f"\ne2e lateness ms: p50={statistics.median(lateness):.1f} "
        f"p99={lateness[int(len(lateness) * 0.99) - 1]:.1f} max={lateness[-1]:.1f}"
    )
