"""The bench's webhook receiver in a process of its own: it answers each call, and the bench's
side mirrors every call it saw (time, headers, body), then stops the process."""

from __future__ import annotations

import time

import httpx

from testbed.webhook_process import RemoteWebhookReceiver


async def test_the_calls_it_receives_are_mirrored_in_order_and_the_process_stops():
    receiver = RemoteWebhookReceiver()
    await receiver.start()
    try:
        before = time.time()
        async with httpx.AsyncClient() as client:
            for n in (1, 2):
                answer = await client.post(
                    receiver.url,
                    content=f'{{"followup_id":{n}}}',
                    headers={"Idempotency-Key": f"k{n}"},
                )
                assert answer.status_code == 200
        await receiver.refresh()
        await receiver.refresh()  # nothing new: nothing added twice
    finally:
        await receiver.stop()
    assert [call.json for call in receiver.calls] == [{"followup_id": 1}, {"followup_id": 2}]
    assert [call.headers["idempotency-key"] for call in receiver.calls] == ["k1", "k2"]
    assert before <= receiver.calls[0].received_at <= receiver.calls[1].received_at <= time.time()
    assert receiver.process is not None
    assert receiver.process.poll() is not None
