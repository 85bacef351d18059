"""Posts, votes and the feed rebuild queries.

A post, its votes and its thread conversation live on the author's logical shard (both ids
carry it). Counters (`up`, `down`) are written only by the scores worker, one UPDATE per
post per batch (`apply_deltas`), so a popular post is never one row locked by every voter:
a vote writes just the voter's own row (`vote`). Each vote row also keeps the value the
counters hold for it (`counted`); the worker moves it to `value` in the counters'
transaction (`count_votes`), so the counters always equal the sum of `counted`.
"""

from __future__ import annotations

import asyncio
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import asyncpg

from core.errors import Forbidden, NotFound, Unprocessable
from storage import conversations
from storage.ids import IdGenerator, compose, decompose
from storage.pools import ShardPools
from storage.ranking import Feed, FeedKind, Ranked, merge_ranked, rank

MAX_TITLE = 300
MAX_BODY = 40_000
COMMUNITY = re.compile(r"^[a-z0-9_]{1,64}$")
VOTE_VALUES = (1, 0, -1)
_MAX_CREATE_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class Post:
    id: int
    author: str
    community: str
    title: str
    body: str
    thread: int
    up: int
    down: int
    comments: int  # the thread's last seq: every message of a thread is a comment
    my_vote: int  # the viewer's vote, 0 when none

    @property
    def created_ms(self) -> int:
        return decompose(self.id).ms

    @property
    def score(self) -> int:
        return self.up - self.down


@dataclass(frozen=True, slots=True)
class Totals:
    """A post's counters after a scores batch, with what the feeds and frames need."""

    id: int
    thread: int
    community: str
    up: int
    down: int
    deleted: bool


@dataclass(frozen=True, slots=True)
class VoteChange:
    """What one vote did to the voter's row; `up`/`down` are the deltas for the counters."""

    post: int
    old: int
    new: int

    @property
    def up(self) -> int:
        return (self.new == 1) - (self.old == 1)

    @property
    def down(self) -> int:
        return (self.new == -1) - (self.old == -1)

    @property
    def changed(self) -> bool:
        return self.old != self.new


@dataclass(frozen=True, slots=True)
class VoteResult:
    change: VoteChange
    up: int  # the counters as applied when the vote was taken, with this vote in them
    down: int
    pending: bool  # the row's value is not in the counters yet: a record must name it


# -- validation (docs/protocol.md limits) ----------------------------------------------------------


def _text(value: Any, what: str, lo: int, hi: int) -> str:
    if not isinstance(value, str) or not lo <= len(value) <= hi:
        raise Unprocessable(f"{what} must be a string of {lo}-{hi:,} characters")
    if "\x00" in value:  # PostgreSQL text cannot hold NUL; refuse it rather than fail later
        raise Unprocessable(f"{what} must not contain NUL characters")
    return value


def validate_title(value: Any) -> str:
    return _text(value, "title", 1, MAX_TITLE)


def validate_body(value: Any) -> str:
    return _text(value, "body", 0, MAX_BODY)


def is_community(value: Any) -> bool:
    return isinstance(value, str) and COMMUNITY.match(value) is not None


def validate_community(value: Any) -> str:
    if not is_community(value):
        raise Unprocessable("community must be 1-64 characters of [a-z0-9_]")
    assert isinstance(value, str)
    return value


def validate_vote(value: Any) -> int:
    # `type is int`: JSON true is a Python bool, and bool is a subclass of int.
    if type(value) is not int or value not in VOTE_VALUES:
        raise Unprocessable("value must be 1, 0 or -1")
    return value


# -- rows ---------------------------------------------------------------------------------------


def _shard(pools: ShardPools, post_id: int) -> int:
    """The physical shard of a post id from a client; an id whose logical shard this
    deployment does not have names no post."""
    try:
        return pools.for_id(post_id)
    except ValueError:
        raise NotFound("no such post") from None


