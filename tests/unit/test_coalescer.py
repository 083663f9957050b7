"""Calls grouped into batches while a batch runs, and a batch turned into the arrays of a
statement (shared.batching)."""

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import pytest

from shared.batching import Coalescer, as_columns, linger_for


class Recorder:
    """A batch function that keeps every batch it was given and can be held at will."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail_next: Exception | None = None

    async def __call__(self, batch: Sequence[int]) -> list[int]:
        self.batches.append(list(batch))
        await self.gate.wait()
        if self.fail_next is not None:
            failure, self.fail_next = self.fail_next, None
            raise failure
        return [item * 10 for item in batch]


async def test_a_lone_call_goes_at_once_as_a_batch_of_one():
    run = Recorder()
    coalescer = Coalescer(run, max_batch=8)
    assert await coalescer.submit(3) == 30
    assert run.batches == [[3]]


async def _batch_of_one_held(run: Recorder, coalescer: Coalescer) -> asyncio.Task[int]:
    """Item 1 submitted, its batch started and held at the gate."""
    run.gate.clear()
    first = asyncio.create_task(coalescer.submit(1))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    return first


async def test_calls_made_while_a_batch_runs_go_together_in_the_next():
    run = Recorder()
    coalescer = Coalescer(run, max_batch=8)
    first = await _batch_of_one_held(run, coalescer)
    later = [asyncio.create_task(coalescer.submit(item)) for item in (2, 3, 4)]
    await asyncio.sleep(0)
    run.gate.set()
    assert await asyncio.gather(first, *later) == [10, 20, 30, 40]
    assert run.batches == [[1], [2, 3, 4]]


async def test_a_batch_holds_at_most_max_batch_items_in_the_order_they_came():
    run = Recorder()
    coalescer = Coalescer(run, max_batch=2)
    results = await asyncio.gather(*(coalescer.submit(item) for item in range(5)))
    assert results == [0, 10, 20, 30, 40]
    assert run.batches == [[0, 1], [2, 3], [4]]


async def test_a_failed_batch_fails_each_of_its_callers_and_the_next_batch_still_runs():
    run = Recorder()
    coalescer = Coalescer(run, max_batch=2)
    run.fail_next = ConnectionResetError("database gone")
    outcomes = await asyncio.gather(
        *(coalescer.submit(item) for item in range(3)), return_exceptions=True
    )
    assert [type(outcome) for outcome in outcomes[:2]] == [ConnectionResetError] * 2
    assert outcomes[2] == 20
    assert await coalescer.submit(7) == 70


async def test_a_batch_answering_the_wrong_number_of_results_fails_its_callers():
    async def short(batch: Sequence[int]) -> list[int]:
        return list(batch)[:-1]

    coalescer = Coalescer(short, max_batch=4)
    with pytest.raises(RuntimeError, match="2 results for a batch of 3"):
        await asyncio.gather(*(coalescer.submit(item) for item in range(3)))


async def test_a_cancelled_caller_leaves_the_others_of_its_batch_answered():
    run = Recorder()
    coalescer = Coalescer(run, max_batch=8)
    run.gate.clear()
    gone = asyncio.create_task(coalescer.submit(1))
    kept = asyncio.create_task(coalescer.submit(2))
    await asyncio.sleep(0)
    gone.cancel()
    run.gate.set()
    assert await kept == 20
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert run.batches == [[1, 2]]


async def test_callers_are_not_left_waiting_when_the_batches_stop():
    run = Recorder()
    coalescer = Coalescer(run, max_batch=1)
    run.gate.clear()
    run.fail_next = asyncio.CancelledError()  # as when the loop shuts down mid-batch
    waiting = [asyncio.create_task(coalescer.submit(item)) for item in (1, 2)]
    await asyncio.sleep(0)
    run.gate.set()
    for task in waiting:
        with pytest.raises(asyncio.CancelledError):
            await task
    assert await coalescer.submit(3) == 30


def test_a_batch_must_hold_at_least_one_item():
    with pytest.raises(ValueError, match="at least 1"):
        Coalescer(Recorder(), max_batch=0)


@dataclass
class Pair:
    left: int
    right: str | None


def test_a_batch_becomes_one_list_per_attribute_in_the_order_asked():
    batch = [Pair(1, "a"), Pair(2, None)]
    assert as_columns(batch, "right", "left") == [["a", None], [1, 2]]
    assert as_columns([], "left") == [[]]


async def test_a_call_that_may_linger_waits_for_company_until_one_may_not():
    run = Recorder()
    coalescer = Coalescer(run, max_batch=8)
    patient = [asyncio.create_task(coalescer.submit(item, linger=60)) for item in (1, 2)]
    for _ in range(5):
        await asyncio.sleep(0)
    assert run.batches == []
    assert await coalescer.submit(3) == 30
    assert await asyncio.gather(*patient) == [10, 20]
    assert run.batches == [[1, 2, 3]]


async def test_a_lingering_call_goes_alone_once_its_linger_is_over():
    run = Recorder()
    coalescer = Coalescer(run, max_batch=8)
    assert await coalescer.submit(4, linger=0.01) == 40
    assert run.batches == [[4]]


async def test_a_full_batch_starts_without_waiting_out_the_linger():
    run = Recorder()
    coalescer = Coalescer(run, max_batch=2)
    assert await asyncio.gather(*(coalescer.submit(item, linger=60) for item in (5, 6))) == [
        50,
        60,
    ]
    assert run.batches == [[5, 6]]


async def test_calls_that_come_while_a_batch_runs_linger_no_longer_than_they_may():
    run = Recorder()
    coalescer = Coalescer(run, max_batch=8)
    first = await _batch_of_one_held(run, coalescer)
    second = asyncio.create_task(coalescer.submit(2, linger=60))
    urgent = asyncio.create_task(coalescer.submit(3))
    await asyncio.sleep(0)
    run.gate.set()
    assert await asyncio.gather(first, second, urgent) == [10, 20, 30]
    assert run.batches == [[1], [2, 3]]


def test_a_call_lingers_a_tenth_of_its_time_to_spare_at_most_and_not_at_all_when_due():
    assert linger_for(timedelta(seconds=8), 0.2) == 0.2
    assert linger_for(timedelta(milliseconds=500), 0.2) == pytest.approx(0.05)
    assert linger_for(timedelta(0), 0.2) == 0.0
    assert linger_for(timedelta(seconds=-3), 0.2) == 0.0
