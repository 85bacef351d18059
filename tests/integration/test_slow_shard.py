"""A shard that hangs (here: a row lock held by another transaction, as a host cut off by
the network hangs) does not hold up the other shard's messages in the same batch, and
what its attempt stores in the end is stored once."""

from __future__ import annotations

import asyncio
import secrets

import asyncpg
import pytest

from core.settings import Settings
from fanout.sequencer import Sequenced, sequence
from storage import conversations
from storage.ids import IdGenerator
from storage.pools import ShardPools
from tests.integration.test_storage import new_message, users_on

pytestmark = pytest.mark.engines

BUDGET_S = 2.0


async def test_a_hung_shard_is_left_running_and_the_other_is_not_held_up(
    pools: ShardPools, ids: IdGenerator, settings: Settings
) -> None:
    tag = secrets.token_hex(4)
    convs = []
    for physical in (0, 1):
        a, b = users_on(pools, physical, 2, tag)
        conv = await conversations.create_group(pools, ids, a, [b], "c")
        assert pools.for_id(conv.id) == physical
        convs.append((conv.id, a))
    fast = new_message(convs[0][0], ids, convs[0][1], "m0")
    slow_msg = new_message(convs[1][0], ids, convs[1][1], "m1")
    # Hold the slow conversation's row: its shard's transaction waits on the lock.
    locker = await asyncpg.connect(settings.shard_dsns[1])
    tx = locker.transaction()
    await tx.start()
    await locker.execute("SELECT 1 FROM conversations WHERE id = $1 FOR UPDATE", convs[1][0])
    try:
        slow: dict[int, asyncio.Future[Sequenced]] = {}
        # The budget is the fast shard's too: ample for its transaction on a loaded
        # machine (the hung one never answers while the lock is held).
        out = await asyncio.wait_for(
            sequence(pools, [fast, slow_msg], budget_s=BUDGET_S, slow=slow), BUDGET_S + 10
        )
        assert [m.cid for m in out.stored] == ["m0"]
        assert out.held == [slow_msg]
        assert f"did not answer within {BUDGET_S} s" in out.errors[pools.names[1]]
        assert list(slow) == [1] and not slow[1].done()
    finally:
        await tx.rollback()
        await locker.close()
    # The lock gone, the attempt left running ends and stores the message...
    part = await asyncio.wait_for(slow[1], 10)
    assert [m.cid for m in part.stored] == ["m1"]
    # ...and the retry finds it stored: the same seq, not a second row.
    again = await sequence(pools, [slow_msg], budget_s=5)
    assert again.held == [] and again.stored == []
    assert [(m.cid, m.seq) for m in again.redelivered] == [("m1", part.stored[0].seq)]
