"""Conversations, members and messages over HTTP."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway import revocation
from gateway.access import NOT_FOUND, Access
from gateway.http.common import (
    JSONResponse,
    decode_int_cursor,
    encode_cursor,
    identity,
    json_body,
    page_limit,
    path_id,
)
from gateway.node import Node
from gateway.protocol.frames import MAX_BODY_CHARS, MAX_CID_CHARS, USER_ID
from gateway.send import SendPath
from storage import conversations, messages
from storage.errors import (
    BadRequest,
    Forbidden,
    NotFound,
    TooLarge,
    Unavailable,
    Unprocessable,
)
from storage.ids import IdGenerator
from storage.models import Conversation, Message
from storage.pools import ShardPools

MAX_MEMBERS = 1000
MAX_TITLE = 200


def conversation_json(c: Conversation) -> dict[str, Any]:
    return {
        "id": str(c.id),
        "kind": c.kind,
        "title": c.title,
        "members": list(c.members),
        "created_at": c.created_at_ms,
        "last_seq": c.last_seq,
        "last_activity": c.last_activity_ms,
    }


def message_json(m: Message) -> dict[str, Any]:
    return {
        "conv": str(m.conv),
        "id": str(m.id),
        "seq": m.seq,
        "from": m.sender,
        "body": m.body,
        "ts": m.ts,
        "cid": m.cid,
        "kind": m.kind,
    }


def _user_id(value: Any, what: str) -> str:
    if not isinstance(value, str) or not USER_ID.match(value):
        raise Unprocessable(f"{what} must be a user id (1-64 chars of [A-Za-z0-9_.:-])")
    return value


async def create(request: Request) -> Response:
    me = identity(request)
    body = await json_body(request)
    pools: ShardPools = request.app.state.pools
    ids: IdGenerator = request.app.state.ids
    kind = body.get("kind")
    raw_members = body.get("members")
    if kind not in ("direct", "group"):
        raise Unprocessable('kind must be "direct" or "group"')
    if not isinstance(raw_members, list) or len(raw_members) > MAX_MEMBERS:
        raise Unprocessable(f"members must be a list of at most {MAX_MEMBERS} user ids")
    members = {_user_id(m, "members[]") for m in raw_members}
    title = body.get("title", "")
    if title is None:
        title = ""
    if not isinstance(title, str) or len(title) > MAX_TITLE or "\x00" in title:
        raise Unprocessable(f"title must be a string of at most {MAX_TITLE} chars, no NUL")
    node: Node = request.app.state.node
    if kind == "direct":
        others = members - {me.user}
        if len(others) != 1:
            raise Unprocessable("a direct conversation has exactly one other member")
        conv, created = await conversations.create_direct(pools, ids, me.user, others.pop())
        if created:
            await _announce(node, conv, conv.members)
        return JSONResponse(conversation_json(conv), status_code=201 if created else 200)
    conv = await conversations.create_group(pools, ids, me.user, members, title)
    await _announce(node, conv, conv.members)
    return JSONResponse(conversation_json(conv), status_code=201)


async def _announce(node: Node, conv: Conversation, users: tuple[str, ...] | list[str]) -> None:
    """Tell the members' live connections (a `joined` frame, an addition to PROTOCOL v1)."""
    frame = {"t": "joined", "conv": conversation_json(conv)}
    try:
        await node.publish_to_users({u: frame for u in users})
    except Exception:  # best effort: the conversation list over HTTP is the truth
        pass


async def list_mine(request: Request) -> Response:
    me = identity(request)
    limit = page_limit(request)
    cursor = decode_int_cursor(request.query_params.get("cursor"), 2)
    after = (cursor[0], cursor[1]) if cursor is not None else None
    convs = await conversations.list_for_user(request.app.state.pools, me.user, limit + 1, after)
    page = convs[:limit]
    nxt = None
    if len(convs) > limit:
        last = page[-1]
        nxt = encode_cursor(last.last_activity_ms, last.id)
    return JSONResponse({"items": [conversation_json(c) for c in page], "next": nxt})


async def _member_conversation(request: Request) -> tuple[str, Conversation]:
    me = identity(request)
    conv_id = path_id(request)
    conv = await conversations.get_conversation(request.app.state.pools, conv_id, open_only=True)
    # One answer for "none", "closed" and "not yours": ids of others' conversations and
    # whether they exist stay unknown to a non-member.
    if conv is None or (conv.kind != "thread" and me.user not in conv.members):
        raise NotFound(NOT_FOUND)
    return me.user, conv


