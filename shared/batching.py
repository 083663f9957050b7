"""Group calls into batches the way a database groups commits: while one batch runs, the calls
that come meanwhile wait and go together in the next. A lone call goes at once (no timer to
wait for a batch to fill), so a quiet service pays nothing and a busy one makes one round trip
for many calls."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from operator import attrgetter
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class Coalescer(Generic[Item, Result]):
    """`await submit(item)` answers with `run(batch)`'s result for that item. `run` gets up to
    `max_batch` items in the order they came and answers one result per item, in that order; an
    exception it raises reaches every caller of that batch, and the next batch runs regardless.
    A caller that is cancelled stops waiting; its item still runs with the batch it is in."""

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
        self._waiting: list[tuple[Item, asyncio.Future[Result]]] = []
        self._runner: asyncio.Task[None] | None = None

    async def submit(self, item: Item) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._runner is None:
            self._runner = asyncio.create_task(self._run_batches())
        return await future

    async def _run_batches(self) -> None:
        try:
            while self._waiting:
                batch = self._waiting[: self._max_batch]
                del self._waiting[: self._max_batch]
                try:
                    await self._answer(batch)
                except BaseException:
                    # Stopped itself (the loop shuts down): nobody may wait for an answer.
                    for _, future in batch + self._waiting:
                        future.cancel()
                    self._waiting.clear()
                    raise
        finally:
            self._runner = None

    async def _answer(self, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        try:
            results = await self._run([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"{len(results)} results for a batch of {len(batch)}")
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)


def as_columns(items: Sequence[object], *names: str) -> list[list[Any]]:
    """A batch turned into one list per attribute, in `names`' order: the arrays a statement
    over many rows takes (`unnest($1, $2, …)`)."""
    return [[attrgetter(name)(item) for item in items] for name in names]
