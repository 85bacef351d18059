"""Frames of wire protocol v1: close codes, client requests, server frames.

`parse_request` turns one decoded client map into a typed request, or raises:
- `ProtocolViolation` (close 4002): not a map, no string `t`, or an unknown `t`;
- `FrameError` (an `err` frame, connection stays open): a known `t` whose fields are
  missing, mistyped or out of range. It carries the request's `rid` when there was one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from core.errors import AgoraError, BadRequest
from gateway.protocol import fields
from gateway.protocol.fields import check_body, check_cid, check_emoji
from storage.ids import parse_id

MAX_BODY_CHARS = fields.MAX_BODY_CHARS
MAX_CID_CHARS = fields.MAX_CID_CHARS
MAX_EMOJI_CHARS = fields.MAX_EMOJI_CHARS
MAX_RID = (1 << 53) - 1  # a JavaScript client's largest safe integer
MAX_SEQ = (1 << 63) - 1
USER_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
MESSAGE_KINDS = ("text", "comment")
SERVICE_SENDER = "service/"  # the sender prefix of the publish API (gateway/servicekeys.py)


class CloseCode(IntEnum):
    """WebSocket close codes of docs/protocol.md, ranged like Centrifuge's: 1xxx are the
    standard ones, 40xx are Agora's. `reconnect` says whether a client should come back."""

    NORMAL = 1000
    GOING_AWAY = 1001
    TOO_LARGE = 1009
    INTERNAL = 1011
    TRY_AGAIN_LATER = 1013
    UNAUTHORIZED = 4001
    PROTOCOL_ERROR = 4002
    RATE_LIMITED = 4008
    SLOW_CONSUMER = 4009

    @property
    def reconnect(self) -> bool:
        return self in (
            CloseCode.GOING_AWAY,
            CloseCode.INTERNAL,
            CloseCode.TRY_AGAIN_LATER,
            CloseCode.RATE_LIMITED,
            CloseCode.SLOW_CONSUMER,
        )


class ProtocolViolation(Exception):
    """The peer broke the protocol: the connection closes with 4002."""

    code = CloseCode.PROTOCOL_ERROR


class FrameError(Exception):
    """A known request with bad fields: answered with `err`, the connection stays open."""

    def __init__(self, rid: int | None, error: AgoraError) -> None:
        super().__init__(error.message)
        self.rid = rid
        self.error = error


# -- client requests ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sub:
    rid: int | None
    conv: int
    since: int | None


@dataclass(frozen=True, slots=True)
class Unsub:
    rid: int | None
    conv: int


@dataclass(frozen=True, slots=True)
class Send:
    rid: int | None
    conv: int
    cid: str
    body: str
    kind: str
    reply_to: int | None = None


@dataclass(frozen=True, slots=True)
class Edit:
    rid: int | None
    conv: int
    cid: str
    ref: int
    body: str


@dataclass(frozen=True, slots=True)
class Delete:
    rid: int | None
    conv: int
    cid: str
    ref: int


@dataclass(frozen=True, slots=True)
class React:
    rid: int | None
    conv: int
    cid: str
    ref: int
    emoji: str
    remove: bool


@dataclass(frozen=True, slots=True)
class Read:
    rid: int | None
    conv: int
    seq: int


@dataclass(frozen=True, slots=True)
class Typing:
    rid: int | None
    conv: int


@dataclass(frozen=True, slots=True)
class Ping:
    rid: int | None


@dataclass(frozen=True, slots=True)
class Auth:
    """A newer token for the same user: the session lives on past the old one's `exp`."""

    rid: int | None
    token: str


Request = Sub | Unsub | Send | Edit | Delete | React | Read | Typing | Ping | Auth

MAX_TOKEN_CHARS = 8192


def _rid(frame: dict[str, Any]) -> int | None:
    rid = frame.get("rid")
    if rid is None:
        return None
    if type(rid) is not int or not 0 <= rid <= MAX_RID:
        # No usable rid to answer with, but the request type is known: err without rid.
        raise FrameError(None, BadRequest("rid must be an integer between 0 and 2^53-1"))
    return rid


