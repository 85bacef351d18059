"""The gateway's first-page cache (gateway/feedpages.py) on the real engines, in process.

Each test works in its own community and builds its own FeedPages over a FeedCache, as a
gateway does, so it can count what reached the shards and Redis. The scores worker and
other nodes are stood in for by the same calls they make (apply_deltas then on_totals;
another FeedCache's on_deleted). Through the HTTP API, tests/integration/test_social.py
reads the feeds with the cache on (each gateway has one).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from core.settings import Settings
from fanout.feeds import FeedCache
from gateway.feedpages import FeedPages, cursor_text
from gateway.http.feeds import parse_cursor
from gateway.http.posts import post_json
from storage import posts
from storage.ids import IdGenerator
from storage.pools import ShardPools
from storage.posts import Post, Totals
from storage.ranking import Feed, FeedKind, Window, member
from storage.redis_keys import RedisKeys

pytestmark = pytest.mark.engines

LONG_MS = 60_000  # a TTL no test outlives: only a stamp change makes these caches fetch


@pytest.fixture
def keys(settings: Settings) -> RedisKeys:
    return RedisKeys(settings.redis_prefix)


@pytest.fixture
def feeds(redis_client: aioredis.Redis, keys: RedisKeys, pools: ShardPools) -> FeedCache:
    return FeedCache(redis_client, keys, pools)


@pytest.fixture
def shard_reads(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """Every read of posts from the shards (storage.posts.get_many), by the ids it asked."""
    reads: list[list[int]] = []
    real = posts.get_many

    async def counted(pools: ShardPools, ids: Any, viewer: str | None) -> dict[int, Post]:
        reads.append(list(ids))
        return await real(pools, ids, viewer)

    monkeypatch.setattr(posts, "get_many", counted)
    return reads


def community() -> str:
    return f"fc_{secrets.token_hex(4)}"


async def seed(pools: ShardPools, feeds: FeedCache, comm: str, count: int) -> list[Post]:
    """Posts created as the gateway creates them, one after the other (oldest first)."""
    gen = IdGenerator()
    made = []
    for i in range(count):
        post = await posts.create(pools, gen, f"author{i % 7}-{comm}", comm, f"post {i}", "")
        await feeds.on_created(post)
        made.append(post)
    return made


async def votes_applied(
    pools: ShardPools, feeds: FeedCache, deltas: dict[int, tuple[int, int]]
) -> None:
    """What the scores worker does with a batch: counters on the shards, then the feeds."""
    totals = []
    for physical in range(pools.physical_count):
        mine = {pid: d for pid, d in deltas.items() if pools.for_id(pid) == physical}
        if mine:
            async with pools.transaction(physical) as conn:
                totals += await posts.apply_deltas(conn, mine)
    await feeds.on_totals(totals)


def items(body: bytes) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = orjson.loads(body)["items"]
    return out


def ids(body: bytes) -> list[int]:
    return [int(p["id"]) for p in items(body)]


async def test_a_first_page_is_read_once_then_served_from_memory(
    pools: ShardPools, feeds: FeedCache, shard_reads: list[list[int]]
) -> None:
    comm = community()
    await seed(pools, feeds, comm, 30)
    pages = FeedPages(feeds, pools, LONG_MS)
    feed = Feed(FeedKind.TRENDING, comm)
    first = await pages.first_page(feed, 10, "viewer-0")
    assert len(shard_reads) == 1 and pages.fetches == 1
    for i in range(20):
        assert await pages.first_page(feed, 10, f"viewer-{i}") == first
    assert len(shard_reads) == 1 and pages.fetches == 1 and pages.hits == 20
    # The same body the uncached path gives (same snapshot: the set has not changed).
    page = await feeds.page(feed, None, 10, "viewer-0")
    assert orjson.loads(first) == {
        "items": [post_json(p) for p in page.items],
        "next": cursor_text(page.next),
    }
    # Another limit is another page.
    assert ids(await pages.first_page(feed, 3, "viewer-0")) == ids(first)[:3]
    assert pages.fetches == 2


async def test_concurrent_misses_fetch_once(
    pools: ShardPools,
    feeds: FeedCache,
    keys: RedisKeys,
    redis_client: aioredis.Redis,
    shard_reads: list[list[int]],
) -> None:
    comm = community()
    await seed(pools, feeds, comm, 40)  # nobody has read this community: no set is ready
    pages = FeedPages(feeds, pools, LONG_MS)
    feed = Feed(FeedKind.TOP, comm, Window.DAY)
    bodies = await asyncio.gather(*(pages.first_page(feed, 25, f"v{i}") for i in range(50)))
    assert all(b == bodies[0] for b in bodies) and len(ids(bodies[0])) == 25
    assert pages.fetches == 1 and len(shard_reads) == 1
    assert await redis_client.hget(keys.feed_stats(), feeds.feed_keys(feed).live) == b"1"
    # The 50 reads checked the stamp together, and asked for their votes together.
    assert pages.stamps.lookups == 51 and pages.stamps.flights <= 3
    assert pages.votes.lookups == 50 and pages.votes.flights <= 2
    # The marker lapses (a rebuild is due): again one fetch, one rebuild for the crowd.
    await redis_client.delete(feeds.feed_keys(feed).ready)
    again = await asyncio.gather(*(pages.first_page(feed, 25, f"v{i}") for i in range(50)))
    assert all(b == again[0] for b in again) and ids(again[0]) == ids(bodies[0])
    assert pages.fetches == 2 and len(shard_reads) == 2
    assert await redis_client.hget(keys.feed_stats(), feeds.feed_keys(feed).live) == b"2"


async def test_what_the_writers_change_shows_on_the_next_read(
    pools: ShardPools, feeds: FeedCache, shard_reads: list[list[int]]
) -> None:
    comm = community()
    made = await seed(pools, feeds, comm, 12)
    pages = FeedPages(feeds, pools, LONG_MS)
    trending, new, top = (
        Feed(FeedKind.TRENDING, comm),
        Feed(FeedKind.NEW, comm),
        Feed(FeedKind.TOP, comm, Window.ALL),
    )
    newest_first = [p.id for p in reversed(made)]
    for feed in (trending, new, top):
        assert ids(await pages.first_page(feed, 20, "v")) == newest_first
        assert ids(await pages.first_page(feed, 20, "v")) == newest_first
    assert pages.fetches == 3 and pages.hits == 3

    # A scores batch: the oldest post gets 5 up-votes. No TTL has passed; the stamps moved.
    oldest = made[0]
    await votes_applied(pools, feeds, {oldest.id: (5, 0)})
    for feed in (trending, top):
        page = items(await pages.first_page(feed, 20, "v"))
        assert int(page[0]["id"]) == oldest.id and page[0]["score"] == 5, feed
    page = items(await pages.first_page(new, 20, "v"))  # `new` keeps its order ...
    assert [int(p["id"]) for p in page] == newest_first
    assert page[-1]["score"] == 5  # ... and shows the counters
    assert pages.fetches == 6

    # A post made (by any node) is on the next first page.
    (late,) = await seed(pools, feeds, comm, 1)
    assert ids(await pages.first_page(new, 20, "v"))[0] == late.id

    # A post deleted through another node (its own FeedCache) is gone from the next one.
    doomed = made[5]
    await posts.delete(pools, doomed.id, doomed.author)
    other_node = FeedCache(feeds.redis, feeds.keys, pools)
    await other_node.on_deleted(doomed.id, comm)
    for feed in (trending, new, top):
        assert doomed.id not in ids(await pages.first_page(feed, 20, "v")), feed
    # Nothing changed since: all served from memory.
    fetches = pages.fetches
    for feed in (trending, new, top):
        await pages.first_page(feed, 20, "v")
    assert pages.fetches == fetches


async def test_comment_counts_are_at_most_the_ttl_old(pools: ShardPools, feeds: FeedCache) -> None:
    comm = community()
    (post,) = await seed(pools, feeds, comm, 1)
    ttl_ms = 2500
    pages = FeedPages(feeds, pools, ttl_ms)
    feed = Feed(FeedKind.NEW, comm)
    assert items(await pages.first_page(feed, 5, "v"))[0]["comments"] == 0
    built = pages._pages[(feed, 5)].built
    # Three comments: the thread's last seq moves; no feed is told.
    async with pools.connection(pools.for_id(post.id)) as conn:
        await conn.execute("UPDATE conversations SET last_seq = 3 WHERE id = $1", post.thread)
    stale_reads = 0
    deadline = time.monotonic() + 30
    while True:
        # The cache decides when the call starts; its queries take time after that: the
        # page's age at the decision is between `before` and `after`, minus `built`.
        before = time.monotonic() - built
        count = items(await pages.first_page(feed, 5, "v"))[0]["comments"]
        after = time.monotonic() - built
        if count == 3:
            break
        # Served from the cache only while younger than the TTL.
        assert count == 0 and before < ttl_ms / 1000, before
        assert time.monotonic() < deadline
        stale_reads += 1
        await asyncio.sleep(0.05)
    assert stale_reads > 0  # the cached page was served meanwhile
    assert after >= ttl_ms / 1000 - 0.05  # and refreshed only once the TTL was over


async def test_my_vote_is_each_viewers_own(
    pools: ShardPools, feeds: FeedCache, shard_reads: list[list[int]]
) -> None:
    comm = community()
    made = await seed(pools, feeds, comm, 6)
    a, b, c = made[0].id, made[1].id, made[2].id
    for post_id, user, value in [
        (a, "alice", 1),
        (b, "alice", -1),
        (b, "carol", 1),
        (c, "dave", 1),
        (c, "dave", 0),  # taken back: a row with 0
    ]:
        await posts.vote(pools, post_id, f"{user}-{comm}", value)
    expected = {
        "alice": {a: 1, b: -1},
        "bob": {},
        "carol": {b: 1},
        "dave": {},
    }
    pages = FeedPages(feeds, pools, LONG_MS)
    feed = Feed(FeedKind.NEW, comm)

    async def read(user: str) -> dict[int, int]:
        body = await pages.first_page(feed, 10, f"{user}-{comm}")
        assert ids(body) == [p.id for p in reversed(made)]
        return {int(p["id"]): p["my_vote"] for p in items(body)}

    for _ in range(2):  # a fetch, then from memory; each viewer together, then one by one
        got = await asyncio.gather(*(read(u) for u in expected))
        for (user, want), seen in zip(expected.items(), got, strict=True):
            assert {pid: v for pid, v in seen.items() if v} == want, user
        for user, want in expected.items():
            assert {pid: v for pid, v in (await read(user)).items() if v} == want, user
    assert pages.fetches == 1 and len(shard_reads) == 1
    # A vote shows on the viewer's next read, though the page is served from memory.
    await posts.vote(pools, a, f"alice-{comm}", -1)
    assert (await read("alice"))[a] == -1
    assert (await read("bob"))[a] == 0
    assert pages.fetches == 1


async def test_a_post_deleted_here_leaves_the_cached_pages_at_once(
    pools: ShardPools, feeds: FeedCache
) -> None:
    comm = community()
    made = await seed(pools, feeds, comm, 5)
    pages = FeedPages(feeds, pools, LONG_MS)
    feed = Feed(FeedKind.NEW, comm)
    doomed = made[2]
    assert doomed.id in ids(await pages.first_page(feed, 5, "v"))
    assert doomed.id in ids(await pages.first_page(feed, 2 + 3, "v"))
    # Deleted on the shard, and the feed update failed (Redis did not hear of it): the stamp
    # did not move, so only the node that deleted it can know, and it drops it.
    await posts.delete(pools, doomed.id, doomed.author)
    assert doomed.id in ids(await pages.first_page(feed, 5, "v"))  # what the cache holds
    pages.forget_post(doomed.id)
    assert ids(await pages.first_page(feed, 5, "v")) == [
        p.id for p in reversed(made) if p is not doomed
    ]


async def test_cursors_of_a_cached_first_page_read_the_rest_exactly(
    pools: ShardPools, feeds: FeedCache
) -> None:
    comm = community()
    made = await seed(pools, feeds, comm, 35)
    pages = FeedPages(feeds, pools, LONG_MS)
    feed = Feed(FeedKind.TOP, comm, Window.ALL)
    await pages.first_page(feed, 10, "v")
    body = await pages.first_page(feed, 10, "v")  # from memory
    assert pages.hits == 1
    seen = ids(body)
    cursor = parse_cursor(orjson.loads(body)["next"])
    moves = iter([{made[0].id: (9, 0)}, {seen[0]: (0, 9)}, {made[1].id: (3, 0)}])
    while cursor is not None:
        # Ranks move under the reader (an unseen post up, a seen one down): the read
        # stays in its snapshot, so nothing is shown twice or skipped.
        move = next(moves, None)
        if move:
            await votes_applied(pools, feeds, move)
        page = await feeds.page(feed, cursor, 10, "v")
        seen += [p.id for p in page.items]
        cursor = page.next
    assert len(seen) == len(set(seen)) == 35 and set(seen) == {p.id for p in made}


async def test_a_set_lost_from_redis_and_rebuilt_elsewhere_is_told_apart(
    pools: ShardPools,
    feeds: FeedCache,
    keys: RedisKeys,
    redis_client: aioredis.Redis,
) -> None:
    comm = community()
    made = await seed(pools, feeds, comm, 8)
    pages = FeedPages(feeds, pools, LONG_MS)
    feed = Feed(FeedKind.TRENDING, comm)
    body = await pages.first_page(feed, 25, "v")  # rebuilds the set: version 1
    live = feeds.feed_keys(feed).live
    (stamp,) = await feeds.stamps([feed])
    assert stamp[0] is not None and stamp[1] == b"1"
    # Counters move on the shards, and Redis loses the feed (every key of it) before the
    # scores worker could tell it; another node reads first and rebuilds the set.
    async with pools.transaction(pools.for_id(made[0].id)) as conn:
        await posts.apply_deltas(conn, {made[0].id: (4, 0)})
    async for key in redis_client.scan_iter(match=live.replace("{", "[{]") + "*", count=1000):
        await redis_client.unlink(key)
    assert await redis_client.exists(live) == 0
    await FeedCache(feeds.redis, feeds.keys, pools).ensure_ready(feed)
    (rebuilt,) = await feeds.stamps([feed])
    assert rebuilt[1] == b"1" and rebuilt[0] != stamp[0]  # same version, another set
    after = await pages.first_page(feed, 25, "v")
    assert pages.fetches == 2
    assert ids(after)[0] == made[0].id and ids(after) != ids(body)
    assert items(after)[0]["score"] == 4
    assert await redis_client.hget(keys.feed_stats(), live) == b"2"


async def test_an_uncached_first_page_right_after_a_change_shows_it(
    pools: ShardPools, feeds: FeedCache
) -> None:
    # The snapshot a first page reads is of the set's current version, however young the
    # previous one is (it once was reused for a second: a page read right after votes
    # settled came back in the pre-vote order, with the post-vote counters).
    comm = community()
    made = await seed(pools, feeds, comm, 6)
    feed = Feed(FeedKind.TOP, comm, Window.ALL)
    before = await feeds.page(feed, None, 10, "v")
    assert [p.id for p in before.items] == [p.id for p in reversed(made)]
    await votes_applied(pools, feeds, {made[0].id: (2, 0), made[1].id: (1, 0)})
    after = await feeds.page(feed, None, 10, "v")
    assert [p.id for p in after.items][:2] == [made[0].id, made[1].id]
    assert before.next is None and after.next is None


async def test_a_scores_batch_for_a_post_deleted_meanwhile_removes_it_from_every_feed(
    pools: ShardPools, feeds: FeedCache, redis_client: aioredis.Redis
) -> None:
    comm = community()
    made = await seed(pools, feeds, comm, 3)
    doomed, voted = made[0], made[1]
    every = [
        Feed(FeedKind.NEW, comm),
        Feed(FeedKind.TRENDING, comm),
        Feed(FeedKind.TOP, comm, Window.DAY),
    ]
    for feed in every:
        await feeds.ensure_ready(feed)
    # Deleted where no on_deleted reaches this node: only the scores batch (which reads the
    # post's row, deleted flag included) tells it, together with another post's new counters.
    await posts.delete(pools, doomed.id, doomed.author)
    await feeds.on_totals(
        [
            Totals(doomed.id, doomed.thread, comm, 5, 0, True),
            Totals(voted.id, voted.thread, comm, 4, 0, False),
        ]
    )
    for feed in every:
        live = await redis_client.zrange(feeds.feed_keys(feed).live, 0, -1)
        assert member(doomed.id).encode() not in live and member(voted.id).encode() in live
        page = await feeds.page(feed, None, 10, None)
        ids = [p.id for p in page.items]
        assert doomed.id not in ids and voted.id in ids, feed
    top = await feeds.page(Feed(FeedKind.TOP, comm, Window.DAY), None, 10, None)
    assert top.items[0].id == voted.id  # its votes rank it first
