"""`GET /asyncapi.json`: the WebSocket protocol of docs/protocol.md as an AsyncAPI 3.0 document.

Hand-written from the contract like the OpenAPI one (gateway.http.openapi), with every
limit taken from the constants the frame parser enforces (gateway.protocol.frames), so the
two cannot drift on a number. docs/asyncapi.yaml is this document as YAML, written by
scripts/asyncapi_docs.py; tests/unit/test_asyncapi.py
checks that copy, the document's structure, every client frame against the parser (same
types, required and optional fields, limits) and every server frame the gateway builds
against its schema.

The document describes the gateway: `receive` operations are the frames clients send,
`send` operations the frames the gateway pushes. Replies to requests are `reply` objects on
the request's operation. A server frame's schema leaves further properties open: the
protocol adds fields, never repurposes them, and clients ignore what they do not know.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.http.common import JSONResponse
from gateway.http.openapi import ERROR_CODES, ID, MS, USER, conversation_schema
from gateway.protocol.frames import (
    MAX_BODY_CHARS,
    MAX_CID_CHARS,
    MAX_EMOJI_CHARS,
    MAX_RID,
    MAX_SEQ,
    MAX_TOKEN_CHARS,
    MESSAGE_KINDS,
    CloseCode,
)
from storage.events import EVENT_KINDS

Schema = dict[str, Any]

SUBPROTOCOLS = {"chat.v1.json": "application/json", "chat.v1.msgpack": "application/msgpack"}
RID = {
    "type": "integer",
    "minimum": 0,
    "maximum": MAX_RID,
    "description": "Request id chosen by the client; its reply carries the same rid.",
}
SEQ = {"type": "integer", "minimum": 1, "maximum": MAX_SEQ}
EXP_TEXT = (
    "the session token's `exp`, seconds since the Unix epoch (as in JWT): the session is "
    "closed with 4001 at exp + the leeway unless renewed with `auth`"
)
EXP = {"type": "integer", "minimum": 0, "description": EXP_TEXT}
NO_NUL = "^[^\\u0000]*$"
# A message's sender: a user, or a backend service through the publish API.
SENDER = {"type": "string", "pattern": "^([A-Za-z0-9_.:-]{1,64}|service/[a-z0-9_-]{1,32})$"}


def _frame(t: str, props: dict[str, Schema], optional: tuple[str, ...] = ()) -> Schema:
    """A frame's payload: a map whose `t` is `t`; every property but `optional` required."""
    required = ["t", *(name for name in props if name not in optional)]
    return {
        "type": "object",
        "properties": {"t": {"type": "string", "const": t}, **props},
        "required": required,
    }


def client_frames() -> dict[str, Schema]:
    """The requests the gateway parses (gateway.protocol.frames.parse_request), by `t`."""
    conv = {**ID, "description": "the conversation (or a post's thread)"}
    cid = {
        "type": "string",
        "minLength": 1,
        "maxLength": MAX_CID_CHARS,
        "pattern": NO_NUL,
        "description": "client id of this change, unique per user: a repeat answers the "
        "first one's id",
    }
    text = {"type": "string", "minLength": 1, "maxLength": MAX_BODY_CHARS, "pattern": NO_NUL}
    ref = {**ID, "description": "the id of a text or comment of this conversation"}
    return {
        "sub": _frame(
            "sub",
            {
                "rid": RID,
                "conv": conv,
                "since": {
                    "type": "integer",
                    "minimum": 0,
                    "maximum": MAX_SEQ,
                    "description": "the last seq the client has: messages after it are "
                    "replayed before `subbed`",
                },
            },
            optional=("rid", "since"),
        ),
        "unsub": _frame("unsub", {"rid": RID, "conv": conv}, optional=("rid",)),
        "send": _frame(
            "send",
            {
                "rid": RID,
                "conv": conv,
                "cid": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": MAX_CID_CHARS,
                    "pattern": NO_NUL,
                    "description": "client message id, unique per user: a repeated cid "
                    "answers the first message's id, never a second message",
                },
                "body": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": MAX_BODY_CHARS,
                    "pattern": NO_NUL,
                    "description": "Unicode code points; over the limit is `too_large`",
                },
                "kind": {
                    "type": "string",
                    "enum": list(MESSAGE_KINDS),
                    "default": "text",
                    "description": "`comment` only in a post's thread, where every "
                    "message is a comment",
                },
                "reply_to": {**ref, "description": "the message this one answers (added)"},
            },
            optional=("rid", "kind", "reply_to"),
        ),
        "edit": _frame(
            "edit",
            {"rid": RID, "conv": conv, "cid": cid, "ref": ref, "body": text},
            optional=("rid",),
        ),
        "delete": _frame(
            "delete", {"rid": RID, "conv": conv, "cid": cid, "ref": ref}, optional=("rid",)
        ),
        "react": _frame(
            "react",
            {
                "rid": RID,
                "conv": conv,
                "cid": cid,
                "ref": ref,
                "emoji": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": MAX_EMOJI_CHARS,
                    "pattern": NO_NUL,
                    "description": "no whitespace or control characters",
                },
                "remove": {"type": "boolean", "default": False},
            },
            optional=("rid", "remove"),
        ),
        "read": _frame(
            "read",
            {
                "rid": RID,
                "conv": conv,
                "seq": {
                    "type": "integer",
                    "minimum": 0,
                    "maximum": MAX_SEQ,
                    "description": "the last seq read: the pointer only moves forward",
                },
            },
            optional=("rid",),
        ),
        "typing": _frame("typing", {"rid": RID, "conv": conv}, optional=("rid",)),
        "ping": _frame("ping", {"rid": RID}, optional=("rid",)),
        "auth": _frame(
            "auth",
            {
                "rid": RID,
                "token": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": MAX_TOKEN_CHARS,
                    "description": "a newer JWT for the session's own user: the session "
                    "then lives until its `exp` + the leeway",
                },
            },
            optional=("rid",),
        ),
    }


