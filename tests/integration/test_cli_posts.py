"""`agora posts recount`: counters repaired from the vote rows, on the real shards."""

from __future__ import annotations

from core.settings import Settings
from storage import posts
from storage.ids import IdGenerator
from storage.pools import ShardPools
from tests.integration.helpers import agora, uid


async def test_recount_sets_counters_from_the_vote_rows(
    settings: Settings, pools: ShardPools
) -> None:
    post = await posts.create(pools, IdGenerator(), uid("author"), "cli", "recount me", "")
    for i, value in enumerate((1, 1, 1, -1)):
        await posts.vote(pools, post.id, uid(f"v{i}"), value)
    # Counters gone wrong (an operator's mistake, a restore of one table).
    shard = pools.for_id(post.id)
    async with pools.transaction(shard) as conn:
        await conn.execute("UPDATE posts SET up = 40, down = 7 WHERE id = $1", post.id)

    done = agora(settings, "posts", "recount", str(post.id))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"post {post.id}: up 3 down 1 score 2"
    async with pools.transaction(shard) as conn:
        row = await conn.fetchrow("SELECT up, down FROM posts WHERE id = $1", post.id)
    assert (row["up"], row["down"]) == (3, 1)

    unknown = agora(settings, "posts", "recount", str(post.id + 1))
    assert unknown.returncode == 1 and "not found" in unknown.stderr
    bad = agora(settings, "posts", "recount", "12ab")
    assert bad.returncode == 2 and "not a post id" in bad.stderr
