"""Posts, votes, comments and feeds end to end: two gateways, a fan-out worker, a scores
worker, and the real engines.

Every test works in its own community (a random name), so it sees only its own posts in
community feeds while sharing the databases with the rest of the session. Figures worth
knowing (latencies, frames seen, batches) are printed; run with -s to see them.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from aiokafka import TopicPartition

from agora_client import AgoraClient, ServerError
from core.settings import Settings
from fanout.envelope import Vote
from fanout.feeds import FeedCache
from fanout.scores import Pending, ScoresWorker
from storage import posts
from storage.ids import EPOCH_MS, IdGenerator, compose, decompose, now_ms
from storage.pools import ShardPools
from storage.posts import Post
from storage.ranking import Feed, FeedKind, Window, hot, member
from storage.redis_keys import RedisKeys
from tests.stack import Proc, Stack

pytestmark = pytest.mark.engines

ALL_FEEDS: list[tuple[str, str | None]] = [
    ("trending", None),
    ("new", None),
    ("top", "day"),
    ("top", "week"),
    ("top", "all"),
]


# -- fixtures and helpers -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(settings: Settings) -> Iterator[Stack]:
    s = Stack(settings)
    try:
        s.gateway("social-g1")
        s.gateway("social-g2")
        s.fanout("social-fanout")
        s.scores("social-scores")
        yield s
    finally:
        s.stop_all()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=20, limits=limits) as client:
        yield client


@pytest.fixture
def keys(settings: Settings) -> RedisKeys:
    return RedisKeys(settings.redis_prefix)


@pytest.fixture
def cache(redis_client: aioredis.Redis, keys: RedisKeys, pools: ShardPools) -> FeedCache:
    """The feed cache as a gateway has it, for seeding posts fast from the test process."""
    return FeedCache(redis_client, keys, pools)


def community() -> str:
    return f"c_{secrets.token_hex(4)}"


def uid(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


class Api:
    """HTTP calls as one user, against one gateway."""

    def __init__(self, http: httpx.AsyncClient, stack: Stack, node: Proc, user: str) -> None:
        self.http = http
        self.node = node
        self.user = user
        self.headers = {"Authorization": f"Bearer {stack.token(user)}"}

    async def call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return await self.http.request(
            method, f"{self.node.http_url}{path}", headers=self.headers, **kw
        )

    async def create(self, comm: str, title: str = "a post", body: str = "") -> dict[str, Any]:
        r = await self.call(
            "POST", "/v1/posts", json={"title": title, "body": body, "community": comm}
        )
        assert r.status_code == 201, r.text
        out: dict[str, Any] = r.json()
        return out

    async def vote(self, post: str, value: int) -> dict[str, Any]:
        r = await self.call("PUT", f"/v1/posts/{post}/vote", json={"value": value})
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        return out

    async def feed(self, kind: str, **params: Any) -> dict[str, Any]:
        r = await self.call("GET", f"/v1/feeds/{kind}", params=params)
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        return out

    async def read_all(self, kind: str, limit: int = 100, **params: Any) -> list[dict[str, Any]]:
        """Every item of a feed, page by page."""
        items: list[dict[str, Any]] = []
        cursor = None
        while True:
            page = await self.feed(
                kind, limit=limit, **({"cursor": cursor} if cursor else {}), **params
            )
            items += page["items"]
            cursor = page["next"]
            if cursor is None:
                return items


async def wait_until(
    check: Callable[[], Awaitable[bool]], timeout: float = 20, what: str = "condition"
) -> float:
    """Poll until `check()` holds; returns the seconds it took."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def counters(pools: ShardPools, post_id: int) -> tuple[int, int]:
    async with pools.connection(pools.for_id(post_id)) as conn:
        row = await conn.fetchrow("SELECT up, down FROM posts WHERE id = $1", post_id)
    assert row is not None
    return row["up"], row["down"]


async def seed(
    pools: ShardPools,
    cache: FeedCache,
    comm: str,
    count: int,
    ids: IdGenerator | None = None,
    concurrency: int = 20,
) -> list[Post]:
    """Create posts in-process as the gateway does (shard transaction, then the feeds)."""
    gen = ids or IdGenerator()
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> Post:
        async with sem:
            author = f"seed{i % 50}-{comm}"
            post = await posts.create(pools, gen, author, comm, f"post {i}", "")
            await cache.on_created(post)
            return post

    return list(await asyncio.gather(*(one(i) for i in range(count))))


async def drop_session_keys(redis: aioredis.Redis, prefix: str, pattern: str = "*") -> int:
    """What a Redis restart does to this session: every key of its prefix is gone. (Not
    FLUSHDB: other test sessions may share the database under other prefixes.)"""
    dropped = 0
    async for key in redis.scan_iter(match=f"{prefix}:{pattern}", count=1000):
        dropped += await redis.unlink(key)
    return dropped


async def feed_score(redis: aioredis.Redis, keys: RedisKeys, feed: Feed, post: int) -> float | None:
    window = feed.window.value if feed.window else None
    value = await redis.zscore(keys.feed(feed.kind.value, feed.community, window), member(post))
    return None if value is None else float(value)


def by_formula(rows: list[tuple[int, int, int]], kind: str) -> list[int]:
    """(id, up, down) rows in the order a feed must have, from storage.ranking's formula."""

    def key(row: tuple[int, int, int]) -> tuple[float, int]:
        post_id, up, down = row
        created = decompose(post_id).ms
        if kind == "trending":
            return hot(up, down, created), post_id
        if kind == "top":
            return float(up - down), post_id
        return float(created), post_id

    return [r[0] for r in sorted(rows, key=key, reverse=True)]


# -- posts, comments, votes ---------------------------------------------------------------------


