"""A handler's transient failure is tried again in the process, a bounded number of times, before
the message goes back to the broker; a rejection is never retried."""

from __future__ import annotations

import asyncpg
import pytest

from shared import consumer
from shared.consumer import Incoming
from shared.errors import Rejected, RetryLater


@pytest.fixture(autouse=True)
def no_pauses(monkeypatch):
    monkeypatch.setattr(consumer, "RETRY_PAUSES", (0.0, 0.0, 0.0))


class Flaky:
    def __init__(self, failures: list[Exception]) -> None:
        self.failures = failures
        self.calls = 0
        self.redelivered: list[bool] = []

    async def __call__(self, incoming: Incoming) -> None:
        self.calls += 1
        self.redelivered.append(incoming.redelivered)
        if self.failures:
            raise self.failures.pop(0)


INCOMING = Incoming(body=b"{}", routing_key="followup.requested")


async def test_a_transient_failure_is_tried_again_until_it_passes():
    handler = Flaky([RetryLater("broker busy"), ConnectionResetError()])
    await consumer._with_retries(handler, INCOMING)
    assert handler.calls == 3


async def test_a_deadlock_the_database_broke_is_tried_again():
    handler = Flaky([asyncpg.exceptions.DeadlockDetectedError("deadlock detected")])
    await consumer._with_retries(handler, INCOMING)
    assert handler.calls == 2


async def test_a_run_after_a_transient_failure_is_told_the_delivery_may_have_been_handled():
    """The failed run may have committed before its timer publish failed: the next run must
    know to arm it, as it would for the broker's redelivery."""
    handler = Flaky([RetryLater("publish not confirmed"), RetryLater("again")])
    await consumer._with_retries(handler, INCOMING)
    assert handler.redelivered == [False, True, True]


async def test_a_failure_that_outlasts_the_retries_goes_back_to_the_broker():
    handler = Flaky([RetryLater(str(n)) for n in range(10)])
    with pytest.raises(RetryLater):
        await consumer._with_retries(handler, INCOMING)
    assert handler.calls == 4


async def test_a_rejection_is_not_retried():
    handler = Flaky([Rejected("schema", "no such field")])
    with pytest.raises(Rejected):
        await consumer._with_retries(handler, INCOMING)
    assert handler.calls == 1