def server_frames() -> dict[str, Schema]:
    """The frames the gateway sends, by `t` (built in gateway.protocol.frames and, for
    `joined`, gateway.http.conversations)."""
    reply_rid = {**RID, "description": "the request's rid, when it had one"}
    return {
        "hello": _frame(
            "hello",
            {
                "user": USER,
                "node": {"type": "string", "description": "the gateway node's id"},
                "hb": {"type": "integer", "minimum": 1, "description": "heartbeat interval, ms"},
                "max_frame": {
                    "type": "integer",
                    "minimum": 1,
                    "description": "largest frame the gateway accepts, bytes",
                },
                "exp": EXP,
            },
        ),
        "msg": _frame(
            "msg",
            {
                "conv": ID,
                "id": ID,
                "seq": SEQ,
                "from": SENDER,
                "body": {"type": "string", "maxLength": MAX_BODY_CHARS},
                "ts": MS,
                "cid": {"type": "string", "maxLength": MAX_CID_CHARS},
                "kind": {
                    "type": "string",
                    "enum": [*MESSAGE_KINDS, *EVENT_KINDS],
                    "description": "a text or comment, or an event changing the one `ref` "
                    "names (added)",
                },
                "ref": {**ID, "description": "an event's target (added)"},
                "reply_to": {**ID, "description": "the message this one answers (added)"},
                "edited": {"type": "boolean", "const": True, "description": "(added)"},
                "deleted": {"type": "boolean", "const": True, "description": "(added)"},
                "service": {
                    "type": "boolean",
                    "const": True,
                    "description": "posted by a backend service (added)",
                },
            },
            optional=("ref", "reply_to", "edited", "deleted", "service"),
        ),
        "read": _frame("read", {"conv": ID, "seq": {"type": "integer", "minimum": 0}}),
        "receipt": _frame(
            "receipt", {"conv": ID, "user": USER, "seq": {"type": "integer", "minimum": 0}}
        ),
        "notify": _frame(
            "notify",
            {
                "n": {
                    "type": "object",
                    "description": "a notification, as GET /v1/notifications lists it",
                    "properties": {
                        "id": ID,
                        "kind": {"type": "string", "enum": ["mention", "reply", "dm"]},
                        "conv": ID,
                        "message": ID,
                        "from": SENDER,
                        "excerpt": {"type": "string"},
                        "ts": MS,
                        "read": {"type": "boolean"},
                    },
                    "required": ["id", "kind", "conv", "message", "from", "excerpt", "ts"],
                }
            },
        ),
        "presence": _frame(
            "presence",
            {
                "user": USER,
                "online": {"type": "boolean"},
                "last_seen": {"type": ["integer", "null"], "description": "ms; null online"},
            },
        ),
        "presence_count": _frame(
            "presence_count", {"conv": ID, "online": {"type": "integer", "minimum": 0}}
        ),
        "score": _frame(
            "score",
            {
                "post": ID,
                "score": {"type": "integer"},
                "up": {"type": "integer", "minimum": 0},
                "down": {"type": "integer", "minimum": 0},
            },
        ),
        "typing": _frame("typing", {"conv": ID, "user": USER}),
        "subbed": _frame(
            "subbed",
            {
                "rid": reply_rid,
                "conv": ID,
                "seq": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "the conversation's latest seq (0: no message yet)",
                },
                "recovered": {
                    "type": "boolean",
                    "description": "every missed message was replayed; false without "
                    "`since`, or when the gap was too large (fetch it over HTTP)",
                },
            },
            optional=("rid",),
        ),
        "ack": _frame(
            "ack",
            {"rid": reply_rid, "cid": {"type": "string"}, "id": ID, "ts": MS},
            optional=("rid",),
        ),
        "ok": _frame(
            "ok",
            {"rid": reply_rid, "exp": {**EXP, "description": "(reply to `auth`) " + EXP_TEXT}},
            optional=("rid", "exp"),
        ),
        "pong": _frame("pong", {"rid": reply_rid}, optional=("rid",)),
        "err": _frame(
            "err",
            {
                "rid": reply_rid,
                "code": {"type": "string", "enum": ERROR_CODES},
                "msg": {"type": "string"},
                "retry_after_ms": {"type": "integer", "minimum": 0},
            },
            optional=("rid", "retry_after_ms"),
        ),
        "reconnect": _frame(
            "reconnect",
            {
                "after_ms": {
                    "type": "integer",
                    "minimum": 0,
                    "description": "move to another node after this delay (already "
                    "jittered by the server)",
                }
            },
        ),
        "joined": _frame(
            "joined",
            {"conv": {**conversation_schema(), "description": "as GET /v1/conversations/{id}"}},
        ),
        "unsubbed": _frame(
            "unsubbed",
            {
                "conv": ID,
                "reason": {
                    "type": "string",
                    "enum": ["removed", "left", "closed"],
                    "description": "removed by another member, left, or the conversation "
                    "closed (a deleted post's thread)",
                },
            },
        ),
    }


