"""Conversations, members and messages over HTTP."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core.errors import (
    BadRequest,
    Forbidden,
    NotFound,
    TooLarge,
    Unavailable,
    Unprocessable,
)
from gateway import revocation
from gateway.access import NOT_FOUND, Access
from gateway.events import EventPath
from gateway.http.common import (
    JSONResponse,
    decode_cursor,
    decode_int_cursor,
    encode_cursor,
    identity,
    json_body,
    page_limit,
    path_id,
)
from gateway.node import Node
from gateway.protocol import fields
from gateway.protocol.frames import MAX_BODY_CHARS, MAX_CID_CHARS, MAX_SEQ, USER_ID
from gateway.protocol.messages import message_frame
from gateway.readstate import ReadPath
from gateway.send import SendPath
from storage import conversations, events, presence, readstate
from storage.ids import IdGenerator, parse_id
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
    out = message_frame(m)
    del out["t"]
    return out


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
    state = await readstate.unread(request.app.state.pools, me.user, [c.id for c in page])
    return JSONResponse({"items": [_with_read(c, state) for c in page], "next": nxt})


def _with_read(c: Conversation, state: dict[int, tuple[int, int]]) -> dict[str, Any]:
    out = conversation_json(c)
    out["read_seq"], out["unread"] = state.get(c.id, (0, 0))
    return out


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
    me, conv = await _member_conversation(request)
    state = await readstate.unread(request.app.state.pools, me, [conv.id])
    return JSONResponse(_with_read(conv, state))


async def mark_read(request: Request) -> Response:
    """PUT `{seq}`: the caller has read up to `seq` (the pointer only moves forward)."""
    me = identity(request)
    conv_id = path_id(request)
    body = await json_body(request)
    seq = body.get("seq")
    if type(seq) is not int or not 0 <= seq <= MAX_SEQ:
        raise Unprocessable("seq must be a non-negative integer")
    now = await ReadPath(request.app.state.node, request.app.state.access).read(
        me.user, conv_id, seq
    )
    return JSONResponse({"conv": str(conv_id), "seq": now})


async def presence_list(request: Request) -> Response:
    """Members with their presence, by user id (keyset), `?online=true` for online only."""
    _, conv = await _member_conversation(request)
    if conv.kind == "thread":
        raise Forbidden("presence is listed for direct conversations and groups")
    limit = page_limit(request)
    cursor = decode_cursor(request.query_params.get("cursor"), 1)
    only = request.query_params.get("online", "false")
    if only not in ("true", "false"):
        raise BadRequest("online must be true or false")
    if cursor is not None and not isinstance(cursor[0], str):
        raise BadRequest("cursor is not valid")
    after = cursor[0] if cursor is not None else None
    pools: ShardPools = request.app.state.pools
    users = await presence.members_page(pools, conv.id, after, limit + 1)
    page = users[:limit]
    nxt = encode_cursor(page[-1]) if len(users) > limit else None
    node: Node = request.app.state.node
    states = await node.presence.states(page)
    items = [
        {"user": u, "online": states[u][0], "last_seen": states[u][1]}
        for u in page
        if only != "true" or states[u][0]
    ]
    return JSONResponse({"items": items, "next": nxt})


async def receipts(request: Request) -> Response:
    me = identity(request)
    conv_id = path_id(request)
    found = await ReadPath(request.app.state.node, request.app.state.access).receipts(
        me.user, conv_id
    )
    return JSONResponse({"items": [{"user": u, "seq": s} for u, s in found]})


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
    me, conv = await _member_conversation(request)
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
    got = await events.current_page(request.app.state.pools, conv.id, before, limit + 1, me)
    page = got.messages[:limit]
    nxt = encode_cursor(page[-1].seq) if len(got.messages) > limit else None
    items = []
    for m in page:
        item = message_json(m)
        counts, mine = got.reactions.get(m.id, ({}, []))
        item["reactions"] = counts
        item["my_reactions"] = mine
        items.append(item)
    return JSONResponse({"items": items, "next": nxt, "last_seq": got.last_seq})


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
    raw_reply = body.get("reply_to")
    if raw_reply is not None:
        reply_to = _message_id(raw_reply, "reply_to")
        accepted = await _events(request).send(me.user, conv_id, cid, text, kind, reply_to)
        return JSONResponse({"id": str(accepted.id), "ts": accepted.ts}, status_code=202)
    send_path: SendPath = request.app.state.send_path
    accepted = await send_path.send(me.user, conv_id, cid, text, kind)
    return JSONResponse({"id": str(accepted.id), "ts": accepted.ts}, status_code=202)


def _events(request: Request) -> EventPath:
    return EventPath(request.app.state.pools, request.app.state.access, request.app.state.send_path)


def _message_id(raw: Any, what: str) -> int:
    parsed = parse_id(raw) if isinstance(raw, str) else None
    if parsed is None:
        raise Unprocessable(f"{what} must be a message id (a decimal string)")
    return parsed


def _cid_of(body: dict[str, Any]) -> str:
    cid = body.get("cid")
    problem = fields.check_cid(cid)
    if problem is not None:
        raise Unprocessable(problem)
    assert isinstance(cid, str)
    return cid


async def edit_message(request: Request) -> Response:
    """PATCH: a new text for the caller's own message (an `edit` event)."""
    me = identity(request)
    conv_id, ref = path_id(request), path_id(request, "mid")
    body = await json_body(request)
    cid = _cid_of(body)
    text = body.get("body")
    problem = fields.check_body(text)
    if problem is not None:
        raise problem if isinstance(problem, TooLarge) else Unprocessable(problem.message)
    assert isinstance(text, str)
    accepted = await _events(request).edit(me.user, conv_id, cid, ref, text)
    return JSONResponse({"id": str(accepted.id), "ts": accepted.ts}, status_code=202)


