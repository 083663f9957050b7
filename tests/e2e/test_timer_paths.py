"""The timer paths of a follow-up through the real services: a timer due at once must find its
row (timers are armed after the row is committed), and the repair sweep is never needed."""

from __future__ import annotations

from tests.e2e.conftest import request_followup, soon, wait_for_final
from tests.support.data import add_contractor


async def test_followups_due_at_once_are_sent_and_prepared_without_the_sweep(
    pool, bus, receiver, start_services
):
    contractor = await add_contractor(pool)
    # The sweep's next pass is ten minutes away: whatever is sent here went by its own timers.
    start_services(SWEEP_INTERVAL_SECONDS="600", PERSONALIZE_LEAD_SECONDS="10")
    for i in range(20):
        await request_followup(bus, contractor, soon(-1), idempotency_key=f"now-{i}")
        await request_followup(
            bus, contractor, soon(3), idempotency_key=f"ai-{i}", ai_should_personalize=True
        )
    rows = await wait_for_final(pool, 40, timeout=45)
    assert [r["status"] for r in rows] == ["sent"] * 40
    assert len(receiver.calls) == 40
    prepared = [r for r in rows if r["idempotency_key"].startswith("key:ai-")]
    # Prepared by the personalizer (the preparation was published at once, within its window),
    # not rendered by the dispatcher because the text was not ready.
    assert {r["text_fallback_reason"] for r in prepared} == {"ai_disabled"}
    assert all(r["prepared_version"] == r["version"] for r in prepared)
    plain = [r for r in rows if r["idempotency_key"].startswith("key:now-")]
    assert {(r["text_source"], r["text_fallback_reason"]) for r in plain} == {("template", None)}


async def test_far_ahead_one_lead_timer_asks_for_the_text_then_arms_the_send(
    pool, bus, receiver, start_services
):
    """With a one-second lead, a send 80 s ahead takes one timer of kind `lead` to the
    dispatcher (cheaper than two long timers), which then asks the personalizer for the text and
    arms the short send timer. The lead must exceed the dispatch margin by the time a text
    takes, or the send is claimed before its text is ready: the margin is 250 ms here."""
    contractor = await add_contractor(pool)
    start_services(
        SWEEP_INTERVAL_SECONDS="600", PERSONALIZE_LEAD_SECONDS="1", DISPATCH_MARGIN_MS="250"
    )
    for i in range(5):
        await request_followup(
            bus, contractor, soon(80 + i), idempotency_key=f"far-{i}", ai_should_personalize=True
        )
    rows = await wait_for_final(pool, 5, timeout=120)
    assert [r["status"] for r in rows] == ["sent"] * 5
    assert {r["text_fallback_reason"] for r in rows} == {"ai_disabled"}
    assert all(r["prepared_version"] == r["version"] for r in rows)
    for row in rows:
        [call] = receiver.calls_for(row["id"])
        assert call.received_at >= row["scheduled_time"].timestamp()
