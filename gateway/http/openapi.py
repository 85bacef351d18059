"""`GET /openapi.json`: the HTTP API of docs/protocol.md as an OpenAPI 3.1 document.

Hand-written from the contract (not generated from the handlers), with limits taken from
the same constants the handlers enforce, so the two cannot drift on a number. The test
suite fuzzes the running service against this document with schemathesis: every answer
must be one of the statuses listed here, in the shape listed here.
The WebSocket (`GET /v1/ws`) is not an HTTP operation; its frames are in docs/protocol.md.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from core.settings import Settings
from gateway.http.common import MAX_LIMIT, JSONResponse
from gateway.protocol.frames import MAX_BODY_CHARS, MAX_CID_CHARS, MAX_EMOJI_CHARS

Schema = dict[str, Any]

ID = {"type": "string", "pattern": "^[0-9]{1,19}$", "description": "64-bit id, decimal"}
USER = {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,64}$"}
# A member: a user, or (in its direct conversations with users) a publishing service.
MEMBER = {"type": "string", "pattern": "^([A-Za-z0-9_.:-]{1,64}|service/[a-z0-9_-]{1,32})$"}
COMMUNITY = {"type": "string", "pattern": "^[a-z0-9_]{1,64}$"}
MS = {"type": "integer", "description": "milliseconds since the Unix epoch (UTC)"}
ERROR_CODES = [
    "bad_request",
    "unauthorized",
    "forbidden",
    "not_found",
    "conflict",
    "too_large",
    "rate_limited",
    "unavailable",
    "internal",
]
_REASONS = {
    400: "Malformed request (bad JSON, parameter or cursor)",
    401: "Token missing, invalid or expired",
    403: "Not allowed for this user",
    404: "No such resource",
    405: "Method not allowed on this path",
    409: "Conflicts with an earlier request",
    413: "Body or field too large",
    422: "Well-formed JSON with invalid fields",
    429: "Rate limited; retry after Retry-After seconds",
    503: "A dependency is down; nothing was accepted, retry after Retry-After seconds",
}


_READY: dict[str, Schema] = {
    "status": {"type": "string"},
    "down": {"type": "object"},
    "shard_map": {"type": "string", "description": "version of the shard map in force"},
}


def _obj(props: dict[str, Schema], required: list[str] | None = None) -> Schema:
    out: Schema = {"type": "object", "properties": props}
    out["required"] = list(props) if required is None else required
    return out


def _json(schema: Schema) -> Schema:
    return {"application/json": {"schema": schema}}


def _ok(status: int, desc: str, schema: Schema | None = None) -> dict[str, Schema]:
    out: Schema = {"description": desc}
    if schema is not None:
        out["content"] = _json(schema)
    return {str(status): out}


def _errors(*statuses: int) -> dict[str, Schema]:
    out: dict[str, Schema] = {}
    for status in statuses:
        resp: Schema = {
            "description": _REASONS[status],
            "content": _json({"$ref": "#/components/schemas/Error"}),
        }
        if status in (429, 503):
            resp["headers"] = {"Retry-After": {"schema": {"type": "string"}, "required": True}}
        out[str(status)] = resp
    return out


# What every authenticated call may answer besides its own statuses: a bad token, the
# per-user rate limit, a shard or Redis that is down.
_AUTHED = (401, 429, 503)
_WITH_BODY = (400, 413, 422)


def _op(
    op_id: str,
    summary: str,
    responses: dict[str, Schema],
    *,
    errors: tuple[int, ...] = (),
    params: list[Schema] | None = None,
    body: Schema | None = None,
    public: bool = False,
) -> Schema:
    statuses = tuple(sorted(set(errors) | (set() if public else set(_AUTHED))))
    op: Schema = {
        "operationId": op_id,
        "summary": summary,
        "responses": {**responses, **_errors(*statuses)},
    }
    if params:
        op["parameters"] = params
    if body is not None:
        op["requestBody"] = {"required": True, "content": _json(body)}
    if public:
        op["security"] = []
    return op


def _path(name: str, schema: Schema) -> Schema:
    return {"name": name, "in": "path", "required": True, "schema": schema}


def _query(name: str, schema: Schema, desc: str = "") -> Schema:
    q: Schema = {"name": name, "in": "query", "required": False, "schema": schema}
    if desc:
        q["description"] = desc
    return q


_PAGE = [
    _query("cursor", {"type": "string"}, "opaque cursor from a previous page's `next`"),
    _query("limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": 25}),
]


def _list_of(ref: str) -> Schema:
    return _obj(
        {
            "items": {"type": "array", "items": {"$ref": f"#/components/schemas/{ref}"}},
            "next": {"type": ["string", "null"]},
        }
    )


def conversation_schema() -> Schema:
    """A conversation as the HTTP API answers it (also the `joined` frame's `conv`)."""
    return _obj(
        {
            "id": ID,
            "kind": {"type": "string", "enum": ["direct", "group", "thread"]},
            "title": {"type": "string"},
            "members": {"type": "array", "items": MEMBER},
            "created_at": MS,
            "last_seq": {"type": "integer", "minimum": 0},
            "last_activity": MS,
            "read_seq": {"type": "integer", "minimum": 0},
            "unread": {"type": "integer", "minimum": 0},
        },
        ["id", "kind", "title", "members", "created_at"],
    )


def _components() -> Schema:
    conversation = conversation_schema()
    message = _obj(
        {
            "conv": ID,
            "id": ID,
            "seq": {"type": "integer", "minimum": 1},
            "from": USER,
            "body": {"type": "string"},
            "ts": MS,
            "cid": {"type": "string"},
            "kind": {"type": "string", "enum": ["text", "comment"]},
            "reply_to": ID,
            "edited": {"type": "boolean"},
            "deleted": {"type": "boolean"},
            "reactions": {"type": "object", "additionalProperties": {"type": "integer"}},
            "my_reactions": {"type": "array", "items": {"type": "string"}},
        },
        ["conv", "id", "seq", "from", "body", "ts", "cid", "kind", "reactions", "my_reactions"],
    )
    post = _obj(
        {
            "id": ID,
            "author": USER,
            "community": COMMUNITY,
            "title": {"type": "string"},
            "body": {"type": "string"},
            "created_at": MS,
            "score": {"type": "integer"},
            "up": {"type": "integer", "minimum": 0},
            "down": {"type": "integer", "minimum": 0},
            "comments": {"type": "integer", "minimum": 0},
            "thread": ID,
            "my_vote": {"type": "integer", "enum": [-1, 0, 1]},
        }
    )
    error = _obj(
        {
            "error": _obj(
                {"code": {"type": "string", "enum": ERROR_CODES}, "message": {"type": "string"}}
            )
        }
    )
    return {
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
            "apikey": {
                "type": "apiKey",
                "in": "header",
                "name": "Authorization",
                "description": "A service key: `Authorization: ApiKey <key>`",
            },
        },
        "schemas": {
            "Conversation": conversation,
            "Message": message,
            "Post": post,
            "Error": error,
        },
    }


