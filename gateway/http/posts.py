"""Posts and votes over HTTP: create, read, delete, vote."""

from __future__ import annotations

import logging
from typing import Any

import redis.asyncio as aioredis
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core.errors import NotFound
from fanout.feeds import FeedCache
from gateway import revocation
from gateway.http.common import JSONResponse, identity, json_body, path_id
from gateway.votes import VotePath
from storage import posts
from storage.ids import IdGenerator
from storage.pools import ShardPools
from storage.posts import Post

log = logging.getLogger("agora.gateway")

# A post body may be 40,000 characters; escaped as JSON (`\ud83d\ude00` is 12 bytes for one
# character) that can exceed the 64 KiB every other request gets.
MAX_POST_BYTES = 512 * 1024


def post_json(p: Post) -> dict[str, Any]:
    return {
        "id": str(p.id),
        "author": p.author,
        "community": p.community,
        "title": p.title,
        "body": p.body,
        "created_at": p.created_ms,
        "score": p.score,
        "up": p.up,
        "down": p.down,
        "comments": p.comments,
        "thread": str(p.thread),
        "my_vote": p.my_vote,
    }


async def create(request: Request) -> Response:
    me = identity(request)
    body = await json_body(request, MAX_POST_BYTES)
    title = posts.validate_title(body.get("title"))
    text = posts.validate_body(body.get("body", ""))
    community = posts.validate_community(body.get("community"))
    pools: ShardPools = request.app.state.pools
    ids: IdGenerator = request.app.state.ids
    post = await posts.create(pools, ids, me.user, community, title, text)
    feeds: FeedCache = request.app.state.feeds
    try:
        await feeds.on_created(post)
    except (aioredis.RedisError, OSError) as exc:
        # The post is stored; feeds that miss it pick it up at their next rebuild.
        log.warning("post %d: feed update failed: %s", post.id, exc)
    return JSONResponse(post_json(post), status_code=201)


async def get_one(request: Request) -> Response:
    me = identity(request)
    post = await posts.get(request.app.state.pools, path_id(request), me.user)
    if post is None:
        raise NotFound("no such post")
    return JSONResponse(post_json(post))


async def delete(request: Request) -> Response:
    me = identity(request)
    post = await posts.delete(request.app.state.pools, path_id(request), me.user)
    node = request.app.state.node
    if not await revocation.announce_quietly(
        node.redis, node.keys, post.thread, None, revocation.CLOSED
    ):
        # Closed in the shard: no node lets anyone in anew; only the subscriptions open
        # now stay until their node re-checks (its cache entries expire, a restart).
        log.warning("post %d: thread closure not announced", post.id)
    # This node's cached first pages drop it now, whatever becomes of the feed update.
    request.app.state.feed_pages.forget_post(post.id)
    feeds: FeedCache = request.app.state.feeds
    try:
        await feeds.on_deleted(post.id, post.community)
    except (aioredis.RedisError, OSError) as exc:
        # Still gone from every feed: feed pages read posts from the shards, which skip it.
        log.warning("post %d: feed removal failed: %s", post.id, exc)
    return Response(status_code=204)


async def vote(request: Request) -> Response:
    me = identity(request)
    post_id = path_id(request)
    body = await json_body(request)
    value = posts.validate_vote(body.get("value"))
    votes: VotePath = request.app.state.votes
    result = await votes.vote(me.user, post_id, value)
    return JSONResponse(
        {
            "post": str(post_id),
            "score": result.up - result.down,
            "up": result.up,
            "down": result.down,
            "my_vote": result.change.new,
        }
    )


routes = [
    Route("/v1/posts", create, methods=["POST"]),
    Route("/v1/posts/{id}", get_one, methods=["GET"]),
    Route("/v1/posts/{id}", delete, methods=["DELETE"]),
    Route("/v1/posts/{id}/vote", vote, methods=["PUT"]),
]