def _conv(frame: dict[str, Any], rid: int | None, name: str = "conv") -> int:
    raw = frame.get(name)
    if raw is None:
        raise FrameError(rid, BadRequest(f"{name} is required"))
    if not isinstance(raw, str):
        raise FrameError(rid, BadRequest(f"{name} must be a decimal string"))
    conv = parse_id(raw)
    if conv is None:
        raise FrameError(rid, BadRequest(f"{name} is not a valid id"))
    return conv


def _cid(f: dict[str, Any], rid: int | None) -> str:
    cid = f.get("cid")
    problem = check_cid(cid)
    if problem is not None:
        raise FrameError(rid, BadRequest(problem))
    assert isinstance(cid, str)
    return cid


def _body(f: dict[str, Any], rid: int | None) -> str:
    body = f.get("body")
    problem = check_body(body)
    if problem is not None:
        raise FrameError(rid, problem)
    assert isinstance(body, str)
    return body


def _parse_sub(f: dict[str, Any], rid: int | None) -> Sub:
    conv = _conv(f, rid)
    since = f.get("since")
    if since is not None and (type(since) is not int or not 0 <= since <= MAX_SEQ):
        raise FrameError(rid, BadRequest("since must be a non-negative integer"))
    return Sub(rid, conv, since)


def _parse_send(f: dict[str, Any], rid: int | None) -> Send:
    conv = _conv(f, rid)
    cid = _cid(f, rid)
    body = _body(f, rid)
    kind = f.get("kind", "text")
    if kind not in MESSAGE_KINDS:
        raise FrameError(rid, BadRequest('kind must be "text" or "comment"'))
    reply_to = None if f.get("reply_to") is None else _conv(f, rid, "reply_to")
    return Send(rid, conv, cid, body, kind, reply_to)


def _parse_edit(f: dict[str, Any], rid: int | None) -> Edit:
    return Edit(rid, _conv(f, rid), _cid(f, rid), _conv(f, rid, "ref"), _body(f, rid))


def _parse_delete(f: dict[str, Any], rid: int | None) -> Delete:
    return Delete(rid, _conv(f, rid), _cid(f, rid), _conv(f, rid, "ref"))


def _parse_react(f: dict[str, Any], rid: int | None) -> React:
    conv, cid, ref = _conv(f, rid), _cid(f, rid), _conv(f, rid, "ref")
    emoji = f.get("emoji")
    problem = check_emoji(emoji)
    if problem is not None:
        raise FrameError(rid, BadRequest(problem))
    assert isinstance(emoji, str)
    remove = f.get("remove", False)
    if not isinstance(remove, bool):
        raise FrameError(rid, BadRequest("remove must be a boolean"))
    return React(rid, conv, cid, ref, emoji, remove)


def _parse_read(f: dict[str, Any], rid: int | None) -> Read:
    conv = _conv(f, rid)
    seq = f.get("seq")
    if type(seq) is not int or not 0 <= seq <= MAX_SEQ:
        raise FrameError(rid, BadRequest("seq must be a non-negative integer"))
    return Read(rid, conv, seq)


def parse_request(frame: Any) -> Request:
    """One decoded client frame -> a typed request (see the module doc for errors)."""
    if not isinstance(frame, dict):
        raise ProtocolViolation("a frame must be a map")
    t = frame.get("t")
    if not isinstance(t, str):
        raise ProtocolViolation("a frame needs a string field t")
    if t not in _PARSERS:
        raise ProtocolViolation(f"unknown frame type {t[:32]!r}")
    rid = _rid(frame)
    parsed: Request = _PARSERS[t](frame, rid)
    return parsed


_PARSERS: dict[str, Any] = {
    "sub": _parse_sub,
    "unsub": lambda f, rid: Unsub(rid, _conv(f, rid)),
    "send": _parse_send,
    "edit": _parse_edit,
    "delete": _parse_delete,
    "react": _parse_react,
    "read": _parse_read,
    "typing": lambda f, rid: Typing(rid, _conv(f, rid)),
    "ping": lambda f, rid: Ping(rid),
    "auth": lambda f, rid: Auth(rid, _token(f, rid)),
}


def _token(f: dict[str, Any], rid: int | None) -> str:
    token = f.get("token")
    if not isinstance(token, str) or not 1 <= len(token) <= MAX_TOKEN_CHARS:
        raise FrameError(rid, BadRequest(f"token must be a string of 1-{MAX_TOKEN_CHARS} chars"))
    return token


