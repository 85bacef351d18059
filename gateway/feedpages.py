"""First pages of feeds, cached in the gateway process and checked against Redis per read.

Most feed reads are first pages (no cursor) of a few feeds, and a first page is the same for
every reader but for `my_vote`. So each gateway keeps, per (feed, limit), the first page as
everyone sees it (posts without votes, already encoded as JSON) with the feed's *stamp*
(fanout/feeds.py: the ready marker's rebuild token, the set's version, and `touched`)
read before the page was. A read then costs:

- one Redis round trip for the stamp, shared by every read that arrives while the previous
  one is in flight (`NextFlight`: a read joins the *next* trip, never one already sent, so
  its answer is never older than the read itself);
- the cached page when its stamp is the current one and it is younger than the TTL
  (AGORA_FEED_PAGE_CACHE_MS); else one fetch (ensure the set, read the stamp, snapshot,
  posts from the shards) shared by every read that misses at the same time (single-flight),
  accepted by a waiting read only if it shows the state that read saw or a later one;
- the viewer's own votes on the page's posts: one query per physical shard shared by every
  read of the same trip (votes live with their post, so no shard can answer for a viewer
  alone); a page is spliced from the encoded posts and each post's vote.

What a cached page may show that is older than the read (bounded staleness): nothing that
changes the stamp. Votes (re-ranks, and `touched` for `new`), new posts and deletions on any
node change it, so a read that starts after such a change was written to Redis sees it, as
does a read after Redis lost the sets (the ready token is new after every rebuild). The
scores worker writes counters to the shards first and the feeds right after: in between,
a cached page still shows the previous counters (an uncached read would show the new ones
in the old order). Only a post's `comments` count (its thread's messages, which bump no
feed) can be up to the TTL old on a first page; pages after the first are not cached.
A post deleted through this node also leaves the cached pages at once, even when its feed
update failed. The cursor of a cached first page names the snapshot it was read from: that
snapshot lives SNAPSHOT_TTL_S after it was opened, so at least that less the TTL after the
cursor was handed out; a read that comes back later resumes by keyset, as any read whose
snapshot expired does (fanout/feeds.py).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import orjson

from fanout.feeds import FeedCache, FeedCursor, FeedStamp
from gateway.http.common import encode_cursor
from gateway.http.posts import post_json
from storage import posts
from storage.pools import ShardPools
from storage.posts import Post
from storage.ranking import Feed

T = TypeVar("T")
R = TypeVar("R")

# Cached pages per process ((feed, limit) pairs), least recently used out first: at most
# this many, and at most this many bytes (a post's body may be 40,000 characters).
MAX_ENTRIES = 1024
MAX_BYTES = 64 * 1024 * 1024
MAX_FETCH_ROUNDS = 4  # fetches a read waits for before it fetches anyway

_VOTE = {1: b"1}", 0: b"0}", -1: b"-1}"}
_ITEMS = b'{"items":['


class NextFlight(Generic[T, R]):
    """Coalesces concurrent lookups into one call of `run`, one flight at a time.

    A lookup joins the next flight to leave: one that starts after the lookup was made,
    so the answer is never from a read that began before it. While a flight is out, new
    lookups gather for the following one. Each answer comes with the flight's number
    (increasing): an answer of flight n saw the state of the store at some moment after
    every lookup of flights <= n was made.
    """

    def __init__(self, run: Callable[[list[T]], Awaitable[Sequence[R]]]) -> None:
        self._run = run
        self._waiting: list[tuple[T, asyncio.Future[tuple[R, int]]]] = []
        self._flying: asyncio.Task[None] | None = None
        self.flights = 0
        self.lookups = 0

    async def get(self, item: T) -> tuple[R, int]:
        fut: asyncio.Future[tuple[R, int]] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, fut))
        self.lookups += 1
        if self._flying is None:
            self._flying = asyncio.create_task(self._fly())
        return await fut

    async def _fly(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                self.flights += 1
                number = self.flights
                try:
                    results = await self._run([item for item, _ in batch])
                except asyncio.CancelledError:
                    for _, fut in batch:
                        fut.cancel()
                    raise
                except Exception as exc:
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                for (_, fut), result in zip(batch, results, strict=True):
                    if not fut.done():
                        fut.set_result((result, number))
        finally:
            self._flying = None
            for _, fut in self._waiting:  # only if cancelled (shutdown) with lookups left
                fut.cancel()
            self._waiting = []


def cursor_text(cursor: FeedCursor | None) -> str | None:
    if cursor is None:
        return None
    # The rank as repr: the shortest text that reads back as the same float.
    return encode_cursor(cursor.snapshot, cursor.offset, repr(cursor.rank), str(cursor.post))


@dataclass(slots=True)
class CachedPage:
    """A first page as everyone sees it, encoded: `heads[i]` is post i's JSON object up to
    the value of its last key, my_vote; `plain` the whole body with every my_vote 0."""

    stamp: FeedStamp
    flight: int  # the stamp's NextFlight number
    built: float  # time.monotonic() when the stamp was read
    ids: tuple[int, ...]
    heads: list[bytes]
    tail: bytes
    plain: bytes
    size: int  # bytes held

    @classmethod
    def encode(
        cls, stamp: FeedStamp, flight: int, built: float, items: list[Post], nxt: str | None
    ) -> CachedPage:
        heads = []
        for p in items:
            obj = post_json(p)
            del obj["my_vote"]
            heads.append(orjson.dumps(obj)[:-1] + b',"my_vote":')
        tail = b'],"next":' + orjson.dumps(nxt) + b"}"
        plain = _ITEMS + b",".join(h + _VOTE[0] for h in heads) + tail
        size = len(plain) + sum(len(h) for h in heads)
        return cls(stamp, flight, built, tuple(p.id for p in items), heads, tail, plain, size)

    def body(self, votes: dict[int, int]) -> bytes:
        """The page for a viewer with these votes (post -> value) on it."""
        if not votes:
            return self.plain
        parts = [h + _VOTE[votes.get(pid, 0)] for h, pid in zip(self.heads, self.ids, strict=True)]
        return _ITEMS + b",".join(parts) + self.tail


class FeedPages:
    """The gateway's first-page cache (see the module docstring)."""

    def __init__(self, feeds: FeedCache, pools: ShardPools, ttl_ms: int) -> None:
        self.feeds = feeds
        self.pools = pools
        self.ttl_s = ttl_ms / 1000
        self._pages: OrderedDict[tuple[Feed, int], CachedPage] = OrderedDict()
        self._bytes = 0
        self._fetching: dict[tuple[Feed, int], asyncio.Task[CachedPage]] = {}
        self.stamps: NextFlight[Feed, FeedStamp] = NextFlight(self._read_stamps)
        self.votes: NextFlight[tuple[str, tuple[int, ...]], dict[int, int]] = NextFlight(
            self._read_votes
        )
        self.hits = 0
        self.fetches = 0

    @property
    def enabled(self) -> bool:
        return self.ttl_s > 0

    async def _read_stamps(self, feeds: list[Feed]) -> list[FeedStamp]:
        distinct = list(dict.fromkeys(feeds))
        by_feed = dict(zip(distinct, await self.feeds.stamps(distinct), strict=True))
        return [by_feed[f] for f in feeds]

    async def _read_votes(self, wanted: list[tuple[str, tuple[int, ...]]]) -> list[dict[int, int]]:
        ids = {pid for _, page in wanted for pid in page}
        found = await posts.votes_of(self.pools, ids, {viewer for viewer, _ in wanted})
        return [
            {pid: found[(viewer, pid)] for pid in page if (viewer, pid) in found}
            for viewer, page in wanted
        ]

    async def first_page(self, feed: Feed, limit: int, viewer: str) -> bytes:
        """The JSON body of `feed`'s first page of `limit` posts for `viewer`."""
        page = await self._page(feed, limit)
        if not page.ids:
            return page.plain
        votes, _ = await self.votes.get((viewer, page.ids))
        return page.body(votes)

    async def _page(self, feed: Feed, limit: int) -> CachedPage:
        stamp, flight = await self.stamps.get(feed)
        key = (feed, limit)
        page = self._pages.get(key)
        if (
            page is not None
            and stamp[0] is not None
            and page.stamp == stamp
            and time.monotonic() - page.built < self.ttl_s
        ):
            self._pages.move_to_end(key)
            self.hits += 1
            return page
        for _ in range(MAX_FETCH_ROUNDS):
            task = self._fetching.get(key)
            if task is None:
                task = self._fetching[key] = asyncio.create_task(self._fetch(feed, limit))
                task.add_done_callback(functools.partial(self._fetched, key))
            # Shielded: a reader that goes away does not cancel the others' fetch.
            fetched = await asyncio.shield(task)
            # A fetch that read its stamp on this read's trip or a later one, or that saw
            # the same state, shows what this read must see; an older one may not. (A fetch
            # started after this read's trip always qualifies: the second round is the last.)
            if fetched.flight >= flight or (stamp[0] is not None and fetched.stamp == stamp):
                return fetched
        return fetched

    def _fetched(self, key: tuple[Feed, int], task: asyncio.Task[CachedPage]) -> None:
        if self._fetching.get(key) is task:
            del self._fetching[key]
        if task.cancelled() or task.exception() is not None:
            return  # (the exception reaches the readers that wait for it)
        page = task.result()
        current = self._pages.get(key)
        if current is None or current.flight <= page.flight:
            self._drop(key)
            self._pages[key] = page
            self._bytes += page.size
            while len(self._pages) > MAX_ENTRIES or self._bytes > MAX_BYTES:
                self._drop(next(iter(self._pages)))

    def _drop(self, key: tuple[Feed, int]) -> None:
        page = self._pages.pop(key, None)
        if page is not None:
            self._bytes -= page.size

    async def _fetch(self, feed: Feed, limit: int) -> CachedPage:
        self.fetches += 1
        while True:
            await self.feeds.ensure_ready(feed)
            # The stamp before the snapshot: the page shows this state or a later one.
            stamp, flight = await self.stamps.get(feed)
            built = time.monotonic()
            if stamp[0] is not None:  # else the marker went away meanwhile: again
                break
        result = await self.feeds.first_page(feed, limit, None)
        return CachedPage.encode(stamp, flight, built, result.items, cursor_text(result.next))

    def forget_post(self, post_id: int) -> None:
        """Drop every cached page that shows `post_id` (deleted through this node)."""
        for key in [k for k, page in self._pages.items() if post_id in page.ids]:
            self._drop(key)
        # A fetch in flight may have read the post before it was deleted: not cached.
        for task in self._fetching.values():
            task.add_done_callback(lambda t: self._drop_if_shows(t, post_id))

    def _drop_if_shows(self, task: asyncio.Task[CachedPage], post_id: int) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        page = task.result()
        for key, cached in list(self._pages.items()):
            if cached is page and post_id in page.ids:
                self._drop(key)
