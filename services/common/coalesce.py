"""Calls that pile up go together: one call on its way at a time, the rest as one batch.

A call submitted while none is on its way goes at once, alone, in its caller's task. Calls
submitted while one is on its way wait for it to return and then go together as one batch
call (a lone waiter goes alone, in its own caller's context, so its trace stays whole). The
busier the receiver, the longer a call takes and the more calls each batch carries: the
per-call cost (a gRPC round trip, its server handler, its span) is paid once per batch
instead of once per call. A batch is capped at `max_batch`; a full one goes at once even
while another is on its way.

With `linger_s`, a call submitted while none is on its way waits that long for others to
join it instead of going at once, as though a call were on its way: calls that do not need
to go at once (work after a reply) then go together even at low load, at most one call per
`linger_s` plus a round trip. `flush()` ends the wait when one of them is needed now, or
for good when the process stops.

A batch call that fails can be split: when `split(error)` says so (say, the receiver
refused one entry as invalid, or does not know the batch method), each of its calls goes
again alone and gets its own answer. Otherwise every call of the batch gets the error.

A call handed over is sent even when its submitter stops waiting (is cancelled): submitting
is handing over. The coalescer keeps its batch tasks referenced until they end."""

from __future__ import annotations

import asyncio
import contextvars
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

_Item = TypeVar("_Item")
_Result = TypeVar("_Result")


class Coalescer(Generic[_Item, _Result]):
    """Sends `one(item)` when nothing is on its way, else `many(items)` once it returns."""

    def __init__(
        self,
        one: Callable[[_Item], Awaitable[_Result]],
        many: Callable[[list[_Item]], Awaitable[Sequence[_Result]]],
        max_batch: int,
        split: Callable[[BaseException], bool] = lambda _: False,
        linger_s: float = 0.0,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if linger_s < 0:
            raise ValueError("linger_s must not be negative")
        self._linger_s = linger_s
        self._lingering: asyncio.TimerHandle | None = None
        self._one = one
        self._many = many
        self._max_batch = max_batch
        self._split = split
        self._waiting: deque[tuple[_Item, asyncio.Future[_Result], contextvars.Context]] = deque()
        self._on_the_way = 0
        self._sending: set[asyncio.Task[None]] = set()
        self.batches = 0
        """Batch calls made (calls that carried more than one item)."""

    async def submit(self, item: _Item, at_once: bool = False) -> _Result:
        """The item's answer (or its error), sent alone or in a batch. `at_once`: it waits
        for no linger (calls lingering go with it)."""
        if not self._on_the_way:
            self._on_the_way += 1
            if self._linger_s and not at_once:
                # The wait counts as a call on its way: what comes meanwhile joins this one.
                self._lingering = asyncio.get_running_loop().call_later(self._linger_s, self.flush)
            else:
                try:
                    return await self._one(item)
                finally:
                    self._on_the_way -= 1
                    self._pass_on()
        future: asyncio.Future[_Result] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future, contextvars.copy_context()))
        if len(self._waiting) >= self._max_batch:
            self._pass_on(full=True)
        elif at_once:
            self.flush()
        return await future

    def flush(self, stop: bool = False) -> None:
        """Sends what waits for the linger now (a no-op when nothing lingers); `stop`: and
        linger no more (the process is stopping)."""
        if stop:
            self._linger_s = 0.0
        if self._lingering is None:
            return
        self._lingering.cancel()
        self._lingering = None
        self._on_the_way -= 1
        self._pass_on()

    @property
    def waiting(self) -> int:
        """Calls waiting for the call on its way."""
        return len(self._waiting)

    def _pass_on(self, full: bool = False) -> None:
        """Sends what waits, as one call: when nothing is on its way, or a batch is full."""
        if not self._waiting or (self._on_the_way and not full):
            return
        batch = [self._waiting.popleft() for _ in range(min(self._max_batch, len(self._waiting)))]
        # A lone call runs in its submitter's context; a batch in none of the requests'.
        context = batch[0][2] if len(batch) == 1 else contextvars.Context()
        self._on_the_way += 1
        task = asyncio.get_running_loop().create_task(self._send(batch), context=context)
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(
        self, batch: list[tuple[_Item, asyncio.Future[_Result], contextvars.Context]]
    ) -> None:
        try:
            results = await self._results([item for item, _, _ in batch])
        except BaseException:
            # Cancelled (the loop is closing): the submitters learn it, then this ends.
            for _, future, _ in batch:
                if not future.done():
                    future.cancel()
            raise
        else:
            for (_, future, _), result in zip(batch, results, strict=True):
                if future.done():
                    continue  # its submitter stopped waiting
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
        finally:
            self._on_the_way -= 1
            self._pass_on()

    async def _results(self, items: list[_Item]) -> Sequence[_Result | BaseException]:
        """Each item's answer or error, as many as there are items."""
        try:
            if len(items) == 1:
                return [await self._one(items[0])]
            self.batches += 1
            results = await self._many(items)
            if len(results) != len(items):
                raise RuntimeError(f"{len(results)} answers to a batch of {len(items)}")
            return results
        except Exception as err:  # handed to each submitter
            if len(items) > 1 and self._split(err):
                return await asyncio.gather(
                    *(self._one(item) for item in items), return_exceptions=True
                )
            return [err] * len(items)