async def delete_message(request: Request) -> Response:
    """DELETE: the caller's own message becomes a tombstone (a `delete` event). Without a
    body the cid is derived from the message, so repeating the call is one delete."""
    me = identity(request)
    conv_id, ref = path_id(request), path_id(request, "mid")
    raw = await request.body()
    body = await json_body(request) if raw.strip() else {}
    cid = _cid_of(body) if "cid" in body else f"delete:{ref}"
    accepted = await _events(request).delete(me.user, conv_id, cid, ref)
    return JSONResponse({"id": str(accepted.id), "ts": accepted.ts}, status_code=202)


async def react(request: Request) -> Response:
    """POST `{cid, emoji, remove?}`: add (or remove) the caller's reaction."""
    me = identity(request)
    conv_id, ref = path_id(request), path_id(request, "mid")
    body = await json_body(request)
    cid = _cid_of(body)
    emoji = body.get("emoji")
    problem = fields.check_emoji(emoji)
    if problem is not None:
        raise Unprocessable(problem)
    assert isinstance(emoji, str)
    remove = body.get("remove", False)
    if not isinstance(remove, bool):
        raise Unprocessable("remove must be a boolean")
    accepted = await _events(request).react(me.user, conv_id, cid, ref, emoji, remove)
    return JSONResponse({"id": str(accepted.id), "ts": accepted.ts}, status_code=202)


routes = [
    Route("/v1/conversations", create, methods=["POST"]),
    Route("/v1/conversations", list_mine, methods=["GET"]),
    Route("/v1/conversations/{id}", get_one, methods=["GET"]),
    Route("/v1/conversations/{id}/read", mark_read, methods=["PUT"]),
    Route("/v1/conversations/{id}/receipts", receipts, methods=["GET"]),
    Route("/v1/conversations/{id}/presence", presence_list, methods=["GET"]),
    Route("/v1/conversations/{id}/members", add_member, methods=["POST"]),
    Route("/v1/conversations/{id}/members/{user}", remove_member, methods=["DELETE"]),
    Route("/v1/conversations/{id}/messages", history, methods=["GET"]),
    Route("/v1/conversations/{id}/messages", post_message, methods=["POST"]),
    Route("/v1/conversations/{id}/messages/{mid}", edit_message, methods=["PATCH"]),
    Route("/v1/conversations/{id}/messages/{mid}", delete_message, methods=["DELETE"]),
    Route("/v1/conversations/{id}/messages/{mid}/reactions", react, methods=["POST"]),
]