async def test_post_lifecycle_with_comments_and_votes(
    stack: Stack, g1: Proc, g2: Proc, http: httpx.AsyncClient, pools: ShardPools
) -> None:
    comm = community()
    alice = Api(http, stack, g1, uid("alice"))
    bob = Api(http, stack, g2, uid("bob"))
    before = now_ms()
    title, body = "t" * 300, "é" * 40_000  # both at their limits; the body is 80 KB of UTF-8
    created = await alice.create(comm, title, body)
    assert set(created) == {
        "id", "author", "community", "title", "body", "created_at", "score", "up", "down",
        "comments", "thread", "my_vote",
    }  # fmt: skip
    assert created["id"].isdigit() and created["thread"].isdigit()
    assert (created["author"], created["community"]) == (alice.user, comm)
    assert (created["title"], created["body"]) == (title, body)
    assert before <= created["created_at"] <= now_ms()
    assert (created["score"], created["up"], created["down"], created["comments"]) == (0, 0, 0, 0)
    post_id = int(created["id"])
    assert pools.for_id(post_id) == pools.for_user(alice.user)  # the author's shard
    assert decompose(int(created["thread"])).shard == decompose(post_id).shard

    got = (await bob.call("GET", f"/v1/posts/{post_id}")).json()
    assert got == created

    # Comments: messages of kind comment in the thread, through the normal send path.
    client = await AgoraClient.connect(g2.ws_url, stack.token(bob.user))
    try:
        await client.sub(created["thread"])
        await client.send(created["thread"], "first!")  # no kind given: a thread makes it one
        frame = await client.next_event("msg")
        assert (frame["kind"], frame["body"], frame["seq"]) == ("comment", "first!", 1)
        # An explicit kind comment is accepted as is (only text is turned into a comment).
        await client.send(created["thread"], "second", kind="comment")
        frame = await client.next_event("msg")
        assert (frame["kind"], frame["body"], frame["seq"]) == ("comment", "second", 2)
    finally:
        await client.close()

    async def both_comments() -> bool:
        r = await bob.call("GET", f"/v1/posts/{post_id}")
        return bool(r.json()["comments"] == 2)

    await wait_until(both_comments, what="comment count")

    # Votes: the answer includes the caller's own vote; repeating changes nothing.
    assert await bob.vote(created["id"], 1) == {
        "post": created["id"], "score": 1, "up": 1, "down": 0, "my_vote": 1,
    }  # fmt: skip

    # Totals in the answer are the counters as applied so far plus this vote's own delta;
    # once the scores worker has applied the first vote, a repeat shows it and adds nothing.
    async def first_applied() -> bool:
        return await counters(pools, post_id) == (1, 0)

    await wait_until(first_applied, what="first vote applied")
    again = await bob.vote(created["id"], 1)
    assert (again["my_vote"], again["up"], again["down"]) == (1, 1, 0)
    changed = await bob.vote(created["id"], -1)
    assert (changed["score"], changed["up"], changed["down"], changed["my_vote"]) == (-1, 0, 1, -1)

    async def settled() -> bool:
        return await counters(pools, post_id) == (0, 1)

    await wait_until(settled, what="counters")
    mine = (await bob.call("GET", f"/v1/posts/{post_id}")).json()
    theirs = (await alice.call("GET", f"/v1/posts/{post_id}")).json()
    assert (mine["score"], mine["up"], mine["down"], mine["my_vote"]) == (-1, 0, 1, -1)
    assert theirs["my_vote"] == 0

    # Delete: author only; gone afterwards.
    assert (await bob.call("DELETE", f"/v1/posts/{post_id}")).status_code == 403
    assert (await alice.call("DELETE", f"/v1/posts/{post_id}")).status_code == 204
    for api in (alice, bob):
        r = await api.call("GET", f"/v1/posts/{post_id}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert (await alice.call("DELETE", f"/v1/posts/{post_id}")).status_code == 404
    r = await bob.call("PUT", f"/v1/posts/{post_id}/vote", json={"value": 1})
    assert r.status_code == 404
    # Its thread is closed: no new comments, no new subscribers (a fresh user, so no node
    # has the thread's access cached).
    carol = uid("carol")
    late = await AgoraClient.connect(g1.ws_url, stack.token(carol))
    try:
        for attempt in (late.sub(created["thread"]), late.send(created["thread"], "too late")):
            with pytest.raises(ServerError) as info:
                await attempt
            assert info.value.code == "not_found"
    finally:
        await late.close()
    r = await Api(http, stack, g2, carol).call(
        "POST", f"/v1/conversations/{created['thread']}/messages", json={"cid": "x", "body": "y"}
    )
    assert r.status_code == 404


async def test_bad_input_gets_the_protocol_error_and_writes_nothing(
    stack: Stack, g1: Proc, http: httpx.AsyncClient, pools: ShardPools
) -> None:
    comm = community()
    mallory = Api(http, stack, g1, uid("mallory"))

    async def expect(status: int, code: str, method: str, path: str, **kw: Any) -> None:
        r = await mallory.call(method, path, **kw)
        assert r.status_code == status, (method, path, kw, r.text)
        assert r.json()["error"]["code"] == code, r.text

    good = {"title": "fine", "body": "", "community": comm}
    for bad in [
        {**good, "title": "x" * 301},
        {**good, "title": ""},
        {**good, "title": 7},
        {"body": "", "community": comm},
        {**good, "title": "nul\x00"},
        {**good, "body": "b" * 40_001},
        {**good, "body": None},
        {**good, "community": "Bad"},
        {**good, "community": "a-b"},
        {**good, "community": ""},
        {**good, "community": "x" * 65},
        {**good, "community": 12},
        {"title": "fine"},
    ]:
        await expect(422, "bad_request", "POST", "/v1/posts", json=bad)
    await expect(400, "bad_request", "POST", "/v1/posts", content=b"{not json")
    await expect(422, "bad_request", "POST", "/v1/posts", json=[good])
    r = await http.post(f"{g1.http_url}/v1/posts", json=good)  # no token
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    for physical in range(pools.physical_count):
        async with pools.connection(physical) as conn:
            n = await conn.fetchval("SELECT count(*) FROM posts WHERE author = $1", mallory.user)
            m = await conn.fetchval("SELECT count(*) FROM posts WHERE community = $1", comm)
        assert (n, m) == (0, 0)

    owner = Api(http, stack, g1, uid("owner"))
    post = await owner.create(comm)
    path = f"/v1/posts/{post['id']}"
    for value in [2, -2, True, False, "1", 1.0, None, [1]]:
        await expect(422, "bad_request", "PUT", f"{path}/vote", json={"value": value})
    await expect(422, "bad_request", "PUT", f"{path}/vote", json={})
    await expect(400, "bad_request", "PUT", f"{path}/vote", content=b"]")
    await expect(403, "forbidden", "DELETE", path)
    ghost = compose(now_ms() - 60_000, decompose(int(post["id"])).shard, 1023)
    beyond_the_map = compose(now_ms(), 8191, 0)  # a logical shard this deployment lacks
    for unknown in [str(ghost), str(beyond_the_map), "0", "abc", "9" * 25, "9" * 19]:
        await expect(404, "not_found", "GET", f"/v1/posts/{unknown}")
        await expect(404, "not_found", "DELETE", f"/v1/posts/{unknown}")
        await expect(404, "not_found", "PUT", f"/v1/posts/{unknown}/vote", json={"value": 1})

    # Nothing of the above reached a row or the votes topic: one good vote afterwards (the
    # same partition, so applied after anything before it) leaves exactly its own count.
    await Api(http, stack, g1, uid("voter")).vote(post["id"], 1)

    async def applied() -> bool:
        return await counters(pools, int(post["id"])) == (1, 0)

    await wait_until(applied, what="the good vote")
    async with pools.connection(pools.for_id(int(post["id"]))) as conn:
        rows = await conn.fetchval("SELECT count(*) FROM votes WHERE post_id = $1", int(post["id"]))
    assert rows == 1
    assert (await mallory.call("GET", path)).status_code == 200  # the 403 deleted nothing

    for kind, params in [
        ("hot", {}),
        ("top", {"window": "year"}),
        ("trending", {"window": "day"}),
        ("new", {"community": "Bad!"}),
        ("top", {"community": "x" * 65}),
        ("new", {"limit": "0"}),
        ("new", {"limit": "101"}),
        ("new", {"limit": "ten"}),
        ("new", {"cursor": "garbage"}),
        ("new", {"cursor": "WyJ4IiwxLCIxLjAiLCIxIl0"}),  # well-formed, but no snapshot name
    ]:
        await expect(400, "bad_request", "GET", f"/v1/feeds/{kind}", params=params)


async def test_500_concurrent_votes_by_200_users_end_exact_everywhere(
    stack: Stack,
    g1: Proc,
    g2: Proc,
    http: httpx.AsyncClient,
    pools: ShardPools,
    redis_client: aioredis.Redis,
    keys: RedisKeys,
) -> None:
    comm = community()
    author = Api(http, stack, g1, uid("author"))
    post = await author.create(comm)
    post_id = int(post["id"])
    # The community feeds are live in Redis, so the scores worker keeps them current.
    for kind, window in ALL_FEEDS:
        await author.feed(kind, community=comm, **({"window": window} if window else {}))

    watcher = await AgoraClient.connect(g2.ws_url, stack.token(uid("watcher")))
    await watcher.sub(post["thread"])
    # 200 users, 500 votes: each user votes 2 or 3 times in order (repeats and changes);
    # the users all at once, half through each gateway.
    rng = random.Random(4)
    plans = [[rng.choice((1, 0, -1)) for _ in range(3 if i < 100 else 2)] for i in range(200)]
    assert sum(map(len, plans)) == 500
    assert any(p[0] == p[1] for p in plans) and any(p[0] != p[1] for p in plans)
    voters = [Api(http, stack, g1 if i % 2 else g2, f"v{i}-{post_id}") for i in range(200)]

    async def run(api: Api, plan: list[int]) -> None:
        for value in plan:
            assert (await api.vote(post["id"], value))["my_vote"] == value

    started = time.monotonic()
    await asyncio.gather(*(run(api, plan) for api, plan in zip(voters, plans, strict=True)))
    voting_s = time.monotonic() - started
    up = sum(1 for p in plans if p[-1] == 1)
    down = sum(1 for p in plans if p[-1] == -1)
    deltas = sum(a != b for p in plans for a, b in zip([0, *p], p, strict=False))

    async def in_postgres() -> bool:
        return await counters(pools, post_id) == (up, down)

    settle_s = await wait_until(in_postgres, timeout=30, what="exact totals in PostgreSQL")
    async with pools.connection(pools.for_id(post_id)) as conn:
        rows = await conn.fetch(
            "SELECT value, count(*) AS n FROM votes WHERE post_id = $1 GROUP BY value", post_id
        )
    assert {r["value"]: r["n"] for r in rows if r["value"]} == {
        k: v for k, v in {1: up, -1: down}.items() if v
    }

    # The community's sets (read above, so kept by the scores worker) hold the exact ranks.
    expected = {Feed(FeedKind.TRENDING, comm): hot(up, down, decompose(post_id).ms)} | {
        Feed(FeedKind.TOP, comm, w): float(up - down) for w in Window
    }

    async def in_redis() -> bool:
        for feed, value in expected.items():
            if await feed_score(redis_client, keys, feed, post_id) != value:
                return False
        return True

    await wait_until(in_redis, what="exact ranks in Redis")

    # Everything is applied (PostgreSQL and Redis agree); the frame of the last batch is
    # published right after. Read them all: until the final totals have come and nothing
    # has followed them for a second.
    frames: list[dict[str, Any]] = []
    try:
        while True:
            final = bool(frames) and (frames[-1]["up"], frames[-1]["down"]) == (up, down)
            try:
                frame = await watcher.next_event("score", timeout=1.0 if final else 15.0)
            except TimeoutError:
                break
            assert frame["post"] == post["id"]
            frames.append(frame)
    finally:
        await watcher.close()
    assert frames, "no score frame reached the thread's subscriber"
    assert frames[-1] == {
        "t": "score",
        "post": post["id"],
        "score": up - down,
        "up": up,
        "down": down,
    }
    got = (await author.call("GET", f"/v1/posts/{post_id}")).json()
    assert (got["up"], got["down"], got["score"]) == (up, down, up - down)
    print(
        f"\n500 votes by 200 users: {voting_s:.2f}s ({500 / voting_s:.0f} votes/s), "
        f"totals up={up} down={down} settled {settle_s:.2f}s after the last answer, "
        f"{deltas} deltas produced, {len(frames)} counter updates and score frames (one per "
        "scores batch that touched the post)"
    )


async def test_redelivered_or_restarted_records_count_each_vote_once(
    settings: Settings, pools: ShardPools, redis_client: aioredis.Redis, cache: FeedCache
) -> None:
    # Another topic name than the running worker's, so its offsets are not disturbed.
    isolated = settings.with_overrides(kafka_topic_prefix=f"redelivery{secrets.token_hex(3)}")
    worker = ScoresWorker(isolated, pools, redis_client, consumer=None)  # type: ignore[arg-type]
    (post,) = await seed(pools, cache, community(), 1)
    (other,) = await seed(pools, cache, community(), 1)
    for post_id, user, value in [(post.id, "u1", 1), (post.id, "u2", 1), (other.id, "u3", -1)]:
        assert (await posts.vote(pools, post_id, user, value)).pending
    p0, p3 = TopicPartition(worker.topic, 0), TopicPartition(worker.topic, 3)
    ts = now_ms()
    batch = [
        Pending(p0, 10, Vote(post.id, "u1", ts)),
        Pending(p0, 11, Vote(post.id, "u2", ts)),
        Pending(p3, 5, Vote(other.id, "u3", ts)),
        Pending(p0, 12, Vote(post.id, "u1", ts)),  # the same row named twice (a retry)
    ]

    async def apply(work: list[Pending]) -> set[tuple[int, int, int]]:
        totals, failed, errors, poison = await worker.apply(work)
        assert (failed, errors, poison) == ([], [], [])
        return {(t.id, t.up, t.down) for t in totals}

    assert await apply(batch) == {(post.id, 2, 0), (other.id, 0, 1)}
    # Kafka delivers the same batch again (the worker died before committing offsets):
    # nothing is added, and the totals still come back for the feeds and subscribers.
    assert await apply(batch) == {(post.id, 2, 0), (other.id, 0, 1)}
    # u1 changes its vote; the topic was recreated, so its record comes at offset 0, below
    # everything applied before: it is counted all the same, and only the change.
    result = await posts.vote(pools, post.id, "u1", -1)
    assert result.pending and (result.up, result.down) == (1, 1)
    assert await apply([Pending(p0, 0, Vote(post.id, "u1", ts))]) == {(post.id, 1, 1)}
    # A record naming a row nobody changed (u2's, produced again by a sweep) adds nothing.
    assert await apply([Pending(p0, 1, Vote(post.id, "u2", ts))]) == {(post.id, 1, 1)}
    assert await counters(pools, post.id) == (1, 1)
    assert await counters(pools, other.id) == (0, 1)
    assert await rows_counted(pools, post.id) == {"u1": (-1, -1), "u2": (1, 1)}
    # A repeated vote after it was counted is not pending: nothing to produce.
    assert not (await posts.vote(pools, post.id, "u1", -1)).pending


async def rows_counted(pools: ShardPools, post_id: int) -> dict[str, tuple[int, int]]:
    """Each voter's (value, counted) on the post."""
    async with pools.connection(pools.for_id(post_id)) as conn:
        rows = await conn.fetch(
            "SELECT user_id, value, counted FROM votes WHERE post_id = $1", post_id
        )
    return {r["user_id"]: (r["value"], r["counted"]) for r in rows}


async def test_concurrent_workers_count_overlapping_records_once(
    settings: Settings, pools: ShardPools, redis_client: aioredis.Redis, cache: FeedCache
) -> None:
    # Two workers briefly owning the same partition (a rebalance) apply overlapping
    # batches at once: every row is counted by exactly one of them, and no deadlock.
    isolated = settings.with_overrides(kafka_topic_prefix=f"overlap{secrets.token_hex(3)}")
    workers = [
        ScoresWorker(isolated, pools, redis_client, consumer=None)  # type: ignore[arg-type]
        for _ in range(2)
    ]
    made = await seed(pools, cache, community(), 4)
    voters = [(p.id, f"u{i}") for p in made for i in range(25)]
    for post_id, user in voters:
        await posts.vote(pools, post_id, user, 1)
    tp = TopicPartition(workers[0].topic, 0)
    ts = now_ms()
    batch = [Pending(tp, i, Vote(p, u, ts)) for i, (p, u) in enumerate(voters)]
    rng = random.Random(7)
    halves = [rng.sample(batch, 70), list(reversed(batch))]
    results = await asyncio.gather(*(w.apply(h) for w, h in zip(workers, halves, strict=True)))
    for _totals, failed, errors, poison in results:
        assert (failed, errors, poison) == ([], [], [])
    for p in made:
        assert await counters(pools, p.id) == (25, 0)


async def test_a_dead_shard_holds_back_only_its_own_votes(
    settings: Settings, pools: ShardPools, redis_client: aioredis.Redis, cache: FeedCache
) -> None:
    isolated = settings.with_overrides(kafka_topic_prefix=f"deadshard{secrets.token_hex(3)}")
    broken = ShardPools(
        settings.with_overrides(
            shard_dsns=(settings.shard_dsns[0], "postgresql://x@127.0.0.1:1/no")
        )
    )
    worker = ScoresWorker(isolated, broken, redis_client, consumer=None)  # type: ignore[arg-type]
    try:
        comm = community()
        made = await seed(pools, cache, comm, 20)
        on0 = next(p for p in made if pools.for_id(p.id) == 0)
        on1 = next(p for p in made if pools.for_id(p.id) == 1)
        for post_id, user in [(on0.id, "a"), (on1.id, "b"), (on0.id, "c")]:
            await posts.vote(pools, post_id, user, 1)
        tp = TopicPartition(worker.topic, 2)
        ts = now_ms()
        work = [
            Pending(tp, 1, Vote(on0.id, "a", ts)),
            Pending(tp, 2, Vote(on1.id, "b", ts)),
            Pending(tp, 3, Vote(on0.id, "c", ts)),
        ]
        totals, failed, errors, poison = await worker.apply(work)
        assert [(t.id, t.up) for t in totals] == [(on0.id, 2)]
        assert failed == [work[1]] and poison == []
        assert len(errors) == 1 and "#1" in errors[0][1].message
        # The shard is back: the held vote and the (redelivered) rest are retried together.
        worker.pools = pools
        totals, failed, errors, poison = await worker.apply(work)
        assert {(t.id, t.up) for t in totals} == {(on0.id, 2), (on1.id, 1)}
        assert (failed, errors, poison) == ([], [], [])
        assert await counters(pools, on0.id) == (2, 0)
        assert await counters(pools, on1.id) == (1, 0)
    finally:
        await broken.close()


# -- feeds --------------------------------------------------------------------------------------


async def test_sql_hot_rank_equals_the_python_formula(pools: ShardPools) -> None:
    rng = random.Random(7)
    cases = [
        (rng.randint(0, 100_000), rng.randint(0, 100_000), rng.randint(EPOCH_MS, now_ms()))
        for _ in range(500)
    ] + [(0, 0, EPOCH_MS), (1, 0, now_ms()), (0, 1, now_ms()), (10, 0, now_ms())]
    rows = [(up, down, compose(ms, 5, 7)) for up, down, ms in cases]
    for physical in range(pools.physical_count):
        async with pools.connection(physical) as conn:
            got = await conn.fetch(
                """SELECT agora_hot(u, d, i) AS h FROM unnest($1::int[], $2::int[], $3::bigint[])
                   WITH ORDINALITY AS t(u, d, i, n) ORDER BY n""",
                [r[0] for r in rows],
                [r[1] for r in rows],
                [r[2] for r in rows],
            )
        assert [g["h"] for g in got] == [hot(u, d, decompose(i).ms) for u, d, i in rows]


async def test_feed_order_matches_the_formula_on_a_seeded_set(
    stack: Stack, g1: Proc, http: httpx.AsyncClient, pools: ShardPools, cache: FeedCache
) -> None:
    comm = community()
    rng = random.Random(11)
    now = now_ms()
    made: list[Post] = []
    # 40 posts from the last ten days with vote totals from strongly negative to viral.
    for i in range(40):
        age_ms = rng.randint(0, 10 * 86_400_000)
        gen = IdGenerator(clock=lambda age=age_ms: now - age)
        made += await seed(pools, cache, comm, 1, ids=gen)
        assert abs(decompose(made[-1].id).ms - (now - age_ms)) <= 1, i
    totals = {p.id: (rng.choice([0, 1, 2, 5, 30, 400]), rng.choice([0, 0, 1, 3, 50])) for p in made}
    for physical in range(pools.physical_count):
        async with pools.transaction(physical) as conn:
            await posts.apply_deltas(
                conn, {pid: t for pid, t in totals.items() if pools.for_id(pid) == physical}
            )
    rows = [(pid, up, down) for pid, (up, down) in totals.items()]
    reader = Api(http, stack, g1, uid("reader"))
    # Nobody has read this community's feeds, so these reads rebuild them from the shards,
    # with the counters just written.
    trending = await reader.feed("trending", community=comm, limit=100)
    assert [int(p["id"]) for p in trending["items"]] == by_formula(rows, "trending")
    assert trending["next"] is None
    assert [int(p["id"]) for p in (await reader.feed("new", community=comm))["items"]] == (
        by_formula(rows, "new")[:25]
    )
    for window, span in [("day", 86_400_000), ("week", 7 * 86_400_000), ("all", None)]:
        got = await reader.read_all("top", limit=7, community=comm, window=window)
        inside = [r for r in rows if span is None or decompose(r[0]).ms >= now_ms() - span]
        assert [int(p["id"]) for p in got] == by_formula(inside, "top"), window
    top_default = await reader.feed("top", community=comm, limit=100)
    assert [int(p["id"]) for p in top_default["items"]] == [
        int(p["id"]) for p in await reader.read_all("top", community=comm, window="day")
    ]

    # Live: votes through the real path move the post in the Redis sets, as the formula says.
    last = by_formula(rows, "trending")[-1]
    for i in range(12):
        await Api(http, stack, g1, f"fan{i}-{last}").vote(str(last), 1)
    up, down = totals[last]
    totals[last] = (up + 12, down)
    rows = [(pid, up, down) for pid, (up, down) in totals.items()]

    async def reordered() -> bool:
        page = await reader.feed("trending", community=comm, limit=100)
        return [int(p["id"]) for p in page["items"]] == by_formula(rows, "trending")

    await wait_until(reordered, what="trending order after the votes")


async def test_feeds_come_back_identical_after_redis_loses_everything(
    stack: Stack,
    g1: Proc,
    g2: Proc,
    http: httpx.AsyncClient,
    pools: ShardPools,
    redis_client: aioredis.Redis,
    keys: RedisKeys,
    settings: Settings,
) -> None:
    comm = community()
    # Start from an empty Redis, so the global feeds too are rebuilt from everything.
    await drop_session_keys(redis_client, settings.redis_prefix, "feed*")
    authors = [Api(http, stack, g1 if i % 2 else g2, uid(f"a{i}")) for i in range(4)]
    made = [await authors[i % 4].create(comm, f"p{i}") for i in range(30)]
    reader = Api(http, stack, g2, uid("reader"))
    for kind, window in ALL_FEEDS:  # ready before the votes: kept by the scores worker
        await reader.feed(kind, community=comm, **({"window": window} if window else {}))
        await reader.feed(kind, **({"window": window} if window else {}))
    # Up and down votes. The global sets hold other tests' posts too and are capped: a
    # capped set is exact at its top, while its tail may lack a post a rebuild would take
    # (fanout/feeds.py), so global feeds are compared on their first page, community feeds
    # (under the cap) in full.
    rng = random.Random(3)
    expected: dict[int, tuple[int, int]] = {}
    for i, post in enumerate(made):
        ups, downs = rng.randint(0, 6), rng.randint(0, 3) if i % 3 else 0
        expected[int(post["id"])] = (ups, downs)
        votes = [1] * ups + [-1] * downs
        await asyncio.gather(
            *(
                Api(http, stack, g1, f"u{j}-{post['id']}").vote(post["id"], v)
                for j, v in enumerate(votes)
            )
        )

    async def settled() -> bool:
        for pid, want in expected.items():
            if await counters(pools, pid) != want:
                return False
            ranked = await feed_score(redis_client, keys, Feed(FeedKind.TOP, comm, Window.ALL), pid)
            if ranked != want[0] - want[1]:
                return False
        return True

    await wait_until(settled, timeout=30, what="votes applied")

    async def everything() -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {}
        for kind, window in ALL_FEEDS:
            extra = {"window": window} if window else {}
            for scope, items in [
                (comm, await reader.read_all(kind, limit=9, community=comm, **extra)),
                ("*", (await reader.feed(kind, limit=100, **extra))["items"]),
            ]:
                out[f"{kind}:{window}:{scope}"] = [
                    (p["id"], p["score"], p["up"], p["down"]) for p in items
                ]
            # The community's sorted set itself, ranks included, bit for bit.
            out[f"{kind}:{window}:set"] = await redis_client.zrevrange(
                keys.feed(kind, comm, window), 0, -1, withscores=True
            )
        return out

    before = await everything()
    assert len(before[f"new:None:{comm}"]) == 30
    dropped = await drop_session_keys(redis_client, settings.redis_prefix)
    assert dropped > 0
    after = await everything()
    assert after == before
    stats = await redis_client.hgetall(keys.feed_stats())
    assert len(stats) == 2 * len(ALL_FEEDS)  # each feed rebuilt once from the shards
    assert set(stats.values()) == {b"1"}


async def test_paging_1000_posts_visits_each_once_while_scores_move(
    stack: Stack,
    g1: Proc,
    http: httpx.AsyncClient,
    pools: ShardPools,
    cache: FeedCache,
    redis_client: aioredis.Redis,
    keys: RedisKeys,
) -> None:
    comm = community()
    started = time.monotonic()
    made = await seed(pools, cache, comm, 1000)
    seed_s = time.monotonic() - started
    everyone = {p.id for p in made}
    reader = Api(http, stack, g1, uid("reader"))
    moved: dict[int, int] = {}  # post -> net votes given during the reads
    voter_ids = iter(range(1_000_000))

    async def move_scores(seen: list[int]) -> None:
        """Push unseen posts above the cursor and seen ones below it, then wait until the
        scores worker has moved them in the live sets: the moves that make a naive keyset
        cursor show a post twice or skip one."""
        unseen = sorted(everyone - set(seen))
        # Net +-2: log10(2) hours-worth of trending rank, more than the seconds between
        # these posts' creation, and 2 in top.
        targets = [(pid, 2) for pid in unseen[-3:]] + [(pid, -2) for pid in seen[:3]]
        calls = []
        for pid, net in targets:
            moved[pid] = moved.get(pid, 0) + net
            for _ in range(abs(net)):
                voter = Api(http, stack, g1, f"m{next(voter_ids)}-{pid}")
                calls.append(voter.vote(str(pid), 1 if net > 0 else -1))
        await asyncio.gather(*calls)

        async def live() -> bool:
            feed = Feed(FeedKind.TOP, comm, Window.ALL)
            for pid in {pid for pid, _ in targets}:
                if await feed_score(redis_client, keys, feed, pid) != moved[pid]:
                    return False
            return True

        await wait_until(live, what="moves in the live set")

    async def read(kind: str, limit: int, between: Callable[[list[int]], Awaitable[None]] | None,
                   every: int = 2, **params: Any) -> list[int]:  # fmt: skip
        seen: list[int] = []
        cursor = None
        pages = 0
        while True:
            extra = {"cursor": cursor} if cursor else {}
            page = await reader.feed(kind, community=comm, limit=limit, **params, **extra)
            seen += [int(p["id"]) for p in page["items"]]
            pages += 1
            cursor = page["next"]
            if cursor is None:
                return seen
            if between is not None and pages % every == 1:
                await between(seen)

    for kind, window in ALL_FEEDS:  # every set ready: the scores worker keeps them current
        await reader.feed(kind, community=comm, **({"window": window} if window else {}))
    read_started = time.monotonic()
    for kind, limit, every, params in [
        ("trending", 100, 2, {}),
        ("top", 37, 4, {"window": "all"}),
    ]:
        seen = await read(kind, limit, move_scores, every, **params)
        assert len(seen) == len(set(seen)) == 1000, (kind, len(seen), len(set(seen)))
        assert set(seen) == everyone, kind
    read_s = time.monotonic() - read_started

    # The live order did change under the readers: a post pushed up leads now.
    fresh = await read("top", 100, None, window="all")
    assert set(fresh) == everyone
    assert moved.get(fresh[0], 0) > 0 and moved.get(fresh[-1], 0) < 0

    # New posts arriving while a client pages `new` are not in that read.
    async def post_more(seen: list[int]) -> None:
        await Api(http, stack, g1, uid("late")).create(comm, "late")

    seen = await read("new", 50, post_more, 3)
    assert len(seen) == len(set(seen)) == 1000 and set(seen) == everyone

    # A snapshot that expired mid-read: the read resumes by keyset in a new snapshot.
    cursor = None
    seen = []
    for i in range(40):
        page = await reader.feed(
            "new", community=comm, limit=50, **({"cursor": cursor} if cursor else {})
        )
        seen += [int(p["id"]) for p in page["items"]]
        cursor = page["next"]
        if cursor is None:
            break
        if i % 3 == 0:
            await drop_session_keys(
                redis_client, stack.settings.redis_prefix, "feed:{new:" + comm + "}:snap*"
            )
    assert len(seen) == len(set(seen)) == 1000  # the newest 1000: the late posts are in
    print(
        f"\nseeded 1000 posts in {seed_s:.2f}s; read trending/top/new with score moves "
        f"every other page in {read_s:.2f}s"
    )


async def test_a_deleted_post_is_gone_from_every_feed(
    stack: Stack,
    g1: Proc,
    g2: Proc,
    http: httpx.AsyncClient,
    redis_client: aioredis.Redis,
    keys: RedisKeys,
    settings: Settings,
) -> None:
    comm = community()
    author = Api(http, stack, g1, uid("author"))
    reader = Api(http, stack, g2, uid("reader"))
    made = [await author.create(comm, f"p{i}") for i in range(5)]
    doomed = made[2]
    await Api(http, stack, g1, uid("fan")).vote(doomed["id"], 1)
    params = [{"window": w} if w else {} for _, w in ALL_FEEDS]
    open_reads = []
    for (kind, _), extra in zip(ALL_FEEDS, params, strict=True):
        page = await reader.feed(kind, community=comm, limit=1, **extra)
        open_reads.append((kind, extra, [p["id"] for p in page["items"]], page["next"]))
        assert doomed["id"] in [
            p["id"] for p in await reader.read_all(kind, community=comm, **extra)
        ]

    assert (await author.call("DELETE", f"/v1/posts/{doomed['id']}")).status_code == 204

    async def gone_everywhere() -> None:
        for (kind, window), extra in zip(ALL_FEEDS, params, strict=True):
            for scope in (comm, None):
                feed = Feed(FeedKind(kind), scope, Window(window) if window else None)
                assert await feed_score(redis_client, keys, feed, int(doomed["id"])) is None
            items = await reader.read_all(kind, community=comm, **extra)
            assert [p["id"] for p in items] == [
                p["id"] for p in items if p["id"] != doomed["id"]
            ] and len(items) == 4, kind
            first = await reader.feed(kind, limit=100, **extra)
            assert doomed["id"] not in [p["id"] for p in first["items"]]

    await gone_everywhere()
    # Reads that began before the delete (their snapshot still lists it) do not show it.
    for kind, extra, first, cursor in open_reads:
        rest: list[str] = []
        while cursor:
            page = await reader.feed(kind, community=comm, limit=1, cursor=cursor, **extra)
            rest += [p["id"] for p in page["items"]]
            cursor = page["next"]
        assert doomed["id"] not in rest, kind
        assert len(first + rest) == len({*first, *rest}), kind
        assert {*first, *rest} - {doomed["id"]} == {p["id"] for p in made} - {doomed["id"]}
    # Nor do the feeds rebuilt from the shards.
    await drop_session_keys(redis_client, settings.redis_prefix, "feed*")
    for kind, extra in zip([k for k, _ in ALL_FEEDS], params, strict=True):
        await reader.feed(kind, community=comm, **extra)
        await reader.feed(kind, **extra)
    await gone_everywhere()


async def test_my_vote_on_feed_pages_is_each_readers_own(
    stack: Stack, g1: Proc, g2: Proc, http: httpx.AsyncClient
) -> None:
    comm = community()
    author = Api(http, stack, g1, uid("author"))
    made = [(await author.create(comm, f"p{i}"))["id"] for i in range(4)]
    names = ["ann", "ben", "cat"]
    users = {name: uid(name) for name in names}

    def on(node: Proc, name: str) -> Api:
        return Api(http, stack, node, users[name])

    # Every reader's first pages are in both gateways' caches before anyone votes.
    for name in names:
        for node in (g1, g2):
            page = await on(node, name).feed("new", community=comm)
            assert [p["my_vote"] for p in page["items"]] == [0] * 4
    plan = {"ann": {made[0]: 1, made[1]: -1}, "ben": {}, "cat": {made[1]: 1, made[2]: -1}}
    for name, votes in plan.items():
        for post, value in votes.items():
            await on(g1, name).vote(post, value)
    # A vote is on the voter's next page on either node, and only on theirs: the cached
    # page is everyone's, the votes are read per reader.
    for kind in ("new", "top"):
        for name, votes in plan.items():
            for node in (g1, g2):
                page = await on(node, name).feed(kind, community=comm, limit=10)
                got = {p["id"]: p["my_vote"] for p in page["items"]}
                assert got == {post: votes.get(post, 0) for post in made}, (kind, name, node)
    await on(g2, "cat").vote(made[2], 0)
    page = await on(g1, "cat").feed("new", community=comm)
    assert {p["id"]: p["my_vote"] for p in page["items"]}[made[2]] == 0


async def test_concurrent_misses_rebuild_once(
    stack: Stack,
    g1: Proc,
    g2: Proc,
    http: httpx.AsyncClient,
    pools: ShardPools,
    cache: FeedCache,
    redis_client: aioredis.Redis,
    keys: RedisKeys,
) -> None:
    comm = community()
    await seed(pools, cache, comm, 60)  # nobody has read this community: no feed is ready
    readers = [Api(http, stack, g1 if i % 2 else g2, uid("r")) for i in range(30)]
    feed_key = keys.feed("trending", comm)

    async def stampede() -> list[list[str]]:
        pages = await asyncio.gather(*(r.feed("trending", community=comm) for r in readers))
        return [[p["id"] for p in page["items"]] for page in pages]

    started = time.monotonic()
    results = await stampede()
    stampede_s = time.monotonic() - started
    assert all(r == results[0] for r in results) and len(results[0]) == 25
    assert await redis_client.hget(keys.feed_stats(), feed_key) == b"1"
    # The marker expires (as it does every READY_TTL_S): again one rebuild for the crowd.
    await redis_client.delete(keys.feed_ready("trending", comm))
    assert (await stampede()) == results
    assert await redis_client.hget(keys.feed_stats(), feed_key) == b"2"
    print(f"\n30 concurrent misses on two gateways: 1 rebuild, all answered in {stampede_s:.2f}s")


async def test_keyset_queries_page_the_shards_exactly(pools: ShardPools, cache: FeedCache) -> None:
    comm = community()
    made = await seed(pools, cache, comm, 60)
    for physical in range(pools.physical_count):
        async with pools.transaction(physical) as conn:
            await posts.apply_deltas(
                conn, {p.id: (p.id % 7, p.id % 3) for p in made if pools.for_id(p.id) == physical}
            )
    for feed in [
        Feed(FeedKind.TRENDING, comm),
        Feed(FeedKind.NEW, comm),
        Feed(FeedKind.TOP, comm, Window.ALL),
        Feed(FeedKind.TOP, comm, Window.DAY),
    ]:
        whole = await posts.feed_candidates(pools, feed, now_ms(), 100)
        assert len(whole) == 60 and whole == sorted(whole, reverse=True)
        paged: list[tuple[float, int]] = []
        after = None
        while True:
            part = await posts.feed_candidates(pools, feed, now_ms(), 7, after=after)
            if not part:
                break
            paged += part
            after = part[-1]
        assert paged == whole, feed


async def test_updates_during_a_rebuild_are_not_lost(
    pools: ShardPools,
    cache: FeedCache,
    redis_client: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    comm = community()
    made = await seed(pools, cache, comm, 5)
    feed = Feed(FeedKind.TOP, comm, Window.ALL)
    k = cache.feed_keys(feed)
    # The rebuild reads the shards first: all five at 0 ...
    stale = await posts.feed_candidates(pools, feed, now_ms(), 100)
    assert {value for value, _ in stale} == {0.0}
    rising, doomed = made[0], made[1]

    async def read_then_writers_run(*args: Any, **kwargs: Any) -> list[tuple[float, int]]:
        # ... and while it works, a scores batch and a deletion land (PostgreSQL, then the
        # feed writers, which find no ready set but a rebuild in progress).
        async with pools.transaction(pools.for_id(rising.id)) as conn:
            totals = await posts.apply_deltas(conn, {rising.id: (5, 0)})
        await cache.on_totals(totals)
        await cache.on_deleted(doomed.id, comm)
        assert await redis_client.exists(k.live) == 0  # nothing written to a set not ready
        assert await redis_client.hlen(k.journal) == 2
        return stale

    monkeypatch.setattr("fanout.feeds.posts.feed_candidates", read_then_writers_run)
    await cache.ensure_ready(feed)
    ranked = await redis_client.zrevrange(k.live, 0, -1, withscores=True)
    assert ranked[0] == (member(rising.id).encode(), 5.0)
    assert member(doomed.id).encode() not in {m for m, _ in ranked}
    assert len(ranked) == 4
    assert await redis_client.exists(k.journal, k.lock, k.staging) == 0
    assert await redis_client.exists(k.ready) == 1


async def test_a_rebuilder_that_died_is_taken_over(
    pools: ShardPools, cache: FeedCache, redis_client: aioredis.Redis, keys: RedisKeys
) -> None:
    comm = community()
    await seed(pools, cache, comm, 3)
    feed = Feed(FeedKind.NEW, comm)
    k = cache.feed_keys(feed)
    # A process took the lock and died: its lock lapses after its TTL, then a reader
    # that was waiting rebuilds.
    # Timed from before the SET: the lock then lapses at least 0.3 s after `started`. Timed
    # from after it, the SET's own reply time (a loaded machine: tens of ms) came off the
    # wait, which could then measure under 0.25 s with the reader waiting correctly.
    started = time.monotonic()
    await redis_client.set(k.lock, "dead", px=300)
    page = await cache.page(feed, None, 10, "someone")
    assert 0.25 < time.monotonic() - started < 5
    assert len(page.items) == 3 and page.next is None
    assert await redis_client.hget(keys.feed_stats(), k.live) == b"1"


async def test_votes_rows_and_recount(pools: ShardPools, cache: FeedCache) -> None:
    (post,) = await seed(pools, cache, community(), 1)
    plan = [("a", 1), ("b", -1), ("a", 1), ("a", -1), ("c", 0), ("b", 0), ("d", 1)]
    changes = []
    for user, value in plan:
        result = await posts.vote(pools, post.id, user, value)
        assert result.change.new == value
        changes.append((result.change.up, result.change.down, result.pending))
    # Nothing is counted here (no scores worker for this post): a row is pending while its
    # value differs from the counted 0, and a repeat changes nothing.
    assert changes == [
        (1, 0, True),
        (0, 1, True),
        (0, 0, True),
        (-1, 1, True),
        (0, 0, False),
        (0, -1, False),
        (1, 0, True),
    ]
    async with pools.connection(pools.for_id(post.id)) as conn:
        pending = await posts.pending_votes(conn, 0, 1_000_000)
        assert {u for p, u in pending if p == post.id} == {"a", "d"}
    # recount derives the counters from the rows (a -1, d +1) and marks them counted.
    assert await posts.recount(pools, post.id) == (1, 1)
    assert await counters(pools, post.id) == (1, 1)
    assert await rows_counted(pools, post.id) == {
        "a": (-1, -1),
        "b": (0, 0),
        "c": (0, 0),
        "d": (1, 1),
    }
    async with pools.connection(pools.for_id(post.id)) as conn:
        pending = await posts.pending_votes(conn, 0, 1_000_000)
        assert not [u for p, u in pending if p == post.id]
