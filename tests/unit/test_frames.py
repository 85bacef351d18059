"""The wire protocol core without sockets: parsing, validation, close codes, encodings."""

from __future__ import annotations

from typing import Any

import msgpack
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.errors import AgoraError
from gateway.protocol import codec, frames
from gateway.protocol.frames import (
    CloseCode,
    FrameError,
    Ping,
    ProtocolViolation,
    Send,
    Sub,
    Typing,
    Unsub,
    parse_request,
)

CONV = "766161606192800768"


def test_parses_every_request_type() -> None:
    assert parse_request({"t": "sub", "conv": CONV, "rid": 1}) == Sub(1, int(CONV), None)
    assert parse_request({"t": "sub", "conv": CONV, "since": 5}) == Sub(None, int(CONV), 5)
    assert parse_request({"t": "unsub", "conv": CONV, "rid": 2}) == Unsub(2, int(CONV))
    assert parse_request({"t": "send", "conv": CONV, "cid": "c1", "body": "hi", "rid": 3}) == Send(
        3, int(CONV), "c1", "hi", "text"
    )
    assert parse_request({"t": "typing", "conv": CONV}) == Typing(None, int(CONV))
    assert parse_request({"t": "ping", "rid": 9}) == Ping(9)


@pytest.mark.parametrize("frame", [[], "x", 1, None, {"t": 1}, {}, {"t": "nope"}, {"t": ""}])
def test_unparseable_or_unknown_type_is_a_protocol_violation(frame: Any) -> None:
    with pytest.raises(ProtocolViolation):
        parse_request(frame)
    assert ProtocolViolation.code == CloseCode.PROTOCOL_ERROR == 4002


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ({"t": "sub", "rid": 4}, "bad_request"),
        ({"t": "sub", "conv": 123, "rid": 4}, "bad_request"),
        ({"t": "sub", "conv": "abc", "rid": 4}, "bad_request"),
        ({"t": "sub", "conv": "0", "rid": 4}, "bad_request"),
        ({"t": "sub", "conv": "99999999999999999999", "rid": 4}, "bad_request"),
        ({"t": "sub", "conv": CONV, "since": -1, "rid": 4}, "bad_request"),
        ({"t": "sub", "conv": CONV, "since": "3", "rid": 4}, "bad_request"),
        ({"t": "sub", "conv": CONV, "since": True, "rid": 4}, "bad_request"),
        ({"t": "send", "conv": CONV, "body": "x", "rid": 4}, "bad_request"),
        ({"t": "send", "conv": CONV, "cid": "", "body": "x", "rid": 4}, "bad_request"),
        ({"t": "send", "conv": CONV, "cid": "c" * 65, "body": "x", "rid": 4}, "bad_request"),
        ({"t": "send", "conv": CONV, "cid": "c", "body": "", "rid": 4}, "bad_request"),
        ({"t": "send", "conv": CONV, "cid": "c", "body": 5, "rid": 4}, "bad_request"),
        ({"t": "send", "conv": CONV, "cid": "c", "body": "x" * 4001, "rid": 4}, "too_large"),
        (
            {"t": "send", "conv": CONV, "cid": "c", "body": "x", "kind": "img", "rid": 4},
            "bad_request",
        ),
    ],
)
def test_bad_fields_are_frame_errors_with_the_rid(frame: dict[str, Any], code: str) -> None:
    with pytest.raises(FrameError) as info:
        parse_request(frame)
    assert info.value.rid == 4
    assert info.value.error.code == code


def test_body_of_exactly_4000_chars_is_accepted() -> None:
    req = parse_request({"t": "send", "conv": CONV, "cid": "c", "body": "é" * 4000})
    assert isinstance(req, Send) and len(req.body) == 4000


@pytest.mark.parametrize("rid", [-1, 1.5, "1", True, 2**53])
def test_bad_rid_is_an_error_without_rid(rid: Any) -> None:
    with pytest.raises(FrameError) as info:
        parse_request({"t": "ping", "rid": rid})
    assert info.value.rid is None


def test_close_codes_match_protocol() -> None:
    assert {c.value for c in CloseCode} == {1000, 1001, 1009, 1011, 1013, 4001, 4002, 4008, 4009}
    assert CloseCode.SLOW_CONSUMER.reconnect and not CloseCode.UNAUTHORIZED.reconnect
    assert not CloseCode.PROTOCOL_ERROR.reconnect and CloseCode.GOING_AWAY.reconnect


def test_server_frames_send_ids_as_strings_and_carry_rid() -> None:
    m = frames.msg(2**62, 2**62 + 1, 7, "u", "b", 123, "c", "text")
    assert m["conv"] == str(2**62) and m["id"] == str(2**62 + 1) and m["seq"] == 7
    assert frames.ack(5, "c", 9, 1)["rid"] == 5 and frames.ack(5, "c", 9, 1)["id"] == "9"
    assert "rid" not in frames.ok(None)
    e = frames.err(3, AgoraError("boom", retry_after_ms=250))
    assert e == {"t": "err", "code": "internal", "msg": "boom", "retry_after_ms": 250, "rid": 3}


def test_codecs_round_trip_and_refuse_the_wrong_frame_kind() -> None:
    frame = {"t": "msg", "conv": "1", "body": "héllo"}
    assert codec.JSON.decode(codec.JSON.encode(frame)) == frame
    assert codec.MSGPACK.decode(codec.MSGPACK.encode(frame)) == frame
    with pytest.raises(ProtocolViolation):
        codec.JSON.decode(b"{}")
    with pytest.raises(ProtocolViolation):
        codec.MSGPACK.decode("{}")
    with pytest.raises(ProtocolViolation):
        codec.JSON.decode("{not json")
    with pytest.raises(ProtocolViolation):
        codec.MSGPACK.decode(b"\xc1")


def test_deep_nesting_is_refused_in_both_encodings() -> None:
    deep: Any = "x"
    for _ in range(100):
        deep = [deep]
    with pytest.raises(ProtocolViolation):
        codec.JSON.decode(orjson.dumps({"t": "ping", "x": deep}).decode())
    with pytest.raises(ProtocolViolation):
        codec.MSGPACK.decode(msgpack.packb({"t": "ping", "x": deep}))


def test_subprotocol_choice() -> None:
    assert codec.choose(["chat.v1.msgpack"]) == (codec.MSGPACK, "chat.v1.msgpack")
    assert codec.choose(["x", "chat.v1.json"]) == (codec.JSON, "chat.v1.json")
    assert codec.choose([]) == (codec.JSON, None)


@given(st.binary(max_size=200))
def test_random_bytes_never_escape_as_anything_but_protocol_errors(data: bytes) -> None:
    for c, payload in ((codec.MSGPACK, data), (codec.JSON, data.decode("latin-1"))):
        try:
            parse_request(c.decode(payload))
        except (ProtocolViolation, FrameError):
            pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(
    st.sampled_from(["sub", "unsub", "send", "typing", "ping"]),
    st.dictionaries(st.sampled_from(["conv", "cid", "body", "since", "rid", "kind"]), json_values),
)
def test_known_types_with_arbitrary_fields_parse_or_fail_cleanly(
    t: str, fields: dict[str, Any]
) -> None:
    try:
        req = parse_request({**fields, "t": t})
    except FrameError as exc:
        assert exc.error.code in ("bad_request", "too_large")
    else:
        assert type(req).__name__.lower() == t
