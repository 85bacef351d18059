"""`GET /v1/feeds/{trending|new|top}`: ranked posts, globally or in one community.

First pages come from the gateway's page cache (gateway/feedpages.py) unless it is off
(AGORA_FEED_PAGE_CACHE_MS=0); pages after the first are read from their snapshot."""

from __future__ import annotations

import math
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core.errors import BadRequest
from fanout.feeds import FeedCache, FeedCursor
from gateway.feedpages import FeedPages, cursor_text
from gateway.http.common import JSONResponse, decode_cursor, identity, page_limit
from gateway.http.posts import post_json
from storage.ids import parse_id
from storage.posts import is_community
from storage.ranking import DEFAULT_WINDOW, Feed, FeedKind, Window


def parse_feed(kind: str, community: str | None, window: str | None) -> Feed:
    """The feed a request names. Empty parameters count as absent (`?community=` is the
    global feed), since docs/protocol.md spells the query with empty placeholders."""
    try:
        feed_kind = FeedKind(kind)
    except ValueError:
        raise BadRequest("feed must be trending, new or top") from None
    if community is not None and not is_community(community):
        raise BadRequest("community must be 1-64 characters of [a-z0-9_]")
    if feed_kind is not FeedKind.TOP:
        if window is not None:
            raise BadRequest("window applies to the top feed only")
        return Feed(feed_kind, community)
    try:
        top_window = Window(window) if window is not None else DEFAULT_WINDOW
    except ValueError:
        raise BadRequest("window must be day, week or all") from None
    return Feed(feed_kind, community, top_window)


def parse_cursor(raw: str | None) -> FeedCursor | None:
    parts = decode_cursor(raw, 4)
    if parts is None:
        return None
    snapshot, offset, rank, post = parts
    try:
        if not isinstance(snapshot, str) or type(offset) is not int or not isinstance(rank, str):
            raise ValueError
        value = float(rank)
        post_id = parse_id(post) if isinstance(post, str) else None
        if post_id is None or not math.isfinite(value):
            raise ValueError
        return FeedCursor(snapshot, offset, value, post_id)
    except ValueError:
        raise BadRequest("cursor is not valid") from None


async def feed(request: Request) -> Response:
    me = identity(request)
    params = request.query_params
    chosen = parse_feed(
        request.path_params["kind"], params.get("community") or None, params.get("window") or None
    )
    limit = page_limit(request)
    cursor = parse_cursor(params.get("cursor"))
    pages: FeedPages = request.app.state.feed_pages
    if cursor is None and pages.enabled:
        encoded = await pages.first_page(chosen, limit, me.user)
        return Response(encoded, media_type="application/json")
    feeds: FeedCache = request.app.state.feeds
    page = await feeds.page(chosen, cursor, limit, me.user)
    body: dict[str, Any] = {
        "items": [post_json(p) for p in page.items],
        "next": cursor_text(page.next),
    }
    return JSONResponse(body)


routes = [Route("/v1/feeds/{kind}", feed, methods=["GET"])]
