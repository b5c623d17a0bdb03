"""The coalescer: a call alone when nothing is on its way, those that pile up meanwhile as
one batch once it returns; every call gets its own answer or error."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Sequence

import pytest

from services.common.coalesce import Coalescer

WHO: contextvars.ContextVar[str] = contextvars.ContextVar("who", default="nobody")


class Refused(Exception):
    """The receiver refused an item (or a batch holding it)."""


class Receiver:
    """Records each call; a call waits while `gate` is closed; refuses items named "bad"."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.contexts: list[str] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.down = False

    async def one(self, item: str) -> str:
        self.calls.append([item])
        self.contexts.append(WHO.get())
        await self.gate.wait()
        if self.down:
            raise ConnectionError("down")
        if item == "bad":
            raise Refused(item)
        return item.upper()

    async def many(self, items: list[str]) -> Sequence[str]:
        self.calls.append(list(items))
        self.contexts.append(WHO.get())
        await self.gate.wait()
        if self.down:
            raise ConnectionError("down")
        if "bad" in items:
            raise Refused("batch")
        return [item.upper() for item in items]


def coalescer(
    receiver: Receiver, max_batch: int = 100, linger_s: float = 0.0
) -> Coalescer[str, str]:
    return Coalescer(
        receiver.one,
        receiver.many,
        max_batch,
        split=lambda err: isinstance(err, Refused),
        linger_s=linger_s,
    )


async def submitted(send: Coalescer[str, str], item: str, who: str = "") -> asyncio.Task[str]:
    """Submits from a task of its own (in context `who`), and lets it reach the coalescer."""
    context = contextvars.copy_context()
    context.run(WHO.set, who or item)
    task = asyncio.get_running_loop().create_task(send.submit(item), context=context)
    await asyncio.sleep(0)
    return task


async def test_a_call_with_nothing_on_its_way_goes_at_once_alone() -> None:
    receiver = Receiver()
    send = coalescer(receiver)
    assert await send.submit("a") == "A"
    assert await send.submit("b") == "B"
    assert receiver.calls == [["a"], ["b"]]
    assert send.batches == 0


async def test_calls_that_pile_up_go_as_one_batch_once_the_call_on_its_way_returns() -> None:
    receiver = Receiver()
    send = coalescer(receiver)
    receiver.gate.clear()
    first = await submitted(send, "a")
    rest = [await submitted(send, item) for item in "bcd"]
    assert receiver.calls == [["a"]]  # the others wait for it
    assert send.waiting == 3
    receiver.gate.set()
    assert await first == "A"
    assert [await task for task in rest] == ["B", "C", "D"]  # each its own answer, in order
    assert receiver.calls == [["a"], ["b", "c", "d"]]
    assert send.batches == 1
    assert receiver.contexts[1] == "nobody"  # a batch runs in none of the callers' contexts


async def test_a_lone_waiter_goes_alone_in_its_own_callers_context() -> None:
    receiver = Receiver()
    send = coalescer(receiver)
    receiver.gate.clear()
    first = await submitted(send, "a", who="first")
    second = await submitted(send, "b", who="second")
    receiver.gate.set()
    assert (await first, await second) == ("A", "B")
    assert receiver.calls == [["a"], ["b"]]
    assert receiver.contexts == ["first", "second"]
    assert send.batches == 0


async def test_a_full_batch_goes_at_once_even_while_a_call_is_on_its_way() -> None:
    receiver = Receiver()
    send = coalescer(receiver, max_batch=2)
    receiver.gate.clear()
    tasks = [await submitted(send, item) for item in "abcde"]
    await asyncio.sleep(0)
    # a alone; b and c, then d and e, went as soon as they filled a batch.
    assert receiver.calls == [["a"], ["b", "c"], ["d", "e"]]
    assert send.waiting == 0
    receiver.gate.set()
    assert [await task for task in tasks] == ["A", "B", "C", "D", "E"]
    assert send.batches == 2


async def test_a_refused_batch_splits_and_each_call_gets_its_own_answer() -> None:
    receiver = Receiver()
    send = coalescer(receiver)
    receiver.gate.clear()
    first = await submitted(send, "a")
    rest = [await submitted(send, item) for item in ("b", "bad", "c")]
    receiver.gate.set()
    assert await first == "A"
    results = await asyncio.gather(*rest, return_exceptions=True)
    assert results[0] == "B" and results[2] == "C"
    assert isinstance(results[1], Refused)
    assert receiver.calls == [["a"], ["b", "bad", "c"], ["b"], ["bad"], ["c"]]


