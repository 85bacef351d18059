"""A feed set's rebuild from the shards (fanout/feeds.py) when it goes wrong, on the real
engines, in process: a rebuild that loses its lock, a reader that waits on a rebuild that
never ends, a rebuild that outlives its time limit (a shard that holds a lock).

The time limits are module constants of fanout/feeds.py; the tests shorten them (not the
engines' behaviour) so that a give-up takes a second rather than half a minute.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest
import redis.asyncio as aioredis

from core.errors import Unavailable
from fanout import feeds as feeds_module
from fanout.feeds import FeedCache
from storage import posts
from storage.pools import ShardPools
from storage.ranking import Feed, FeedKind
from storage.redis_keys import RedisKeys
from tests.integration.test_feed_cache import community, feeds, keys, seed

pytestmark = pytest.mark.engines
__all__ = ["feeds", "keys"]  # fixtures


async def test_a_rebuild_that_lost_its_lock_is_not_swapped_in_and_is_done_again(
    pools: ShardPools,
    feeds: FeedCache,
    redis_client: aioredis.Redis,
    keys: RedisKeys,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    comm = community()
    made = await seed(pools, feeds, comm, 3)
    feed = Feed(FeedKind.NEW, comm)
    k = feeds.feed_keys(feed)
    real = posts.feed_candidates
    reads = 0

    async def slow_then_overtaken(*args: Any, **kwargs: Any) -> list[tuple[float, int]]:
        # The first rebuild is slow enough that its lock lapses and another process takes
        # it (for 300 ms, then that one dies too): its result must not be swapped in.
        nonlocal reads
        reads += 1
        entries = await real(*args, **kwargs)
        if reads == 1:
            await redis_client.set(k.lock, "another-process", px=300)
        return entries

    monkeypatch.setattr("fanout.feeds.posts.feed_candidates", slow_then_overtaken)
    with caplog.at_level(logging.WARNING, logger="agora.feeds"):
        await feeds.ensure_ready(feed)
    assert reads == 2  # the lost rebuild, then one after the other holder's lock lapsed
    assert any("rebuild lost its lock" in r.getMessage() for r in caplog.records)
    assert feeds.rebuilds == 1
    assert await redis_client.hget(keys.feed_stats(), k.live) == b"1"
    live = await redis_client.zrange(k.live, 0, -1)
    assert sorted(int(m) for m in live) == sorted(p.id for p in made)
    assert await redis_client.exists(k.ready) == 1
    assert await redis_client.exists(k.lock, k.journal, k.staging) == 0


async def test_a_reader_waiting_on_a_rebuild_that_never_ends_gets_unavailable(
    pools: ShardPools,
    feeds: FeedCache,
    redis_client: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    comm = community()
    await seed(pools, feeds, comm, 2)
    feed = Feed(FeedKind.NEW, comm)
    k = feeds.feed_keys(feed)
    monkeypatch.setattr(feeds_module, "WAIT_TIMEOUT_S", 0.5)
    # Another process holds the lock and neither finishes nor dies.
    await redis_client.set(k.lock, "stuck", px=60_000)
    try:
        started = time.monotonic()
        with pytest.raises(Unavailable, match="being rebuilt") as info:
            await feeds.page(feed, None, 10, "reader")
        waited = time.monotonic() - started
        print(f"gave up after {waited:.2f}s: {info.value}")
        assert 0.5 <= waited < 5
        assert info.value.status == 503 and info.value.retriable
        assert await redis_client.get(k.lock) == b"stuck"  # not taken from its holder
        assert await redis_client.exists(k.ready) == 0
    finally:
        await redis_client.delete(k.lock)


async def test_a_rebuild_held_up_by_a_shard_gives_up_in_time_and_frees_its_lock(
    pools: ShardPools,
    feeds: FeedCache,
    redis_client: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    comm = community()
    made = await seed(pools, feeds, comm, 2)
    feed = Feed(FeedKind.NEW, comm)
    k = feeds.feed_keys(feed)
    monkeypatch.setattr(feeds_module, "REBUILD_TIMEOUT_S", 1.0)
    shard = pools.for_id(made[0].id)
    # A transaction on one shard holds the posts table: the rebuild's read waits for it.
    async with pools.connection(shard) as blocker:
        tx = blocker.transaction()
        await tx.start()
        try:
            await blocker.execute("LOCK TABLE posts IN ACCESS EXCLUSIVE MODE")
            started = time.monotonic()
            with pytest.raises(Unavailable, match="could not be rebuilt") as info:
                await feeds.ensure_ready(feed)
            waited = time.monotonic() - started
        finally:
            await tx.rollback()
    print(f"gave up after {waited:.2f}s: {info.value}")
    assert 1.0 <= waited < 5
    # Its lock is released at once: the next reader rebuilds without waiting it out.
    assert await redis_client.exists(k.lock, k.ready) == 0
    await asyncio.wait_for(feeds.ensure_ready(feed), 10)
    live = await redis_client.zrange(k.live, 0, -1)
    assert sorted(int(m) for m in live) == sorted(p.id for p in made)


async def test_a_reader_whose_rebuilder_dies_takes_over_and_serves_the_feed(
    pools: ShardPools,
    feeds: FeedCache,
    redis_client: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    comm = community()
    made = await seed(pools, feeds, comm, 3)
    feed = Feed(FeedKind.NEW, comm)
    k = feeds.feed_keys(feed)
    await redis_client.set(k.lock, "dying", px=60_000)
    real_acquire = feeds._acquire
    seen_held = asyncio.Event()

    async def acquire(**kwargs: Any) -> Any:
        state = await real_acquire(**kwargs)
        if state == 0:
            seen_held.set()
        return state

    monkeypatch.setattr(feeds, "_acquire", acquire)
    reader = asyncio.create_task(feeds.page(feed, None, 10, "reader"))
    try:
        await asyncio.wait_for(seen_held.wait(), 10)
        assert not reader.done()  # waiting on the other process's rebuild
        # The other process dies: its lock goes (as its TTL would make it go).
        await redis_client.delete(k.lock)
        page = await asyncio.wait_for(reader, 10)
    finally:
        reader.cancel()
        await redis_client.delete(k.lock)
    assert [p.id for p in page.items] == [p.id for p in reversed(made)]
    assert feeds.rebuilds == 1  # the reader rebuilt it itself
    assert await redis_client.exists(k.ready) == 1


async def test_a_reader_whose_rebuilder_dies_after_the_deadline_gets_unavailable(
    pools: ShardPools,
    feeds: FeedCache,
    redis_client: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    comm = community()
    await seed(pools, feeds, comm, 2)
    feed = Feed(FeedKind.NEW, comm)
    k = feeds.feed_keys(feed)
    # No time to wait at all: the first look after the lock is seen is past the deadline.
    monkeypatch.setattr(feeds_module, "WAIT_TIMEOUT_S", 0.0)
    await redis_client.set(k.lock, "dying", px=60_000)
    real_acquire = feeds._acquire

    async def acquire(**kwargs: Any) -> Any:
        state = await real_acquire(**kwargs)
        if state == 0:  # the holder dies right after the reader saw its lock
            await redis_client.delete(k.lock)
        return state

    monkeypatch.setattr(feeds, "_acquire", acquire)
    try:
        with pytest.raises(Unavailable, match="could not be rebuilt") as info:
            await feeds.page(feed, None, 10, "reader")
    finally:
        await redis_client.delete(k.lock)
    assert info.value.status == 503 and info.value.retriable
    assert feeds.rebuilds == 0
    assert await redis_client.exists(k.ready, k.lock) == 0
    # The next reader rebuilds it.
    monkeypatch.setattr(feeds_module, "WAIT_TIMEOUT_S", 25.0)
    page = await asyncio.wait_for(feeds.page(feed, None, 10, "reader"), 10)
    assert len(page.items) == 2