_SELECT = """
    SELECT p.id, p.author, p.community, p.title, p.body, p.thread_id, p.up, p.down,
           COALESCE(c.last_seq, 0) AS comments, COALESCE(v.value, 0) AS my_vote
    FROM posts p
    LEFT JOIN conversations c ON c.id = p.thread_id
    LEFT JOIN votes v ON v.post_id = p.id AND v.user_id = $2
"""


# The same columns without the viewer's vote (my_vote 0): posts as everyone sees them.
_SELECT_ANONYMOUS = """
    SELECT p.id, p.author, p.community, p.title, p.body, p.thread_id, p.up, p.down,
           COALESCE(c.last_seq, 0) AS comments, 0 AS my_vote
    FROM posts p
    LEFT JOIN conversations c ON c.id = p.thread_id
"""


def _row_to_post(r: Any) -> Post:
    return Post(
        id=r["id"],
        author=r["author"],
        community=r["community"],
        title=r["title"],
        body=r["body"],
        thread=r["thread_id"],
        up=r["up"],
        down=r["down"],
        comments=r["comments"],
        my_vote=r["my_vote"],
    )


async def create(
    pools: ShardPools, ids: IdGenerator, author: str, community: str, title: str, body: str
) -> Post:
    """Create a post and its thread in one transaction on the author's shard."""
    logical = pools.map.logical_for_user(author)
    physical = pools.map.physical(logical)
    for attempt in range(_MAX_CREATE_ATTEMPTS):
        post_id = ids.next_id(logical)
        thread_id = ids.next_id(logical)
        try:
            async with pools.transaction(physical) as conn:
                await conversations.create_thread(pools, conn, thread_id, author, title)
                await conn.execute(
                    """INSERT INTO posts (id, author, community, title, body, thread_id,
                                          created_at)
                       VALUES ($1, $2, $3, $4, $5, $6, to_timestamp($7 / 1000.0))""",
                    post_id,
                    author,
                    community,
                    title,
                    body,
                    thread_id,
                    decompose(post_id).ms,
                )
            return Post(post_id, author, community, title, body, thread_id, 0, 0, 0, 0)
        except asyncpg.UniqueViolationError:
            # Another process made the same id in the same ms for this shard: take others.
            if attempt == _MAX_CREATE_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


async def get(pools: ShardPools, post_id: int, viewer: str) -> Post | None:
    """A live post with the viewer's vote, or None (unknown or deleted)."""
    try:
        physical = _shard(pools, post_id)
    except NotFound:
        return None
    async with pools.connection(physical) as conn:
        row = await conn.fetchrow(
            _SELECT + " WHERE p.id = $1 AND p.deleted_at IS NULL", post_id, viewer
        )
    return None if row is None else _row_to_post(row)


async def get_many(
    pools: ShardPools, post_ids: Iterable[int], viewer: str | None
) -> dict[int, Post]:
    """Live posts by id: one query per physical shard, shards in parallel. With no viewer,
    every my_vote is 0 (see `votes_of` for the votes of many viewers at once)."""
    by_shard: dict[int, list[int]] = defaultdict(list)
    for post_id in post_ids:
        by_shard[pools.for_id(post_id)].append(post_id)
    where = " WHERE p.id = ANY($1::bigint[]) AND p.deleted_at IS NULL"

    async def fetch(physical: int, group: list[int]) -> list[Post]:
        async with pools.connection(physical) as conn:
            if viewer is None:
                rows = await conn.fetch(_SELECT_ANONYMOUS + where, group)
            else:
                rows = await conn.fetch(_SELECT + where, group, viewer)
        return [_row_to_post(r) for r in rows]

    parts = await asyncio.gather(*(fetch(p, g) for p, g in by_shard.items()))
    return {post.id: post for part in parts for post in part}