async def test_a_batch_that_cannot_be_delivered_fails_every_call_in_it() -> None:
    receiver = Receiver()
    send = coalescer(receiver)
    receiver.gate.clear()
    first = await submitted(send, "a")
    rest = [await submitted(send, item) for item in "bc"]
    receiver.down = True
    receiver.gate.set()
    for task in [first, *rest]:
        with pytest.raises(ConnectionError):
            await task
    assert receiver.calls == [["a"], ["b", "c"]]  # not split: each alone would fail alike
    receiver.down = False
    assert await send.submit("d") == "D"  # and the next call goes at once


async def test_a_call_handed_over_is_sent_even_when_its_caller_stops_waiting() -> None:
    receiver = Receiver()
    send = coalescer(receiver)
    receiver.gate.clear()
    first = await submitted(send, "a")
    gone = await submitted(send, "b")
    stays = await submitted(send, "c")
    gone.cancel()
    receiver.gate.set()
    assert (await first, await stays) == ("A", "C")
    assert gone.cancelled()
    assert receiver.calls == [["a"], ["b", "c"]]


async def test_a_cancelled_call_on_its_way_lets_the_waiting_ones_go() -> None:
    receiver = Receiver()
    send = coalescer(receiver)
    receiver.gate.clear()
    first = await submitted(send, "a")
    second = await submitted(send, "b")
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.sleep(0)
    assert receiver.calls == [["a"], ["b"]]
    receiver.gate.set()
    assert await second == "B"


async def test_a_batch_answered_short_fails_each_call_and_does_not_wedge() -> None:
    receiver = Receiver()

    async def short(items: list[str]) -> Sequence[str]:
        await receiver.many(items)
        return [items[0].upper()]

    send = Coalescer(receiver.one, short, 100)
    receiver.gate.clear()
    first = await submitted(send, "a")
    rest = [await submitted(send, item) for item in "bc"]
    receiver.gate.set()
    assert await first == "A"
    for task in rest:
        with pytest.raises(RuntimeError, match="1 answers to a batch of 2"):
            await task
    assert await send.submit("d") == "D"


async def test_with_a_linger_calls_submitted_within_it_go_as_one_batch_when_it_ends() -> None:
    receiver = Receiver()
    send = coalescer(receiver, linger_s=0.05)
    first, second = await submitted(send, "a"), await submitted(send, "b")
    await asyncio.sleep(0.01)
    assert receiver.calls == []  # still lingering
    assert await first == "A" and await second == "B"
    assert receiver.calls == [["a", "b"]]
    # Then a call alone lingers too, and goes alone in its submitter's context.
    assert await (await submitted(send, "c", who="carol")) == "C"
    assert receiver.calls[-1] == ["c"] and receiver.contexts[-1] == "carol"


async def test_a_flush_ends_the_linger_at_once() -> None:
    receiver = Receiver()
    send = coalescer(receiver, linger_s=60)
    first, second = await submitted(send, "a"), await submitted(send, "b")
    send.flush()
    assert await asyncio.wait_for(asyncio.gather(first, second), 2) == ["A", "B"]
    assert receiver.calls == [["a", "b"]]
    send.flush()  # nothing lingers: nothing to do
    third = await submitted(send, "c")
    send.flush()
    assert await asyncio.wait_for(third, 2) == "C"


async def test_a_batch_that_fills_while_lingering_goes_at_once() -> None:
    receiver = Receiver()
    send = coalescer(receiver, max_batch=2, linger_s=60)
    first, second = await submitted(send, "a"), await submitted(send, "b")
    assert await asyncio.wait_for(asyncio.gather(first, second), 2) == ["A", "B"]
    third = await submitted(send, "c")
    await asyncio.sleep(0.01)
    assert not third.done()  # the linger started before the full batch still runs
    send.flush()
    assert await asyncio.wait_for(third, 2) == "C"
    assert receiver.calls == [["a", "b"], ["c"]]


async def test_a_call_sent_at_once_waits_for_no_linger_and_takes_the_lingering_along() -> None:
    receiver = Receiver()
    send = coalescer(receiver, linger_s=60)
    assert await asyncio.wait_for(send.submit("a", at_once=True), 2) == "A"
    lingering = await submitted(send, "b")
    urgent = send.submit("c", at_once=True)
    assert await asyncio.wait_for(asyncio.gather(lingering, urgent), 2) == ["B", "C"]
    assert receiver.calls == [["a"], ["b", "c"]]
