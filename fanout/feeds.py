"""Feeds: Redis sorted sets kept current by writers, rebuilt from the shards on a miss.

One sorted set per feed (`storage.ranking.Feed`: kind x scope x window), member = the
fixed-width post id, score = the post's rank, at most FEED_DEPTH members (the best ones;
like Reddit's listings, a feed ends there). PostgreSQL stays the truth: every set can be
thrown away and rebuilt.

Writers (post creation and deletion in the gateway, the scores worker after each batch)
change a set only while its *ready marker* exists. A reader that finds no marker rebuilds
the set from every shard (scatter-gather, merge) under a lock, so concurrent misses cause
one rebuild: the others wait for the marker. While a rebuild runs, writers also note their
changes in a journal that the rebuild replays after swapping its set in; nothing written
during the rebuild's read is lost. The marker expires (READY_TTL_S), so a set is rebuilt
from time to time, which also ages posts out of the day/week windows and repairs the tail
of a capped set.

Paging: a first page freezes the set into a *snapshot* (a copy, shared by every reader
that starts while the set does not change) and the cursor is (snapshot, offset). A first
page always reads a snapshot of the set's current version: one that shows the set as it
was a moment ago would rank a page by old scores next to its current counters (snapshots
were once reused for a second, and a page read right after votes settled came back in
its pre-vote order). Ranks that move while a client pages move only the live set, so one
read never shows a post twice and never skips one. Scores, counters and deletions on a
page are current as of its read: the posts themselves come from the shards (deleted ones
are left out). When a snapshot has expired (a client idle
for SNAPSHOT_READ_TTL_S) the read continues in a new snapshot right after the (rank, id)
of its last entry: keyset paging, exact for `new` and as good as the moves allow otherwise.
A snapshot is a copy of at most FEED_DEPTH entries (about 100 KB): a feed that is read
after each of its changes keeps one per change of the last SNAPSHOT_TTL_S alive, plus those
being paged. Gateways read first pages through their page cache (gateway/feedpages.py),
which asks for a snapshot only when the feed's *stamp* changed: the ready marker's value
(new with every rebuild), the version (bumped by every change of the set) and `touched`
(bumped when counters change without a move, as votes do in `new`); `stamps` reads them
for many feeds in one round trip.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import redis.asyncio as aioredis

from core.errors import Unavailable
from storage import posts
from storage.ids import decompose, now_ms
from storage.pools import ShardPools
from storage.posts import Post, Totals
from storage.ranking import (
    Feed,
    FeedKind,
    Ranked,
    Window,
    all_feeds_of_community,
    feeds_of_post,
    member,
    member_id,
    position_after,
    rank,
)
from storage.redis_keys import RedisKeys

log = logging.getLogger("agora.feeds")

FEED_DEPTH = 1000
READY_TTL_S = 3600  # a feed set is rebuilt from the shards at least this often
READY_TTL_DAY_S = 600  # ... and top/day more often: its posts age out of the window
LIVE_TTL_S = 2 * READY_TTL_S  # frees the sets of feeds nobody reads any more
LOCK_TTL_MS = 30_000
REBUILD_TIMEOUT_S = 20.0  # < the lock TTL: a slow rebuild gives up before it is overtaken
WAIT_TIMEOUT_S = 25.0
WAIT_POLL_S = 0.02
JOURNAL_TTL_S = 60
SNAPSHOT_TTL_S = 30  # a snapshot nobody pages through is dropped soon
SNAPSHOT_READ_TTL_S = 300  # ... one being paged lives this long after each page
MAX_FILL_ROUNDS = 4  # reads of the snapshot per page when entries are filtered out
_SNAPSHOT_NAME = re.compile(r"^\d{1,12}-\d{13}$")

# Apply changes to a feed set. KEYS: live, ready, lock, journal, version, touched.
# ARGV: depth, journal ttl, live ttl, then member, rank-or-'-'-or-'=' pairs ('-': remove,
# '=': the post's counters changed but not its place, as votes do in `new`; only bumps
# `touched`, so cached pages showing the counters are told apart).
_WRITE = """
local ready = redis.call('EXISTS', KEYS[2]) == 1
local building = redis.call('EXISTS', KEYS[3]) == 1
if not ready and not building then return 0 end
local moved, touched = false, false
for i = 4, #ARGV, 2 do
  local m, s = ARGV[i], ARGV[i + 1]
  if s == '=' then
    touched = true
  else
    moved = true
    if ready then
      if s == '-' then redis.call('ZREM', KEYS[1], m) else redis.call('ZADD', KEYS[1], s, m) end
    end
    if building then redis.call('HSET', KEYS[4], m, s) end
  end
