"""`_done_within` (gateway/send.py): the send path's wait for the broker's ack, bounded,
that never cancels the delivery future it waits for (a record cannot be taken back)."""

from __future__ import annotations

import asyncio

from gateway.send import _done_within


async def test_done_within_answers_when_the_future_is_done() -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[int] = loop.create_future()
    loop.call_later(0.01, fut.set_result, 1)
    assert await _done_within(fut, 5)
    assert await _done_within(fut, 0)  # done already


async def test_done_within_gives_up_without_cancelling_the_future() -> None:
    fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    assert not await _done_within(fut, 0.01)
    assert not fut.done()
    assert not fut._callbacks  # type: ignore[attr-defined]  # its callback removed
    fut.set_result(1)


async def test_a_cancelled_waiter_leaves_the_future_alone() -> None:
    fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    waiting = asyncio.ensure_future(_done_within(fut, 5))
    await asyncio.sleep(0)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert not fut.cancelled() and not fut._callbacks  # type: ignore[attr-defined]
