"""Calls grouped into batches while a batch runs, and a batch turned into the arrays of a
statement (shared.batching)."""

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from shared.batching import Coalescer, as_columns


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


async def test_calls_made_while_a_batch_runs_go_together_in_the_next():
    run = Recorder()
    coalescer = Coalescer(run, max_batch=8)
    run.gate.clear()
    first = asyncio.create_task(coalescer.submit(1))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
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