def _conversation_paths() -> dict[str, Schema]:
    conv = {"$ref": "#/components/schemas/Conversation"}
    cid = _path("id", ID)
    create_body = _obj(
        {
            "kind": {"type": "string", "enum": ["direct", "group"]},
            "members": {"type": "array", "items": USER, "maxItems": 1000},
            "title": {"type": ["string", "null"], "maxLength": 200},
        },
        ["kind", "members"],
    )
    send_body = _obj(
        {
            "cid": {"type": "string", "minLength": 1, "maxLength": MAX_CID_CHARS},
            "body": {"type": "string", "minLength": 1, "maxLength": MAX_BODY_CHARS},
            "kind": {"type": "string", "enum": ["text", "comment"], "default": "text"},
            "reply_to": ID,
        },
        ["cid", "body"],
    )
    mid = _path("mid", ID)
    accepted = _ok(202, "Accepted", _obj({"id": ID, "ts": MS}))
    cid_schema = {"type": "string", "minLength": 1, "maxLength": MAX_CID_CHARS}
    emoji = {"type": "string", "minLength": 1, "maxLength": MAX_EMOJI_CHARS}
    return {
        "/v1/conversations": {
            "post": _op(
                "createConversation",
                "Create a group, or find-or-create a direct conversation",
                {
                    **_ok(201, "Created", conv),
                    **_ok(200, "The existing direct conversation of these two users", conv),
                },
                errors=_WITH_BODY,
                body=create_body,
            ),
            "get": _op(
                "listConversations",
                "The caller's conversations, most recently active first",
                _ok(200, "A page", _list_of("Conversation")),
                errors=(400,),
                params=_PAGE,
            ),
        },
        "/v1/conversations/{id}": {
            "get": _op(
                "getConversation",
                "One conversation, to its members (a post's thread to anyone)",
                _ok(200, "The conversation", conv),
                errors=(403, 404),
                params=[cid],
            )
        },
        "/v1/conversations/{id}/members": {
            "post": _op(
                "addMember",
                "Add a member to a group (members only)",
                _ok(204, "Added"),
                errors=(*_WITH_BODY, 403, 404),
                params=[cid],
                body=_obj({"user": USER}),
            )
        },
        "/v1/conversations/{id}/members/{user}": {
            "delete": _op(
                "removeMember",
                "Leave a group, or (its creator) remove a member",
                _ok(204, "Removed"),
                errors=(403, 404, 422),
                params=[cid, _path("user", USER)],
            )
        },
        "/v1/conversations/{id}/messages": {
            "get": _op(
                "listMessages",
                "Messages, newest first",
                _ok(
                    200,
                    "A page of texts and comments in their current state; `last_seq` is the "
                    "conversation's seq that state reflects",
                    _page_with_seq(),
                ),
                errors=(400, 403, 404),
                params=[
                    cid,
                    _query("before", {"type": "integer", "minimum": 0}, "only seq < before"),
                    *_PAGE,
                ],
            ),
            "post": _op(
                "sendMessage",
                "Send a message: the same path and guarantees as a WebSocket `send`",
                _ok(202, "Accepted", _obj({"id": ID, "ts": MS})),
                errors=(*_WITH_BODY, 403, 404, 409),
                params=[cid],
                body=send_body,
            ),
        },
        "/v1/notifications": {
            "get": _op(
                "listNotifications",
                "The caller's inbox: mentions, replies, direct messages kept while offline",
                _ok(200, "A page, and the unread total", _inbox_page()),
                errors=(400,),
                params=[
                    _query("unread", {"type": "string", "enum": ["true", "false"]}),
                    *_PAGE,
                ],
            )
        },
        "/v1/notifications/read": {
            "post": _op(
                "markNotificationsRead",
                "Mark notifications read (`ids`), or all of them (`{}`)",
                _ok(200, "How many changed", _obj({"marked": {"type": "integer"}})),
                errors=_WITH_BODY,
                body=_obj({"ids": {"type": "array", "items": ID, "maxItems": 1000}}, []),
            )
        },
        "/v1/publish/conversations/{id}": {
            "post": _service_op(
                "publishToConversation",
                "A backend service posts into a conversation its key's scope names",
                [cid],
            )
        },
        "/v1/publish/users/{user}": {
            "post": _service_op(
                "publishToUser",
                "A backend service posts to a user (their direct conversation with it)",
                [_path("user", USER)],
            )
        },
        "/v1/conversations/{id}/read": {
            "put": _op(
                "markRead",
                "Move the caller's read pointer forward (never back, never past the last seq)",
                _ok(200, "The pointer now", _obj({"conv": ID, "seq": {"type": "integer"}})),
                errors=(*_WITH_BODY, 403, 404),
                params=[cid],
                body=_obj({"seq": {"type": "integer", "minimum": 0}}),
            )
        },
        "/v1/conversations/{id}/presence": {
            "get": _op(
                "listPresence",
                "Members and whether each is online (`last_seen` when not), by user id",
                _ok(
                    200,
                    "A page of members",
                    _obj(
                        {
                            "items": {
                                "type": "array",
                                "items": _obj(
                                    {
                                        "user": USER,
                                        "online": {"type": "boolean"},
                                        "last_seen": {"type": ["integer", "null"]},
                                    }
                                ),
                            },
                            "next": {"type": ["string", "null"]},
                        }
                    ),
                ),
                errors=(400, 403, 404),
                params=[
                    cid,
                    _query("online", {"type": "string", "enum": ["true", "false"]}),
                    *_PAGE,
                ],
            )
        },
        "/v1/conversations/{id}/receipts": {
            "get": _op(
                "readReceipts",
                "Every member's read pointer (direct conversations and small groups)",
                _ok(
                    200,
                    "Pointers by user",
                    _obj(
                        {
                            "items": {
                                "type": "array",
                                "items": _obj({"user": USER, "seq": {"type": "integer"}}),
                            }
                        }
                    ),
                ),
                errors=(403, 404),
                params=[cid],
            )
        },
        "/v1/conversations/{id}/messages/{mid}": {
            "patch": _op(
                "editMessage",
                "Edit the caller's own message (an `edit` event, idempotent by cid)",
                accepted,
                errors=(*_WITH_BODY, 403, 404, 409),
                params=[cid, mid],
                body=_obj(
                    {
                        "cid": cid_schema,
                        "body": {"type": "string", "minLength": 1, "maxLength": MAX_BODY_CHARS},
                    }
                ),
            ),
            "delete": _op(
                "deleteMessage",
                "Delete the caller's own message, leaving a tombstone (a `delete` event)",
                accepted,
                errors=(400, 403, 404, 409, 413, 422),
                params=[cid, mid],
            ),
        },
        "/v1/conversations/{id}/messages/{mid}/reactions": {
            "post": _op(
                "react",
                "Add (or, with remove, take back) the caller's reaction to a message",
                accepted,
                errors=(*_WITH_BODY, 403, 404, 409),
                params=[cid, mid],
                body=_obj(
                    {"cid": cid_schema, "emoji": emoji, "remove": {"type": "boolean"}},
                    ["cid", "emoji"],
                ),
            ),
        },
    }


