"""Pure parts of edits, deletes, reactions and replies: frames, envelope, the refusal
rule, and the client's timeline."""

from __future__ import annotations

from typing import Any

import pytest

from agora_client.timeline import Timeline
from fanout.envelope import (
    Delivery,
    decode_delivery,
    decode_new_message,
    encode_delivery,
    encode_new_message,
)
from gateway.protocol.frames import Delete, Edit, FrameError, React, Send, parse_request
from gateway.protocol.messages import message_frame
from storage.events import _Target, refusal
from storage.models import Message, NewMessage


def test_event_frames_parse() -> None:
    base = {"conv": "5", "cid": "c", "ref": "9", "rid": 1}
    assert parse_request({**base, "t": "edit", "body": "x"}) == Edit(1, 5, "c", 9, "x")
    assert parse_request({**base, "t": "delete"}) == Delete(1, 5, "c", 9)
    assert parse_request({**base, "t": "react", "emoji": "👍"}) == React(1, 5, "c", 9, "👍", False)
    got = parse_request({**base, "t": "react", "emoji": "👍", "remove": True})
    assert got == React(1, 5, "c", 9, "👍", True)
    send = parse_request({"t": "send", "conv": "5", "cid": "c", "body": "b", "reply_to": "9"})
    assert send == Send(None, 5, "c", "b", "text", 9)


@pytest.mark.parametrize(
    "frame",
    [
        {"t": "edit", "conv": "5", "cid": "c", "ref": "9"},
        {"t": "edit", "conv": "5", "cid": "c", "ref": "x", "body": "b"},
        {"t": "delete", "conv": "5", "ref": "9"},
        {"t": "react", "conv": "5", "cid": "c", "ref": "9"},
        {"t": "react", "conv": "5", "cid": "c", "ref": "9", "emoji": "\x00"},
        {"t": "react", "conv": "5", "cid": "c", "ref": "9", "emoji": "a\tb"},
        {"t": "react", "conv": "5", "cid": "c", "ref": "9", "emoji": "x", "remove": "yes"},
        {"t": "send", "conv": "5", "cid": "c", "body": "b", "reply_to": 9},
    ],
)
def test_bad_event_frames_are_frame_errors(frame: dict[str, Any]) -> None:
    with pytest.raises(FrameError) as exc:
        parse_request(frame)
    assert exc.value.error.code == "bad_request"


def test_msg_frame_adds_fields_only_when_set() -> None:
    plain = message_frame(Message(1, 2, 3, "u", "b", 4, "c", "text"))
    assert set(plain) == {"t", "conv", "id", "seq", "from", "body", "ts", "cid", "kind"}
    edit = message_frame(Message(1, 2, 3, "u", "b", 4, "c", "edit", ref=7))
    assert edit["ref"] == "7"
    reply = message_frame(Message(1, 2, 3, "u", "", 4, "c", "text", 8, 9, True, True))
    assert (reply["ref"], reply["reply_to"], reply["edited"], reply["deleted"]) == (
        "8",
        "9",
        True,
        True,
    )


def test_envelopes_carry_ref_and_reply_to() -> None:
    m = NewMessage(1, 2, "u", "c", "👍", 3, "react", ref=5)
    assert decode_new_message(encode_new_message(m)) == m
    plain = NewMessage(1, 2, "u", "c", "b", 3, "text")
    assert decode_new_message(encode_new_message(plain)) == plain
    stored = [
        Message(1, 2, 3, "u", "b", 4, "c", "text"),
        Message(1, 5, 4, "u", "", 6, "c", "text", None, 2, True, True),
    ]
    assert decode_delivery(encode_delivery(Delivery(messages=stored))).messages == stored


def _ev(kind: str, sender: str = "a") -> NewMessage:
    return NewMessage(1, 99, sender, "c", "x", 5, kind, ref=7)


def test_refusal_rules() -> None:
    mine = _Target(1, "a", "text", False, in_batch=False)
    assert refusal(mine, _ev("edit")) is None
    assert refusal(mine, _ev("delete")) is None
    assert refusal(mine, _ev("react", "b")) is None
    assert refusal(mine, _ev("edit", "b")) == "only the sender edits or deletes a message"
    assert refusal(mine, _ev("delete", "b")) is not None
    assert refusal(None, _ev("react")) is not None
    assert refusal(_Target(2, "a", "text", False, False), _ev("edit")) is not None  # other conv
    assert refusal(_Target(1, "a", "edit", False, False), _ev("edit")) is not None
    assert refusal(_Target(1, "a", "text", True, False), _ev("react")) is not None


def _msg(seq: int, kind: str, body: str = "", ref: str | None = None, sender: str = "a") -> Any:
    f: dict[str, Any] = {"id": str(100 + seq), "seq": seq, "from": sender, "body": body}
    f["kind"] = kind
    if ref is not None:
        f["ref"] = ref
    return f


def test_timeline_applies_events_in_order_and_ignores_old_seqs() -> None:
    t = Timeline("b")
    t.apply(_msg(1, "text", "hi"))
    t.apply(_msg(2, "edit", "hello", "101"))
    t.apply(_msg(3, "react", "👍", "101", sender="b"))
    t.apply(_msg(4, "react", "👍", "101", sender="c"))
    t.apply(_msg(3, "react", "👍", "101", sender="b"))  # a repeat: ignored by seq
    t.apply(_msg(5, "unreact", "👍", "101", sender="c"))
    item = t.items["101"]
    assert (item.body, item.edited, item.reactions, item.mine) == ("hello", True, {"👍": 1}, {"👍"})
    t.apply(_msg(6, "delete", "", "101"))
    assert (item.body, item.deleted, item.reactions) == ("", True, {})
    assert t.seq == 6


def test_mentions_are_parsed_once_each_and_sentence_ends_are_not_names() -> None:
    from storage.notifications import excerpt, mentioned

    assert mentioned("hi @bob and @carol.x, @bob again; email a@b.c") == ["bob", "carol.x"]
    assert mentioned("@alice: look @dave.") == ["alice", "dave"]
    assert mentioned("@" + "x" * 70) == ["x" * 64]
    assert len(mentioned(" ".join(f"@u{i}" for i in range(30)))) == 20
    assert excerpt("y" * 500).endswith("…") and len(excerpt("y" * 500)) == 140


def test_a_dm_entry_only_for_direct_messages_not_already_notified() -> None:
    from storage.notifications import dm_of

    plain = Message(1, 2, 3, "a", "hi", 4, "c", "text")
    assert dm_of(plain) is None
    direct = Message(1, 2, 3, "a", "hi", 4, "c", "text", dm_to="b")
    n = dm_of(direct)
    assert n is not None and (n.user, n.kind, n.sender) == ("b", "dm", "a")
    mentioned_too = Message(
        1, 2, 3, "a", "@b", 4, "c", "text", notify=(("b", "mention"),), dm_to="b"
    )
    assert dm_of(mentioned_too) is None
