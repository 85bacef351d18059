"""gateway/sendorder.py: the produce order of a connection's pipelined sends."""

from __future__ import annotations

import asyncio

from gateway.sendorder import Turn


async def test_a_turn_waits_for_the_previous_one() -> None:
    first = Turn(None)
    second = Turn(first)
    waiting = asyncio.ensure_future(second.wait())
    await asyncio.sleep(0)
    assert not waiting.done()
    first.release()
    await asyncio.wait_for(waiting, 1)
    assert Turn(None).released is False


async def test_a_turn_released_early_counts_only_once_every_earlier_one_is() -> None:
    # A send refused at once (its turn released) behind a slow one: the send after both
    # must still wait for the slow one.
    slow = Turn(None)
    refused = Turn(slow)
    after = Turn(refused)
    refused.release()
    refused.release()  # idempotent: a second release does not skip the wait either
    waiting = asyncio.ensure_future(after.wait())
    for _ in range(3):
        await asyncio.sleep(0)
    assert not refused.released and not waiting.done()
    slow.release()
    await asyncio.wait_for(waiting, 1)
    assert refused.released


async def test_a_cancelled_waiter_does_not_cancel_the_previous_turn() -> None:
    first = Turn(None)
    second = Turn(first)
    waiting = asyncio.ensure_future(second.wait())
    await asyncio.sleep(0)
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert not first.released
    first.release()
    assert first.released


async def test_abandon_leaves_a_held_turn_to_the_send_path() -> None:
    held, free = Turn(None), Turn(None)
    held.held = True
    held.abandon()
    free.abandon()
    assert not held.released and free.released
    held.release()
    assert held.released


async def test_free_says_whether_wait_would_wait() -> None:
    first = Turn(None)
    second = Turn(first)
    assert first.free() and not second.free()
    first.release()
    assert second.free()
    await asyncio.wait_for(second.wait(), 1)