def _service_op(op_id: str, summary: str, params: list[Schema]) -> Schema:
    body = _obj(
        {
            "cid": {"type": "string", "minLength": 1, "maxLength": MAX_CID_CHARS},
            "body": {"type": "string", "minLength": 1, "maxLength": MAX_BODY_CHARS},
        }
    )
    op = _op(
        op_id,
        summary,
        _ok(202, "Accepted", _obj({"id": ID, "ts": MS, "conv": ID})),
        errors=(*_WITH_BODY, 403, 404, 409),
        params=params,
        body=body,
    )
    op["security"] = [{"apikey": []}]
    return op


def _inbox_page() -> Schema:
    item = _obj(
        {
            "id": ID,
            "kind": {"type": "string", "enum": ["mention", "reply", "dm"]},
            "conv": ID,
            "message": ID,
            "from": {"type": "string"},
            "excerpt": {"type": "string"},
            "ts": MS,
            "read": {"type": "boolean"},
        }
    )
    return _obj(
        {
            "items": {"type": "array", "items": item},
            "next": {"type": ["string", "null"]},
            "unread": {"type": "integer", "minimum": 0},
        }
    )


def _page_with_seq() -> Schema:
    page = _list_of("Message")
    page["properties"]["last_seq"] = {"type": "integer", "minimum": 0}
    page["required"] = [*page["required"], "last_seq"]
    return page


