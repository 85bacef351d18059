"""The notification inbox over HTTP: mentions, replies, direct messages kept while the
user was offline (storage/notifications.py)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core.errors import BadRequest, Unprocessable
from fanout.notify import notification_json
from gateway.http.common import (
    JSONResponse,
    decode_cursor,
    encode_cursor,
    identity,
    json_body,
    page_limit,
)
from storage import notifications
from storage.ids import now_ms, parse_id

MAX_MARK = 1000


async def inbox(request: Request) -> Response:
    me = identity(request)
    limit = page_limit(request)
    cursor = decode_cursor(request.query_params.get("cursor"), 1)
    before = None
    if cursor is not None:
        if type(cursor[0]) is not int:
            raise BadRequest("cursor is not valid")
        before = cursor[0]
    flag = request.query_params.get("unread", "false")
    if flag not in ("true", "false"):
        raise BadRequest("unread must be true or false")
    pools = request.app.state.pools
    items = await notifications.page(pools, me.user, before, limit + 1, flag == "true")
    page = items[:limit]
    nxt = encode_cursor(page[-1].message) if len(items) > limit else None
    unread = await notifications.unread_count(pools, me.user)
    return JSONResponse(
        {"items": [notification_json(n) for n in page], "next": nxt, "unread": unread}
    )


async def mark_read(request: Request) -> Response:
    """`{ids: [...]}` marks those read; `{}` marks every one."""
    me = identity(request)
    body = await json_body(request)
    ids: list[int] | None = None
    if "ids" in body:  # absent: all of them; present, it must be a list
        raw = body["ids"]
        if not isinstance(raw, list) or len(raw) > MAX_MARK:
            raise Unprocessable(f"ids must be a list of at most {MAX_MARK} notification ids")
        ids = []
        for item in raw:
            parsed = parse_id(item) if isinstance(item, str) else None
            if parsed is None:
                raise Unprocessable("ids must hold notification ids (decimal strings)")
            ids.append(parsed)
    marked = await notifications.mark_read(request.app.state.pools, me.user, ids, now_ms())
    return JSONResponse({"marked": marked})


routes = [
    Route("/v1/notifications", inbox, methods=["GET"]),
    Route("/v1/notifications/read", mark_read, methods=["POST"]),
]