_CLIENT_SUMMARY = {
    "sub": "Follow a conversation; missed messages after `since` first, then `subbed`.",
    "unsub": "Stop following a conversation.",
    "send": "Send a message; `ack` once it is durably accepted.",
    "typing": "Tell the conversation the user is typing (ephemeral, no reply).",
    "ping": "Application-level ping (browsers cannot send WebSocket pings).",
    "auth": "A newer token for the same user, before the current one expires.",
    "edit": "Edit one's own message: an `edit` event with its own seq (added).",
    "delete": "Delete one's own message, leaving a tombstone (added).",
    "react": "Add or take back a reaction to a message (added).",
    "read": "Move one's read pointer forward (added).",
}
_SERVER_SUMMARY = {
    "hello": "First frame after a successful connect.",
    "msg": "A message in a subscribed conversation, in seq order per conversation.",
    "score": "A post's vote totals changed (to subscribers of its thread).",
    "typing": "Someone in a subscribed conversation is typing (never stored).",
    "subbed": "Reply to `sub`, after any replayed messages.",
    "ack": "Reply to `send`: durably accepted, will be delivered.",
    "ok": "Reply to a request with nothing to return (`unsub`; `auth`, with `exp`).",
    "pong": "Reply to `ping`.",
    "err": "A request failed; the connection stays open.",
    "reconnect": "The node is draining: reconnect to another node after `after_ms`.",
    "joined": "The user was made a member of a conversation (added frame).",
    "unsubbed": "The server ended a subscription: removed, left, or closed (added frame).",
    "read": "The user's read pointer moved (to each of their connections; added).",
    "receipt": "A member read a small conversation up to a seq (added).",
    "notify": "The user was mentioned or replied to (added).",
    "presence": "A member of a small room came online or went offline (added).",
    "presence_count": "How many connections follow a post's thread (added).",
}
# Which server frames answer which request (besides `err`, which may answer any).
_REPLIES = {
    "sub": ["subbed"],
    "unsub": ["ok"],
    "send": ["ack"],
    "ping": ["pong"],
    "auth": ["ok"],
    "edit": ["ack"],
    "delete": ["ack"],
    "react": ["ack"],
    "read": ["ok"],
}