def _social_paths() -> dict[str, Schema]:
    post = {"$ref": "#/components/schemas/Post"}
    pid = _path("id", ID)
    create_body = _obj(
        {
            "title": {"type": "string", "minLength": 1, "maxLength": 300},
            "body": {"type": "string", "maxLength": 40_000, "default": ""},
            "community": COMMUNITY,
        },
        ["title", "community"],
    )
    vote_result = _obj(
        {
            "post": ID,
            "score": {"type": "integer"},
            "up": {"type": "integer", "minimum": 0},
            "down": {"type": "integer", "minimum": 0},
            "my_vote": {"type": "integer", "enum": [-1, 0, 1]},
        },
        ["post", "score", "my_vote"],
    )
    return {
        "/v1/posts": {
            "post": _op(
                "createPost",
                "Publish a post to a community",
                _ok(201, "Created", post),
                errors=_WITH_BODY,
                body=create_body,
            )
        },
        "/v1/posts/{id}": {
            "get": _op(
                "getPost", "One post", _ok(200, "The post", post), errors=(404,), params=[pid]
            ),
            "delete": _op(
                "deletePost",
                "Delete a post (author only); it leaves every feed",
                _ok(204, "Deleted"),
                errors=(403, 404),
                params=[pid],
            ),
        },
        "/v1/posts/{id}/vote": {
            "put": _op(
                "vote",
                "Vote; one vote per user per post, repeating a vote changes nothing",
                _ok(200, "The post's totals as of this vote", vote_result),
                errors=(*_WITH_BODY, 404),
                params=[pid],
                body=_obj({"value": {"type": "integer", "enum": [1, 0, -1]}}),
            )
        },
        "/v1/feeds/{kind}": {
            "get": _op(
                "feed",
                "Posts ranked: trending (votes decayed by age), new, or top in a window",
                _ok(200, "A page", _list_of("Post")),
                errors=(400,),
                params=[
                    _path("kind", {"type": "string", "enum": ["trending", "new", "top"]}),
                    _query(
                        "community",
                        {"type": "string", "pattern": "^[a-z0-9_]{0,64}$"},
                        "one community; empty or absent: all of them",
                    ),
                    _query(
                        "window",
                        {"type": "string", "enum": ["day", "week", "all", ""]},
                        "top only (400 with another feed); empty or absent: the default",
                    ),
                    *_PAGE,
                ],
            )
        },
    }


