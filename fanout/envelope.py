"""The internal envelope: what Kafka records and Redis deliveries carry (MessagePack).

Separate from the wire frame of docs/protocol.md and versioned (`v`), so the two can change
independently: a worker refuses an envelope version it does not know instead of guessing.
Keys are short because every message crosses Kafka once and Redis once per node.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack

from storage.models import Message, NewMessage

VERSION = 1


class EnvelopeError(ValueError):
    """An envelope that cannot be decoded (corrupt, or an unknown version)."""


def _unpack(data: bytes) -> dict[str, Any]:
    try:
        obj = msgpack.unpackb(data, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise EnvelopeError(f"undecodable envelope: {type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise EnvelopeError("envelope is not a map")
    if obj.get("v") != VERSION:
        raise EnvelopeError(f"unknown envelope version {obj.get('v')!r}")
    return obj


def encode_new_message(m: NewMessage) -> bytes:
    o: dict[str, Any] = {
        "v": VERSION,
        "c": m.conv,
        "i": m.id,
        "f": m.sender,
        "k": m.cid,
        "b": m.body,
        "t": m.ts,
        "y": m.kind,
    }
    # Optional keys, present only when set (an addition: older records have none).
    if m.ref is not None:
        o["r"] = m.ref
    if m.reply_to is not None:
        o["p"] = m.reply_to
    out: bytes = msgpack.packb(o)
    return out


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def decode_new_message(data: bytes) -> NewMessage:
    o = _unpack(data)
    try:
        return NewMessage(
            conv=int(o["c"]),
            id=int(o["i"]),
            sender=str(o["f"]),
            cid=str(o["k"]),
            body=str(o["b"]),
            ts=int(o["t"]),
            kind=str(o["y"]),
            ref=_opt_int(o.get("r")),
            reply_to=_opt_int(o.get("p")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise EnvelopeError(f"bad message envelope: {exc!r}") from None


@dataclass(frozen=True, slots=True)
class Vote:
    """A record on the votes topic (keyed by post): `user`'s vote row on `post` changed and
    may need counting. It carries no delta: the scores worker counts the row as it is
    (storage.posts.count_votes), so the same record twice, or late, counts nothing twice."""

    post: int
    user: str
    ts: int


def encode_vote(v: Vote) -> bytes:
    out: bytes = msgpack.packb({"v": VERSION, "p": v.post, "w": v.user, "t": v.ts})
    return out


def decode_vote(data: bytes) -> Vote:
    o = _unpack(data)
    try:
        user = o["w"]  # a delta of the old format has none: its vote rows were recounted
        if not isinstance(user, str):
            raise TypeError("voter is not a string")
        return Vote(post=int(o["p"]), user=user, ts=int(o["t"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise EnvelopeError(f"bad vote envelope: {exc!r}") from None


@dataclass(frozen=True, slots=True)
class Score:
    post: int
    thread: int
    score: int
    up: int
    down: int


@dataclass
class Delivery:
    """One publish to one gateway node: everything a batch has for that node's subscribers.

    `user_frames` are wire-level frames addressed to every connection of a user (for
    example being added to a conversation).
    """

    messages: list[Message] = field(default_factory=list)
    typing: list[tuple[int, str]] = field(default_factory=list)  # (conv, user)
    scores: list[Score] = field(default_factory=list)
    user_frames: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    # (conversations, frame): to each local subscriber of any of them once (presence).
    presence: list[tuple[list[int], dict[str, Any]]] = field(default_factory=list)


def encode_delivery(d: Delivery) -> bytes:
    payload: dict[str, Any] = {"v": VERSION}
    if d.messages:
        payload["m"] = [_message_row(m) for m in d.messages]
    if d.typing:
        payload["ty"] = [[c, u] for c, u in d.typing]
    if d.scores:
        payload["sc"] = [[s.post, s.thread, s.score, s.up, s.down] for s in d.scores]
    if d.user_frames:
        payload["u"] = [[u, f] for u, f in d.user_frames]
    if d.presence:
        payload["pr"] = [[convs, f] for convs, f in d.presence]
    out: bytes = msgpack.packb(payload)
    return out


# What `encode_delivery` writes before the rows of a delivery of messages only: the map's
# header, "v" and its value, the key "m" (the array's header and the rows follow). The
# fan-out worker's publish script (fanout/routing.py) assembles deliveries from it.
DELIVERY_HEAD: bytes = msgpack.packb({"v": VERSION, "m": []})[:-1]


def message_rows(messages: list[Message]) -> bytes:
    """The rows of `messages` as `encode_delivery` writes them in its "m" array, one after
    another (without the array's header)."""
    return b"".join(msgpack.packb(_message_row(m)) for m in messages)


def _message_row(m: Message) -> list[Any]:
    row: list[Any] = [m.conv, m.id, m.seq, m.sender, m.body, m.ts, m.cid, m.kind]
    # The fields of edits, reactions and replies trail, only when set: a plain message's
    # row stays as it was.
    if m.ref is not None or m.reply_to is not None or m.edited or m.deleted:
        row += [m.ref, m.reply_to, m.edited, m.deleted]
    return row


def decode_delivery(data: bytes) -> Delivery:
    o = _unpack(data)
    try:
        return Delivery(
            messages=[Message(*row) for row in o.get("m", ())],
            typing=[(int(c), str(u)) for c, u in o.get("ty", ())],
            scores=[Score(*row) for row in o.get("sc", ())],
            user_frames=[(str(u), dict(f)) for u, f in o.get("u", ())],
            presence=[([int(c) for c in convs], dict(f)) for convs, f in o.get("pr", ())],
        )
    except (TypeError, ValueError) as exc:
        raise EnvelopeError(f"bad delivery envelope: {exc!r}") from None