async def votes_of(
    pools: ShardPools, post_ids: Iterable[int], users: Iterable[str]
) -> dict[tuple[str, int], int]:
    """The non-zero votes of any of `users` on any of `post_ids`, as (user, post) -> value:
    one query per physical shard that holds one of the posts (votes live with their post),
    shards in parallel; the primary key (post_id, user_id) answers it."""
    by_shard: dict[int, list[int]] = defaultdict(list)
    for post_id in post_ids:
        by_shard[pools.for_id(post_id)].append(post_id)
    who = sorted(set(users))
    if not who:
        return {}

    async def fetch(physical: int, group: list[int]) -> list[Any]:
        async with pools.connection(physical) as conn:
            rows: list[Any] = await conn.fetch(
                """SELECT post_id, user_id, value FROM votes
                   WHERE post_id = ANY($1::bigint[]) AND user_id = ANY($2::text[])
                     AND value <> 0""",
                group,
                who,
            )
        return rows

    parts = await asyncio.gather(*(fetch(p, g) for p, g in by_shard.items()))
    return {(r["user_id"], r["post_id"]): r["value"] for part in parts for r in part}


async def delete(pools: ShardPools, post_id: int, user: str) -> Post:
    """Soft-delete `user`'s post; NotFound when unknown or deleted, Forbidden when not theirs.
    Returns the post as it was (the caller removes it from the feeds)."""
    async with pools.transaction(_shard(pools, post_id)) as conn:
        row = await conn.fetchrow(
            _SELECT + " WHERE p.id = $1 AND p.deleted_at IS NULL FOR UPDATE OF p",
            post_id,
            user,
        )
        if row is None:
            raise NotFound("no such post")
        if row["author"] != user:
            raise Forbidden("only the author deletes a post")
        await conn.execute("UPDATE posts SET deleted_at = now() WHERE id = $1", post_id)
        # Its thread closes with it (same shard, same transaction): no more comments.
        await conn.execute(
            "UPDATE conversations SET closed_at = now() WHERE id = $1", row["thread_id"]
        )
    return _row_to_post(row)


# -- votes ------------------------------------------------------------------------------------


async def vote(pools: ShardPools, post_id: int, user: str, value: int) -> VoteResult:
    """Set `user`'s vote on a live post. One row per (post, user); the post row is only read.

    The transaction writes only the voter's row and ends before anything else happens:
    the caller produces a record naming the row after the commit (`VoteResult.pending`),
    and the scores worker counts the row's value, not the record (`count_votes`).
    """
    validate_vote(value)
    async with pools.transaction(_shard(pools, post_id)) as conn:
        post = await conn.fetchrow(
            "SELECT up, down FROM posts WHERE id = $1 AND deleted_at IS NULL", post_id
        )
        if post is None:
            raise NotFound("no such post")
        inserted = await conn.fetchval(
            """INSERT INTO votes (post_id, user_id, value) VALUES ($1, $2, $3)
               ON CONFLICT (post_id, user_id) DO NOTHING RETURNING value""",
            post_id,
            user,
            value,
        )
        if inserted is not None:
            old, counted = 0, 0  # no row was the same as a 0 vote
        else:
            # The row exists (perhaps committed a moment ago by a concurrent vote of the same
            # user): lock it and read its latest value.
            row = await conn.fetchrow(
                """SELECT value, counted FROM votes WHERE post_id = $1 AND user_id = $2
                   FOR UPDATE""",
                post_id,
                user,
            )
            old, counted = row["value"], row["counted"]
            if old != value:
                await conn.execute(
                    """UPDATE votes SET value = $3, updated_at = now()
                       WHERE post_id = $1 AND user_id = $2""",
                    post_id,
                    user,
                    value,
                )
    # The counters hold `counted` for this voter: swap it for the new value. Never below 0
    # (the post was read a moment before the row, so the two can be one batch apart).
    up = max(0, post["up"] + (value == 1) - (counted == 1))
    down = max(0, post["down"] + (value == -1) - (counted == -1))
    return VoteResult(VoteChange(post_id, old, value), up, down, pending=value != counted)