def _service_paths(settings: Settings) -> dict[str, Schema]:
    text = {"text/plain": {"schema": {"type": "string"}}}
    paths: dict[str, Schema] = {
        "/healthz": {
            "get": _op(
                "healthz",
                "200 while the process runs",
                _ok(
                    200,
                    "Alive: the node's id and the running version (`agora --version`)",
                    _obj(
                        {
                            "status": {"type": "string", "const": "ok"},
                            "node": {"type": "string"},
                            "version": {"type": "string"},
                        }
                    ),
                ),
                public=True,
            )
        },
        "/readyz": {
            "get": _op(
                "readyz",
                "200 when every dependency answers, else 503 with what is down",
                {
                    "200": {
                        "description": "Ready",
                        "content": _json(_obj(_READY, ["status"])),
                    },
                    "503": {
                        "description": "Some dependency is down",
                        "content": _json(_obj(_READY, ["status", "down"])),
                    },
                    "404": {
                        "description": "Not served to this client: only to a loopback peer "
                        "or with `Authorization: Bearer $AGORA_OPS_TOKEN`",
                        "content": _json(_obj({"error": {"type": "object"}}, ["error"])),
                    },
                },
                public=True,
            )
        },
        "/metrics": {
            "get": _op(
                "metrics",
                "Prometheus text format",
                {"200": {"description": "Metrics", "content": text}},
                public=True,
            )
        },
        "/openapi.json": {
            "get": _op(
                "openapi",
                "This document",
                _ok(200, "OpenAPI 3.1", {"type": "object"}),
                public=True,
            )
        },
        "/asyncapi.json": {
            "get": _op(
                "asyncapi",
                "The WebSocket protocol (GET /v1/ws) as an AsyncAPI 3.0 document",
                _ok(200, "AsyncAPI 3.0", {"type": "object"}),
                public=True,
            )
        },
        "/v1/me": {
            "get": _op(
                "me",
                "Who the token says the caller is",
                _ok(200, "The caller", _obj({"id": USER, "name": {"type": "string"}})),
            )
        },
    }
    if settings.dev_tokens:
        paths["/v1/dev/token"] = {
            "post": _op(
                "devToken",
                "Dev only (AGORA_DEV_TOKENS=true): a token for any user",
                _ok(
                    200,
                    "A signed token",
                    _obj({"token": {"type": "string"}, "user": USER, "expires_at": MS}),
                ),
                errors=_WITH_BODY,
                body=_obj(
                    {
                        "user": USER,
                        "name": {"type": ["string", "null"], "minLength": 1, "maxLength": 100},
                    },
                    ["user"],
                ),
                public=True,
            )
        }
    return paths


def document(settings: Settings) -> Schema:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Agora HTTP API",
            "version": "1",
            "description": (
                "The HTTP half of wire protocol v1 (docs/protocol.md). Ids are 64-bit integers "
                "sent as decimal strings. Errors are `{error: {code, message}}`. Lists are "
                "keyset-paginated: `{items, next}` with `?cursor=&limit=`. The WebSocket "
                "`GET /v1/ws` (frames, close codes) is described in docs/protocol.md and, "
                "as AsyncAPI 3.0, at `GET /asyncapi.json`."
            ),
        },
        "security": [{"bearer": []}],
        "paths": {
            **_service_paths(settings),
            **_conversation_paths(),
            **_social_paths(),
        },
        "components": _components(),
    }


async def openapi_json(request: Request) -> Response:
    doc = getattr(request.app.state, "openapi", None)
    if doc is None:
        doc = request.app.state.openapi = document(request.app.state.settings)
    return JSONResponse(doc)


routes = [Route("/openapi.json", openapi_json, methods=["GET"])]