def client_key(t: str) -> str:
    return f"{t}Request"


def server_key(t: str) -> str:
    return t


def _messages() -> dict[str, Schema]:
    out: dict[str, Schema] = {}
    for t, payload in client_frames().items():
        out[client_key(t)] = {"name": t, "summary": _CLIENT_SUMMARY[t], "payload": payload}
    for t, payload in server_frames().items():
        out[server_key(t)] = {"name": t, "summary": _SERVER_SUMMARY[t], "payload": payload}
    return out


def _ref(*path: str) -> Schema:
    return {"$ref": "#/" + "/".join(path)}


def _operations() -> dict[str, Schema]:
    channel = _ref("channels", "ws")
    ops: dict[str, Schema] = {}
    for t in client_frames():
        op: Schema = {
            "action": "receive",
            "channel": channel,
            "summary": _CLIENT_SUMMARY[t],
            "messages": [_ref("channels", "ws", "messages", client_key(t))],
        }
        if t in _REPLIES:
            op["reply"] = {
                "channel": channel,
                "messages": [
                    _ref("channels", "ws", "messages", server_key(r)) for r in [*_REPLIES[t], "err"]
                ],
            }
        ops[f"receive{t.capitalize()}"] = op
    for t in server_frames():
        ops[f"send{t.capitalize()}"] = {
            "action": "send",
            "channel": channel,
            "summary": _SERVER_SUMMARY[t],
            "messages": [_ref("channels", "ws", "messages", server_key(t))],
        }
    return ops


def _close_codes() -> str:
    lines = [
        f"- {int(c)} {c.name.lower()}{' (reconnect)' if c.reconnect else ''}" for c in CloseCode
    ]
    return "\n".join(lines)


def document() -> Schema:
    messages = _messages()
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Agora WebSocket protocol",
            "version": "1",
            "description": (
                "The WebSocket half of wire protocol v1 (docs/protocol.md; the HTTP half is "
                "GET /openapi.json). Every frame is one map with a string field `t`; ids are "
                "decimal strings. Subprotocol `chat.v1.json` (text frames, JSON) or "
                "`chat.v1.msgpack` (binary frames, MessagePack maps with the same keys); "
                "none offered means JSON. A client may put an integer `rid` on any "
                "request; the reply carries it. An unknown `t`, or a frame that is not a "
                "map, closes the connection with 4002; a known `t` with bad fields is "
                "answered with `err` and the connection stays open.\n\nClose codes:\n"
                + _close_codes()
            ),
            "license": {"name": "MIT"},
        },
        "defaultContentType": "application/json",
        "servers": {
            "gateway": {
                "host": "localhost:8000",
                "protocol": "ws",
                "description": "A gateway node (in production, wss:// behind a load balancer).",
            }
        },
        "channels": {
            "ws": {
                "address": "/v1/ws",
                "title": "The WebSocket",
                "description": (
                    "Authenticated by a JWT: `Authorization: Bearer` on the upgrade, or "
                    "`?token=` for browsers. Before the upgrade the gateway may refuse with "
                    "503 or 429 (`Retry-After`, seconds) or 400."
                ),
                "messages": {key: _ref("components", "messages", key) for key in messages},
                "bindings": {
                    "ws": {
                        "method": "GET",
                        "query": {
                            "type": "object",
                            "properties": {"token": {"type": "string"}},
                        },
                        "headers": {
                            "type": "object",
                            "properties": {
                                "Authorization": {"type": "string"},
                                "Sec-WebSocket-Protocol": {
                                    "type": "string",
                                    "enum": list(SUBPROTOCOLS),
                                },
                            },
                        },
                        "bindingVersion": "0.1.0",
                    }
                },
            }
        },
        "operations": _operations(),
        "components": {"messages": messages},
    }


async def asyncapi_json(request: Request) -> Response:
    doc = getattr(request.app.state, "asyncapi", None)
    if doc is None:
        doc = request.app.state.asyncapi = document()
    return JSONResponse(doc)


routes = [Route("/asyncapi.json", asyncapi_json, methods=["GET"])]