end
if ready and moved then
  local extra = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[1])
  if extra > 0 then redis.call('ZREMRANGEBYRANK', KEYS[1], 0, extra - 1) end
  if redis.call('TTL', KEYS[1]) == -1 then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
  redis.call('INCR', KEYS[5])
  redis.call('EXPIRE', KEYS[5], ARGV[3])
end
if ready and touched then
  redis.call('INCR', KEYS[6])
  redis.call('EXPIRE', KEYS[6], ARGV[3])
end
if building and moved then redis.call('EXPIRE', KEYS[4], ARGV[2]) end
return 1
"""

# Swap a rebuilt set in, replay the journal, mark ready, release the lock: only for the
# holder of the lock. The ready marker holds the rebuild's token, so a set rebuilt after
# Redis lost everything is told apart from the one before even though its version counter
# starts again. KEYS: live, ready, lock, journal, staging, version.
# ARGV: token, depth, ready ttl, live ttl.
_SWAP = """
if redis.call('GET', KEYS[3]) ~= ARGV[1] then
  redis.call('DEL', KEYS[5])
  return 0
end
if redis.call('EXISTS', KEYS[5]) == 1 then
  redis.call('RENAME', KEYS[5], KEYS[1])
else
  redis.call('DEL', KEYS[1])
end
local j = redis.call('HGETALL', KEYS[4])
for i = 1, #j, 2 do
  if j[i + 1] == '-' then
    redis.call('ZREM', KEYS[1], j[i])
  else
    redis.call('ZADD', KEYS[1], j[i + 1], j[i])
  end
end
local extra = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[2])
if extra > 0 then redis.call('ZREMRANGEBYRANK', KEYS[1], 0, extra - 1) end
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('EXPIRE', KEYS[1], ARGV[4]) end
redis.call('DEL', KEYS[4], KEYS[3])
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[3])
redis.call('INCR', KEYS[6])
redis.call('EXPIRE', KEYS[6], ARGV[4])
return 1
"""

# Take the rebuild lock unless the feed is ready: one atomic step, so a reader that saw the
# miss just before another finished rebuilding does not rebuild again. KEYS: ready, lock.
# ARGV: token, lock ttl ms. Returns 1: ready, 2: the lock is ours, 0: someone rebuilds.
_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 1 end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return 2 end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# The snapshot a first page reads: the latest one if the set has not changed since (same
# version of the same rebuild), else a new copy; either lives >= SNAPSHOT_TTL_S. Never an
# older version's: a first page shows the set as it is when it is read.
# KEYS: live, version, latest, ready.
# ARGV: now ms, ttl s, snapshot key prefix. Returns the snapshot's name. The snapshot's key
# is made here, from the prefix; it carries the feed's hash tag, so it is in the slot of
# the declared keys.
_SNAPSHOT = """
local v = redis.call('GET', KEYS[2]) or '0'
local r = redis.call('GET', KEYS[4]) or ''
local latest = redis.call('HMGET', KEYS[3], 'name', 'v', 'r')
if latest[1] and latest[2] == v and latest[3] == r
   and redis.call('EXISTS', ARGV[3] .. latest[1]) == 1 then
  -- A first page read now may want a second page in a while: keep the snapshot at
  -- least that long (never shorten one that someone is paging through).
  if redis.call('TTL', ARGV[3] .. latest[1]) < tonumber(ARGV[2]) then
    redis.call('EXPIRE', ARGV[3] .. latest[1], ARGV[2])
  end
  redis.call('EXPIRE', KEYS[3], ARGV[2])
  return latest[1]
