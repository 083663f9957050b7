"""Group calls into batches the way a database groups commits: while one batch runs, the calls
that come meanwhile wait and go together in the next. A lone call goes at once unless its caller
lets it wait a little for company (`linger`): where there are seconds to spare, a call that
waits a few milliseconds shares its round trip, and the wake-ups on both ends of it, with the
calls that come meanwhile. On a machine at a hundred calls a second those wake-ups, not the work
itself, are most of what a call costs."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from operator import attrgetter
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(frozen=True)
class _Waiting(Generic[Item, Result]):
    item: Item
    future: asyncio.Future[Result]
    start_by: float  # on the event loop's clock: the latest its batch may start


class Coalescer(Generic[Item, Result]):
    """`await submit(item)` answers with `run(batch)`'s result for that item. `run` gets up to
    `max_batch` items in the order they came and answers one result per item, in that order; an
    exception it raises reaches every caller of that batch, and the next batch runs regardless.
    A batch starts when it is full, or when the item in it that may wait least has waited its
    `linger`, and never while another batch runs. A caller that is cancelled stops waiting; its
    item still runs with the batch it is in."""

    def __init__(
        self,
        run: Callable[[Sequence[Item]], Awaitable[Sequence[Result]]],
        *,
        max_batch: int,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._run = run
        self._max_batch = max_batch
        self._waiting: list[_Waiting[Item, Result]] = []
        # Made with the runner, on the loop it runs on: a coalescer may outlive one loop.
        self._arrived: asyncio.Event | None = None
        self._runner: asyncio.Task[None] | None = None

    async def submit(self, item: Item, *, linger: float = 0.0) -> Result:
        """`linger`: seconds this item may wait for others to join its batch."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        self._waiting.append(_Waiting(item, future, loop.time() + max(0.0, linger)))
        if self._runner is None:
            self._arrived = asyncio.Event()
            self._runner = asyncio.create_task(self._run_batches(self._arrived))
        else:
            assert self._arrived is not None
            self._arrived.set()
        return await future

    async def _run_batches(self, arrived: asyncio.Event) -> None:
        try:
            while self._waiting:
                await self._gathered(arrived)
                batch = self._waiting[: self._max_batch]
                del self._waiting[: self._max_batch]
                try:
                    await self._answer(batch)
                except BaseException:
                    # Stopped itself (the loop shuts down): nobody may wait for an answer.
                    for waiting in batch + self._waiting:
                        waiting.future.cancel()
                    self._waiting.clear()
                    raise
        finally:
            self._runner = None
            self._arrived = None

    async def _gathered(self, arrived: asyncio.Event) -> None:
        """Returns once the next batch is full or one of its items may wait no longer."""
        loop = asyncio.get_running_loop()
        while len(self._waiting) < self._max_batch:
            start_by = min(waiting.start_by for waiting in self._waiting[: self._max_batch])
            left = start_by - loop.time()
            if left <= 0:
                return
            arrived.clear()
            try:
                async with asyncio.timeout(left):
                    await arrived.wait()
            except TimeoutError:
                return

    async def _answer(self, batch: list[_Waiting[Item, Result]]) -> None:
        try:
            results = await self._run([waiting.item for waiting in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"{len(results)} results for a batch of {len(batch)}")
        except Exception as exc:
            for waiting in batch:
                if not waiting.future.done():
                    waiting.future.set_exception(exc)
            return
        for waiting, result in zip(batch, results, strict=True):
            if not waiting.future.done():
                waiting.future.set_result(result)


def linger_for(spare: timedelta, most: float) -> float:
    """How long a call with `spare` time before it is needed may wait for company: a tenth of
    that, at most `most` seconds; nothing when it is already due."""
    return max(0.0, min(most, spare.total_seconds() / 10))


def as_columns(items: Sequence[object], *names: str) -> list[list[Any]]:
    """A batch turned into one list per attribute, in `names`' order: the arrays a statement
    over many rows takes (`unnest($1, $2, …)`)."""
    return [[attrgetter(name)(item) for item in items] for name in names]