async def get_one(request: Request) -> Response:
    _, conv = await _member_conversation(request)
    return JSONResponse(conversation_json(conv))


async def add_member(request: Request) -> Response:
    _, conv = await _member_conversation(request)
    body = await json_body(request)
    new = _user_id(body.get("user"), "user")
    if conv.kind != "group":
        raise Forbidden("members can only be added to a group")
    if len(conv.members) >= MAX_MEMBERS:
        raise Forbidden(f"a group has at most {MAX_MEMBERS} members")
    pools: ShardPools = request.app.state.pools
    await conversations.add_member(pools, conv.id, new)
    access: Access = request.app.state.access
    access.forget(new, conv.id)
    node: Node = request.app.state.node
    # Other nodes may have cached a refusal (1 s): best effort, the refusal expires.
    await revocation.announce_quietly(node.redis, node.keys, conv.id, new, revocation.ADDED)
    updated = await conversations.get_conversation(pools, conv.id)
    if updated is not None:
        await _announce(request.app.state.node, updated, [new])
    return Response(status_code=204)


async def remove_member(request: Request) -> Response:
    user, conv = await _member_conversation(request)
    target = _user_id(request.path_params["user"], "user")
    if conv.kind != "group":
        raise Forbidden("members can only be removed from a group")
    if target != user and user != conv.created_by:
        raise Forbidden("only the group's creator removes other members")
    removed = target in conv.members and await conversations.remove_member(
        request.app.state.pools, conv.id, target
    )
    # Announced also when there was nothing to remove: a retry after a failed
    # announcement (503 below) still reaches every node.
    node: Node = request.app.state.node
    reason = revocation.LEFT if target == user else revocation.REMOVED
    try:
        await revocation.announce(node.redis, node.keys, conv.id, target, reason)
    except Exception as exc:
        raise Unavailable(
            f"removed, but not yet announced to every node ({type(exc).__name__}); retry"
        ) from None
    if not removed:
        raise NotFound("not a member")
    return Response(status_code=204)


async def history(request: Request) -> Response:
    _, conv = await _member_conversation(request)
    limit = page_limit(request)
    before: int | None = None
    raw_before = request.query_params.get("before")
    cursor = decode_int_cursor(request.query_params.get("cursor"), 1)
    if raw_before is not None:
        if not raw_before.isdigit() or len(raw_before) > 18:
            raise BadRequest("before must be a seq (a non-negative integer)")
        before = int(raw_before)
    elif cursor is not None:
        before = cursor[0]
    items = await messages.before(request.app.state.pools, conv.id, before, limit + 1)
    page = items[:limit]
    nxt = encode_cursor(page[-1].seq) if len(items) > limit else None
    return JSONResponse({"items": [message_json(m) for m in page], "next": nxt})


async def post_message(request: Request) -> Response:
    me = identity(request)
    conv_id = path_id(request)
    body = await json_body(request)
    cid = body.get("cid")
    text = body.get("body")
    kind = body.get("kind", "text")
    if not isinstance(cid, str) or not 1 <= len(cid) <= MAX_CID_CHARS or "\x00" in cid:
        raise Unprocessable(f"cid must be a string of 1-{MAX_CID_CHARS} chars")
    if not isinstance(text, str) or not text or "\x00" in text:
        raise Unprocessable("body must be a non-empty string without NUL characters")
    if len(text) > MAX_BODY_CHARS:
        raise TooLarge(f"body is over {MAX_BODY_CHARS} chars")
    if kind not in ("text", "comment"):
        raise Unprocessable('kind must be "text" or "comment"')
    send_path: SendPath = request.app.state.send_path
    accepted = await send_path.send(me.user, conv_id, cid, text, kind)
    return JSONResponse({"id": str(accepted.id), "ts": accepted.ts}, status_code=202)


routes = [
    Route("/v1/conversations", create, methods=["POST"]),
    Route("/v1/conversations", list_mine, methods=["GET"]),
    Route("/v1/conversations/{id}", get_one, methods=["GET"]),
    Route("/v1/conversations/{id}/members", add_member, methods=["POST"]),
    Route("/v1/conversations/{id}/members/{user}", remove_member, methods=["DELETE"]),
    Route("/v1/conversations/{id}/messages", history, methods=["GET"]),
    Route("/v1/conversations/{id}/messages", post_message, methods=["POST"]),
]