end
local name = v .. '-' .. ARGV[1]
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('ZUNIONSTORE', ARGV[3] .. name, 1, KEYS[1])
  redis.call('EXPIRE', ARGV[3] .. name, ARGV[2])
  redis.call('HSET', KEYS[3], 'name', name, 'v', v, 'r', r, 'ms', ARGV[1])
  redis.call('EXPIRE', KEYS[3], ARGV[2])
end
return name
"""


@dataclass(frozen=True, slots=True)
class FeedCursor:
    """Where a read stopped: a snapshot, the offset in it, and the (rank, id) of the last
    entry read (to resume by keyset when the snapshot is gone)."""

    snapshot: str
    offset: int
    rank: float
    post: int

    def __post_init__(self) -> None:
        if not _SNAPSHOT_NAME.match(self.snapshot) or not 0 <= self.offset <= FEED_DEPTH:
            raise ValueError("not a feed cursor")


@dataclass(frozen=True, slots=True)
class FeedPage:
    items: list[Post]
    next: FeedCursor | None


# What a feed's set is now, as far as a page of it shows: (ready marker = the token of the
# rebuild that made the set, version, touched). The same stamp means the same set and the
# same counters; no ready marker (None first) means the set must be rebuilt first.
FeedStamp = tuple[bytes | None, bytes | None, bytes | None]


@dataclass(frozen=True, slots=True)
class _FeedKeys:
    live: str
    ready: str
    lock: str
    journal: str
    staging: str
    version: str
    touched: str
    latest: str
    snapshot_prefix: str


class FeedCache:
    def __init__(
        self, redis: aioredis.Redis, keys: RedisKeys, pools: ShardPools, depth: int = FEED_DEPTH
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.pools = pools
        self.depth = depth
        self._write = redis.register_script(_WRITE)
        self._swap = redis.register_script(_SWAP)
        self._acquire = redis.register_script(_ACQUIRE)
        self._release = redis.register_script(_RELEASE)
        self._snapshot = redis.register_script(_SNAPSHOT)
        self.rebuilds = 0  # by this process

    def feed_keys(self, feed: Feed) -> _FeedKeys:
        k = self.keys
        args = (feed.kind.value, feed.community, feed.window.value if feed.window else None)
        return _FeedKeys(
            live=k.feed(*args),
            ready=k.feed_ready(*args),
            lock=k.feed_rebuild_lock(*args),
            journal=k.feed_journal(*args),
            staging=k.feed_staging(*args),
            version=k.feed_version(*args),
            touched=k.feed_touched(*args),
            latest=k.feed_latest_snapshot(*args),
            snapshot_prefix=k.feed_snapshot(*args, ""),
        )

    # -- writers ------------------------------------------------------------------------------
    async def _apply(self, changes: dict[Feed, dict[str, str]]) -> None:
        """Apply member -> rank ('-' = remove) per feed: one script call per feed, all in
        one round trip."""
        if not changes:
            return
        calls: list[tuple[list[str], list[str | int]]] = []
        for feed, entries in changes.items():
            k = self.feed_keys(feed)
            args: list[str | int] = [self.depth, JOURNAL_TTL_S, LIVE_TTL_S]
            for m, value in entries.items():
                args += [m, value]
            calls.append(([k.live, k.ready, k.lock, k.journal, k.version, k.touched], args))
        if self.keys.cluster:
            # A cluster pipeline refuses scripts (each feed is its own slot): one call per
            # feed. In turn, not gathered: concurrent first calls on redis-py's cluster
            # client (8.1) raced its connection set-up ("the handler is closed").
            for ks, a in calls:
                await self._write(keys=ks, args=a)
            return
        pipe = self.redis.pipeline(transaction=False)
        for ks, a in calls:
            await self._write(keys=ks, args=a, client=pipe)
        await pipe.execute()

    async def on_created(self, post: Post) -> None:
        now = now_ms()
        changes: dict[Feed, dict[str, str]] = {}
        for feed in feeds_of_post(post.community, post.created_ms, now):
            value = rank(feed.kind, post.up, post.down, post.created_ms)
            changes[feed] = {member(post.id): repr(value)}
        await self._apply(changes)

    async def on_deleted(self, post_id: int, community: str) -> None:
        await self._apply({f: {member(post_id): "-"} for f in all_feeds_of_community(community)})

    async def on_totals(self, totals: Iterable[Totals]) -> None:
        """New counters from a scores batch: re-rank (or, if deleted, remove) each post."""
        now = now_ms()
        changes: dict[Feed, dict[str, str]] = defaultdict(dict)
        for t in totals:
            m = member(t.id)
            if t.deleted:
                for feed in all_feeds_of_community(t.community):
                    changes[feed][m] = "-"
                continue
            created = decompose(t.id).ms
            for feed in feeds_of_post(t.community, created, now):
                if feed.kind is FeedKind.NEW:  # votes do not move a post in `new` ...
                    changes[feed][m] = "="  # ... but its pages show the new counters
                else:
                    changes[feed][m] = repr(rank(feed.kind, t.up, t.down, created))
        await self._apply(changes)

    # -- misses and rebuilds --------------------------------------------------------------------
    async def ensure_ready(self, feed: Feed) -> None:
        """Return once the feed's set is complete, rebuilding it (once, whoever asks) if not."""
        k = self.feed_keys(feed)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_TIMEOUT_S
        while True:
            token = secrets.token_hex(8)
            state = await self._acquire(keys=[k.ready, k.lock], args=[token, LOCK_TTL_MS])
            if state == 1:
                return
            if state == 2:
                await self._rebuild_locked(feed, k, token)
                continue  # normally ready now; if the lock was lost meanwhile, go again
            # Another process is rebuilding: wait for its marker, or take over if it died.
            while True:
                await asyncio.sleep(WAIT_POLL_S)
                pipe = self.redis.pipeline(transaction=False)
                pipe.exists(k.ready)
                pipe.exists(k.lock)
                ready, locked = await pipe.execute()
                if ready or not locked:
                    break
                if loop.time() > deadline:
                    raise Unavailable("the feed is being rebuilt; retry shortly")
            if loop.time() > deadline:
                raise Unavailable("the feed could not be rebuilt; retry shortly")

    async def _rebuild_locked(self, feed: Feed, k: _FeedKeys, token: str) -> None:
        try:
            await asyncio.wait_for(self._rebuild(feed, k, token), REBUILD_TIMEOUT_S)
        except BaseException as exc:
            await asyncio.shield(self._release(keys=[k.lock], args=[token]))
            if isinstance(exc, TimeoutError):
                # A shard too slow to answer: the reader is told to retry, like any other
                # unavailable dependency (not an internal error).
                raise Unavailable("the feed could not be rebuilt in time; retry shortly") from exc
            raise

    async def _rebuild(self, feed: Feed, k: _FeedKeys, token: str) -> None:
        # A journal or staging set left by a rebuilder that died holds nothing we need.
        await self.redis.delete(k.journal, k.staging)
        entries = await posts.feed_candidates(self.pools, feed, now_ms(), self.depth)
        if entries:
            pipe = self.redis.pipeline(transaction=False)
            for i in range(0, len(entries), 500):
                chunk = entries[i : i + 500]
                pipe.zadd(k.staging, {member(post_id): value for value, post_id in chunk})
            pipe.expire(k.staging, JOURNAL_TTL_S)
            await pipe.execute()
        ready_ttl = READY_TTL_DAY_S if feed.window is Window.DAY else READY_TTL_S
        swapped = await self._swap(
            keys=[k.live, k.ready, k.lock, k.journal, k.staging, k.version],
            args=[token, self.depth, ready_ttl, LIVE_TTL_S],
        )
        if swapped:
            self.rebuilds += 1
            await self.redis.hincrby(self.keys.feed_stats(), k.live, 1)
            log.info("rebuilt feed %s from the shards: %d posts", k.live, len(entries))
        else:
            log.warning("feed %s: rebuild lost its lock (slow, or Redis restarted)", k.live)

    # -- readers --------------------------------------------------------------------------------
    async def stamps(self, feeds: Iterable[Feed]) -> list[FeedStamp]:
        """The stamp of each feed (see FeedStamp), all in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for feed in feeds:
            k = self.feed_keys(feed)
            # Three GETs, not an MGET: a Redis Cluster pipeline refuses MGET.
            pipe.get(k.ready)
            pipe.get(k.version)
            pipe.get(k.touched)
        got = await pipe.execute()
        return [(got[i], got[i + 1], got[i + 2]) for i in range(0, len(got), 3)]

    async def page(
        self, feed: Feed, cursor: FeedCursor | None, limit: int, viewer: str | None
    ) -> FeedPage:
        """A page of `feed`: the first (no cursor) or the one after `cursor`. Posts carry
        `viewer`'s votes; with no viewer, my_vote is 0 (pages cached for everyone)."""
        k = self.feed_keys(feed)
        if cursor is not None and await self.redis.exists(k.snapshot_prefix + cursor.snapshot):
            name, offset = cursor.snapshot, cursor.offset
        else:
            await self.ensure_ready(feed)
            name = await self.open_snapshot(feed)
            offset = 0
            if cursor is not None:
                offset = await self._position(k.snapshot_prefix + name, (cursor.rank, cursor.post))
        # Only a read that goes on past its first page keeps its snapshot alive longer.
        keep_s = SNAPSHOT_READ_TTL_S if cursor is not None else None
        return await self._read(feed, k.snapshot_prefix + name, name, offset, limit, viewer, keep_s)

    async def first_page(self, feed: Feed, limit: int, viewer: str | None) -> FeedPage:
        """The first page in the snapshot of the set as it is now. The caller has made the
        feed ready (ensure_ready) and read its stamp after that: the page shows that state
        or a later one."""
        k = self.feed_keys(feed)
        name = await self.open_snapshot(feed)
        return await self._read(feed, k.snapshot_prefix + name, name, 0, limit, viewer, None)

    async def open_snapshot(self, feed: Feed) -> str:
        """The name of a snapshot of the set's current version (made if there is none)."""
        k = self.feed_keys(feed)
        raw = await self._snapshot(
            keys=[k.live, k.version, k.latest, k.ready],
            args=[now_ms(), SNAPSHOT_TTL_S, k.snapshot_prefix],
        )
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    async def _position(self, snapshot: str, after: Ranked) -> int:
        """The offset in `snapshot` of the first entry below `after` (rank, id)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zcount(snapshot, f"({after[0]!r}", "+inf")
        pipe.zrangebyscore(snapshot, repr(after[0]), repr(after[0]), withscores=True)
        above, ties = await pipe.execute()
        tied = [(float(score), member_id(m)) for m, score in ties]
        return int(above) + position_after(tied, after)

    async def _read(
        self,
        feed: Feed,
        snapshot: str,
        name: str,
        offset: int,
        limit: int,
        viewer: str | None,
        keep_s: int | None,
    ) -> FeedPage:
        now = now_ms()
        items: list[Post] = []
        last: Ranked | None = None
        size = 0
        for _ in range(MAX_FILL_ROUNDS):
            want = limit - len(items)
            pipe = self.redis.pipeline(transaction=False)
            pipe.zrevrange(snapshot, offset, offset + want - 1, withscores=True)
            pipe.zcard(snapshot)
            if keep_s is not None:
                pipe.expire(snapshot, keep_s)
            chunk, size, *_ = await pipe.execute()
            if not chunk:
                break
            entries = [(float(score), member_id(m)) for m, score in chunk]
            # Top day/week: the set was built earlier; posts may have aged out since.
            wanted = [pid for _, pid in entries if feed.admits(decompose(pid).ms, now)]
            found = await posts.get_many(self.pools, wanted, viewer) if wanted else {}
            for entry in entries:
                offset += 1
                last = entry
                post = found.get(entry[1])
                if post is not None:
                    items.append(post)
            if len(items) >= limit or offset >= size:
                break
        more = last is not None and offset < size
        nxt = FeedCursor(name, offset, last[0], last[1]) if more and last is not None else None
        return FeedPage(items, nxt)