async def recount(pools: ShardPools, post_id: int) -> tuple[int, int]:
    """Repair: set a post's counters from its vote rows (the source of truth), mark every
    row counted, and return the counters. The rows are locked first, in the scores
    worker's order, so this is safe to run while workers run."""
    async with pools.transaction(_shard(pools, post_id)) as conn:
        await conn.execute(
            "SELECT 1 FROM votes WHERE post_id = $1 ORDER BY post_id, user_id FOR UPDATE",
            post_id,
        )
        await conn.execute(
            "UPDATE votes SET counted = value WHERE post_id = $1 AND counted <> value", post_id
        )
        # From `counted`, not `value`: a row inserted since the lock (a new voter) is not
        # counted yet, and the scores worker will count it.
        row = await conn.fetchrow(
            """UPDATE posts SET
                 up = (SELECT count(*) FROM votes WHERE post_id = $1 AND counted = 1),
                 down = (SELECT count(*) FROM votes WHERE post_id = $1 AND counted = -1)
               WHERE id = $1 RETURNING up, down""",
            post_id,
        )
    if row is None:
        raise NotFound("no such post")
    return row["up"], row["down"]


async def pending_votes(conn: Any, older_than_s: float, limit: int) -> list[tuple[int, str]]:
    """(post, user) of the votes on `conn`'s shard not counted yet and last changed more
    than `older_than_s` ago, oldest first: those whose record Kafka lost or never took."""
    rows = await conn.fetch(
        """SELECT post_id, user_id FROM votes
           WHERE counted <> value AND updated_at < now() - make_interval(secs => $1)
           ORDER BY updated_at LIMIT $2""",
        float(older_than_s),
        limit,
    )
    return [(r["post_id"], r["user_id"]) for r in rows]


# -- the scores worker's writes ---------------------------------------------------------------


async def count_votes(conn: Any, voters: Iterable[tuple[int, str]]) -> dict[int, tuple[int, int]]:
    """Count the named (post, user) vote rows on `conn`'s shard that are not counted yet:
    lock them, set `counted` to their value, and return the (up, down) deltas per post that
    the counters need (for `apply_deltas` in the same transaction).

    A row already counted adds nothing, however many records name it: a redelivered batch,
    a record produced twice (a retried vote, the sweep) or a topic whose offsets restarted
    costs nothing. Rows are locked in (post, user) order and before any post row, so
    workers with overlapping batches take turns instead of deadlocking.
    """
    pairs = sorted(set(voters))
    if not pairs:
        return {}
    rows = await conn.fetch(
        """SELECT v.post_id, v.user_id, v.value, v.counted
           FROM votes v
           JOIN unnest($1::bigint[], $2::text[]) AS k(post_id, user_id)
             ON v.post_id = k.post_id AND v.user_id = k.user_id
           WHERE v.counted <> v.value
           ORDER BY v.post_id, v.user_id
           FOR UPDATE OF v""",
        [p for p, _ in pairs],
        [u for _, u in pairs],
    )
    if not rows:
        return {}
    # Locked: the values just read are the ones written back.
    await conn.execute(
        """UPDATE votes v SET counted = v.value
           FROM unnest($1::bigint[], $2::text[]) AS k(post_id, user_id)
           WHERE v.post_id = k.post_id AND v.user_id = k.user_id""",
        [r["post_id"] for r in rows],
        [r["user_id"] for r in rows],
    )
    sums: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for r in rows:
        change = VoteChange(r["post_id"], r["counted"], r["value"])
        acc = sums[r["post_id"]]
        acc[0] += change.up
        acc[1] += change.down
    return {post: (u, d) for post, (u, d) in sums.items() if u or d}


async def apply_deltas(conn: Any, deltas: dict[int, tuple[int, int]]) -> list[Totals]:
    """Add (up, down) deltas to the counters of posts on `conn`'s shard: one UPDATE for
    the whole batch, one row write per post. Unknown posts are skipped."""
    post_ids = sorted(deltas)  # a fixed lock order: overlapping batches cannot deadlock
    if not post_ids:
        return []
    rows = await conn.fetch(
        """UPDATE posts p SET up = p.up + d.up, down = p.down + d.down
           FROM unnest($1::bigint[], $2::integer[], $3::integer[]) AS d(id, up, down)
           WHERE p.id = d.id
           RETURNING p.id, p.thread_id, p.community, p.up, p.down,
                     p.deleted_at IS NOT NULL AS deleted""",
        post_ids,
        [deltas[p][0] for p in post_ids],
        [deltas[p][1] for p in post_ids],
    )
    return [
        Totals(r["id"], r["thread_id"], r["community"], r["up"], r["down"], r["deleted"])
        for r in rows
    ]


