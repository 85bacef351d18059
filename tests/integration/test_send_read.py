"""The send path's shard read goes out before the produce waits for its turn
(gateway/send.py). A copy of the cid stored after that read, whose (partition, shard) a
proof then clears (gateway/idempotency.py, EpochWatch), must not be vouched for by the
proof: the send waits for the shard instead and answers the stored id. Real PostgreSQL,
Redis and broker, the send path in-process (no fan-out worker: nothing of this send's
own is stored)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import NamedTuple

import pytest
import redis.asyncio as aioredis

from core.settings import Settings
from fanout.kafka import ensure_topics, make_producer, messages_topic
from gateway.access import Access
from gateway.lookups import Found
from gateway.produceline import ProduceLine
from gateway.send import SendPath
from gateway.sendorder import Turn
from storage import conversations, messages
from storage.ids import IdGenerator
from storage.pools import ShardPools
from storage.redis_keys import RedisKeys
from tests.integration.test_storage import new_message, tag, users_on

pytestmark = pytest.mark.engines


class Parts(NamedTuple):
    path: SendPath
    line: ProduceLine


@pytest.fixture
async def parts(
    settings: Settings, pools: ShardPools, redis_client: aioredis.Redis
) -> AsyncIterator[Parts]:
    fresh = settings.with_overrides(kafka_topic_prefix=f"sr{secrets.token_hex(3)}")
    await ensure_topics(fresh)
    producer = make_producer(fresh)
    await producer.start()
    line = ProduceLine(producer, messages_topic(fresh))
    # Keys of the test's own: its epoch is made by its first claim, so it is young (every
    # send whose read finds nothing is suspect until its pair is proven).
    keys = RedisKeys(f"sr{secrets.token_hex(3)}:")
    path = SendPath(
        redis_client,
        keys,
        producer,
        messages_topic(fresh),
        Access(pools),
        window_s=60,
        produce_line=line,
    )
    try:
        yield Parts(path, line)
    finally:
        await line.close()
        await producer.stop()


async def test_a_pair_proven_after_the_read_went_out_does_not_vouch_for_it(
    parts: Parts, pools: ShardPools, ids: IdGenerator
) -> None:
    path, line = parts
    alice, bob = users_on(pools, 0, 2, tag())
    conv = (await conversations.create_group(pools, ids, alice, [bob], "chat")).id
    # The topic's metadata, for the line to know the conversation's partition (a send
    # would settle here: nothing of the test's own is ever stored).
    await path.producer.send_and_wait(path.topic, b"warm", key=str(conv).encode())
    cid = f"late-{tag()}"
    # The send waits for its turn behind an earlier send of its connection that has not
    # produced yet: its claim and shard read are done by then.
    before = Turn(None)
    turn = Turn(before)
    asked: list[asyncio.Future[Found]] = []
    ask = path.lookups.ask

    def recording_ask(conv: int, sender: str, cid: str) -> asyncio.Future[Found]:
        asked.append(ask(conv, sender, cid))
        return asked[-1]

    path.lookups.ask = recording_ask  # type: ignore[method-assign]
    task = asyncio.ensure_future(path.send(alice, conv, cid, "hi", "text", turn=turn))
    async with asyncio.timeout(10):
        while not asked:
            await asyncio.sleep(0.01)
        # The read answered: nothing stored under the cid yet.
        assert await asyncio.shield(asked[0]) is None
        assert await _pending(path, alice, cid)
    # Meanwhile an earlier copy of the cid (an attempt whose record Redis lost) is stored,
    # and another send proves the conversation's (partition, shard): every record before
    # its own is stored, which says nothing about what this send's read saw before.
    earlier = new_message(conv, ids, alice, cid)
    async with pools.transaction(0) as conn:
        await messages.append_batch(conn, [earlier])
    partition = line.partition(str(conv).encode())
    assert partition is not None
    watch = path.epochs[0]
    watch.clear(watch.epoch, partition, pools.for_id(conv))
    assert not watch.suspect(partition, pools.for_id(conv), 0)  # the pair is proven
    before.release()
    accepted = await asyncio.wait_for(task, 10)
    # The stored copy's id, not the one this attempt minted (which is never stored).
    assert accepted.id == earlier.id
    assert path.settled == 1


async def _pending(path: SendPath, user: str, cid: str) -> bool:
    raw = await path.redis.get(path.keys.idempotency(user, cid))
    return raw is not None and raw.startswith(b"p|")