# -- server frames (plain maps, encoded by the codec) --------------------------------------


def hello(user: str, node: str, hb_ms: int, max_frame: int, exp: int) -> dict[str, Any]:
    """`exp`: the token's own `exp` claim (seconds since the Unix epoch, as in JWT)."""
    return {
        "t": "hello",
        "user": user,
        "node": node,
        "hb": hb_ms,
        "max_frame": max_frame,
        "exp": exp,
    }


def msg(
    conv: int,
    id_: int,
    seq: int,
    sender: str,
    body: str,
    ts: int,
    cid: str,
    kind: str,
    *,
    ref: int | None = None,
    reply_to: int | None = None,
    edited: bool = False,
    deleted: bool = False,
) -> dict[str, Any]:
    frame: dict[str, Any] = {
        "t": "msg",
        "conv": str(conv),
        "id": str(id_),
        "seq": seq,
        "from": sender,
        "body": body,
        "ts": ts,
        "cid": cid,
        "kind": kind,
    }
    # Additions, present only when set: a plain message's frame is as it always was.
    if ref is not None:
        frame["ref"] = str(ref)
    if reply_to is not None:
        frame["reply_to"] = str(reply_to)
    if edited:
        frame["edited"] = True
    if deleted:
        frame["deleted"] = True
    if sender.startswith(SERVICE_SENDER):
        frame["service"] = True  # posted by a backend service (no user id holds a "/")
    return frame


def _with_rid(frame: dict[str, Any], rid: int | None) -> dict[str, Any]:
    if rid is not None:
        frame["rid"] = rid
    return frame


def subbed(rid: int | None, conv: int, seq: int, recovered: bool) -> dict[str, Any]:
    return _with_rid({"t": "subbed", "conv": str(conv), "seq": seq, "recovered": recovered}, rid)


def ack(rid: int | None, cid: str, id_: int, ts: int) -> dict[str, Any]:
    return _with_rid({"t": "ack", "cid": cid, "id": str(id_), "ts": ts}, rid)


def ok(rid: int | None, **fields: Any) -> dict[str, Any]:
    return _with_rid({"t": "ok", **fields}, rid)


def pong(rid: int | None) -> dict[str, Any]:
    return _with_rid({"t": "pong"}, rid)


def err(rid: int | None, error: AgoraError) -> dict[str, Any]:
    frame: dict[str, Any] = {"t": "err", "code": error.code, "msg": error.message}
    if error.retry_after_ms is not None:
        frame["retry_after_ms"] = error.retry_after_ms
    return _with_rid(frame, rid)


def typing(conv: int, user: str) -> dict[str, Any]:
    return {"t": "typing", "conv": str(conv), "user": user}


def score(post: int, value: int, up: int, down: int) -> dict[str, Any]:
    return {"t": "score", "post": str(post), "score": value, "up": up, "down": down}


def unsubbed(conv: int, reason: str) -> dict[str, Any]:
    """The server ended a subscription (the user was removed or left, the conversation
    closed): nothing more of `conv` follows on this connection."""
    return {"t": "unsubbed", "conv": str(conv), "reason": reason}


def read(conv: int, seq: int) -> dict[str, Any]:
    """To the reader's own connections: their read pointer in `conv` is now `seq`."""
    return {"t": "read", "conv": str(conv), "seq": seq}


def receipt(conv: int, user: str, seq: int) -> dict[str, Any]:
    """To the members: `user` has read `conv` up to `seq`."""
    return {"t": "receipt", "conv": str(conv), "user": user, "seq": seq}


def presence(user: str, online: bool, last_seen: int | None) -> dict[str, Any]:
    """`user` came online, or went offline (`last_seen`: when, ms)."""
    return {"t": "presence", "user": user, "online": online, "last_seen": last_seen}


def presence_count(conv: int, online: int) -> dict[str, Any]:
    """How many connections follow a post's thread (sent at most once a second)."""
    return {"t": "presence_count", "conv": str(conv), "online": online}


def reconnect(after_ms: int) -> dict[str, Any]:
    return {"t": "reconnect", "after_ms": after_ms}
