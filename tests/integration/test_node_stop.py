"""Node.stop ends every task of the node whatever each was doing when it was stopped: here
the route update of a subscription that just ended. A cancellation can be lost on the way
(redis-py 8.1's pipeline swallows one that lands as it starts: the pipeline completes and
returns, its task left "cancelling"), and RouteSync.run then went back to waiting for the
next change: `stop`, awaiting it, never returned (a gateway that would not exit on
SIGTERM). Real Redis and PostgreSQL; the links are recording sockets."""

from __future__ import annotations

import asyncio

import pytest

from gateway.protocol.frames import CloseCode
from tests.cancels import SwallowsOneCancel
from tests.integration.test_joined_delivery import Room, Socket, connect, room

pytestmark = pytest.mark.engines
__all__ = ["room"]  # the fixture


@pytest.mark.parametrize("round_", range(5))
async def test_stop_returns_with_a_route_update_just_started(room: Room, round_: int) -> None:
    conn = await connect(room, room.members[1], Socket())
    conn.close(CloseCode.SLOW_CONSUMER)  # detached: its conversation's route is dropped
    stopping = asyncio.ensure_future(room.node.stop())
    # A bound for the failure only (stop takes milliseconds when it works).
    done, _ = await asyncio.wait({stopping}, timeout=10)
    assert stopping in done, [t for t in room.node._tasks if not t.done()]
    assert all(t.done() for t in room.node._tasks)


async def test_stop_returns_when_a_presence_task_swallows_its_cancellation(room: Room) -> None:
    # Presence.stop cancelled its tasks once and awaited each: a thread-count task whose
    # pipeline swallowed the cancellation went back to its once-a-second loop, and the
    # node's stop never returned. The task here swallows one as that one did.
    counts_like = SwallowsOneCancel()
    task = room.node.presence._spawn(counts_like.loop())
    await counts_like.sleeping.wait()
    stopping = asyncio.ensure_future(room.node.stop())
    done, _ = await asyncio.wait({stopping}, timeout=10)
    assert stopping in done and task.cancelled() and counts_like.swallowed == 1