async def totals_of(conn: Any, post_ids: Iterable[int]) -> list[Totals]:
    """Current counters of posts on `conn`'s shard (for a batch retried after its deltas
    were already applied: the feeds and subscribers still need the totals)."""
    rows = await conn.fetch(
        """SELECT id, thread_id, community, up, down, deleted_at IS NOT NULL AS deleted
           FROM posts WHERE id = ANY($1::bigint[])""",
        sorted(set(post_ids)),
    )
    return [
        Totals(r["id"], r["thread_id"], r["community"], r["up"], r["down"], r["deleted"])
        for r in rows
    ]


# -- feed rebuilds: scatter-gather over every physical shard ----------------------------------


def min_id_at(ms: int) -> int:
    """The smallest id any post created at or after `ms` can have."""
    return compose(ms, 0, 0)


def _feed_query(feed: Feed, windowed: bool, keyset: bool) -> str:
    """An index-ordered query for one shard (indexes in migrations 0001 and 0002).

    Built per shape rather than with `$n IS NULL OR ...` filters, so that each prepared
    statement has a plan that walks the matching partial index. Parameters in order: the
    limit, the community (community feeds), the smallest id (windows), and the (rank, id)
    to resume strictly after (keyset).
    """
    rank_sql, rank_type = {
        FeedKind.NEW: ("id", "bigint"),
        FeedKind.TOP: ("(up - down)", "integer"),
        FeedKind.TRENDING: ("agora_hot(up, down, id)", "double precision"),
    }[feed.kind]
    where = ["deleted_at IS NULL"]
    n = 1
    if feed.community is not None:
        n += 1
        where.append(f"community = ${n}")
    if windowed:
        n += 1
        where.append(f"id >= ${n}")
    if keyset:
        if feed.kind is FeedKind.NEW:
            n += 1
            where.append(f"id < ${n}")  # the rank is the id's own time: the id decides
        else:
            where.append(f"({rank_sql}, id) < (${n + 1}::{rank_type}, ${n + 2}::bigint)")
    return (
        f"SELECT id, up, down FROM posts WHERE {' AND '.join(where)} "
        f"ORDER BY {rank_sql} DESC, id DESC LIMIT $1"
    )


def _ranked(feed: Feed, rows: list[Any]) -> list[Ranked]:
    """Ranks recomputed in Python (storage.ranking), the same values the scores worker
    writes, so a rebuilt feed and an incrementally kept one are identical."""
    out = [(rank(feed.kind, r["up"], r["down"], decompose(r["id"]).ms), r["id"]) for r in rows]
    out.sort(reverse=True)
    return out


async def feed_candidates(
    pools: ShardPools,
    feed: Feed,
    now_ms: int,
    limit: int,
    after: Ranked | None = None,
) -> list[Ranked]:
    """The top `limit` (rank, id) of `feed` across every physical shard, merged.

    Each shard returns its own top `limit` through an index; the merge of those is the
    global top `limit`. `after`, the (rank, id) of the last entry already read, continues
    from there (keyset): the next `limit` entries strictly below it.
    """
    start = feed.window_start_ms(now_ms)
    sql = _feed_query(feed, start is not None, after is not None)
    args: list[Any] = [limit]
    if feed.community is not None:
        args.append(feed.community)
    if start is not None:
        args.append(min_id_at(start))
    if after is not None:
        if feed.kind is FeedKind.NEW:
            args.append(after[1])
        elif feed.kind is FeedKind.TOP:
            args += [int(after[0]), after[1]]
        else:
            args += [after[0], after[1]]

    async def one(physical: int) -> list[Ranked]:
        async with pools.connection(physical) as conn:
            rows = await conn.fetch(sql, *args)
        return _ranked(feed, rows)

    parts = await asyncio.gather(*(one(p) for p in range(pools.physical_count)))
    return merge_ranked(parts, limit)
