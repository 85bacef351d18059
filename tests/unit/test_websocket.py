"""gateway.protocol.websocket: RFC 6455 framing and the upgrade check, without I/O."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.protocol import websocket as ws
from gateway.protocol.websocket import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONT,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameReader,
    HandshakeError,
    WebSocketError,
)


def client_frame(
    op: int, payload: bytes, fin: bool = True, rsv: int = 0, mask: bool = True
) -> bytes:
    """A frame as a client writes it (masked), built independently of the module."""
    first = (0x80 if fin else 0) | rsv | op
    n = len(payload)
    if n < 126:
        head = bytes((first, (0x80 if mask else 0) | n))
    elif n < 65536:
        head = bytes((first, (0x80 if mask else 0) | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((first, (0x80 if mask else 0) | 127)) + n.to_bytes(8, "big")
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def fails(data: bytes, code: int, max_size: int = 1 << 16) -> None:
    with pytest.raises(WebSocketError) as info:
        FrameReader(max_size).feed(data)
    assert info.value.code == code


# -- the upgrade --------------------------------------------------------------------------------
GOOD = [
    (b"host", b"x"),
    (b"upgrade", b"WebSocket"),
    (b"connection", b"keep-alive, Upgrade"),
    (b"sec-websocket-version", b"13"),
    (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="),
    (b"sec-websocket-protocol", b"chat.v1.msgpack, chat.v1.json"),
    (b"authorization", b"Bearer t"),
]


def test_accept_key_is_the_rfc_example() -> None:
    assert ws.accept_key(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    response = ws.accept_response(b"dGhlIHNhbXBsZSBub25jZQ==", "chat.v1.json")
    assert response.startswith(b"HTTP/1.1 101 ")
    assert b"\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in response
    assert b"\r\nSec-WebSocket-Protocol: chat.v1.json\r\n" in response
    assert response.endswith(b"\r\n\r\n")
    assert b"Sec-WebSocket-Protocol" not in ws.accept_response(b"dGhlIHNhbXBsZSBub25jZQ==", None)


def test_a_good_upgrade_is_read() -> None:
    up = ws.check_upgrade("GET", GOOD)
    assert up.key == b"dGhlIHNhbXBsZSBub25jZQ=="
    assert up.subprotocols == ("chat.v1.msgpack", "chat.v1.json")
    assert up.authorization == "Bearer t"


@pytest.mark.parametrize(
    ("method", "change", "status"),
    [
        ("POST", {}, 405),
        ("GET", {b"upgrade": b"h2c"}, 400),
        ("GET", {b"connection": b"keep-alive"}, 400),
        ("GET", {b"sec-websocket-version": b"8"}, 426),
        ("GET", {b"sec-websocket-key": None}, 400),
        ("GET", {b"sec-websocket-key": b"short"}, 400),
        ("GET", {b"sec-websocket-key": b"!!!not base64 at all!!!!"}, 400),
        ("GET", {b"authorization": b"Bearer " + b"x" * 9000}, 400),
    ],
)
def test_a_bad_upgrade_gets_a_status(
    method: str, change: dict[bytes, bytes | None], status: int
) -> None:
    headers = [(k, change.get(k, v)) for k, v in GOOD if change.get(k, v) is not None]
    with pytest.raises(HandshakeError) as info:
        ws.check_upgrade(method, headers)  # type: ignore[arg-type]
    assert info.value.status == status
    if status == 426:
        assert ("Sec-WebSocket-Version", "13") in info.value.headers


def test_two_keys_are_refused() -> None:
    with pytest.raises(HandshakeError):
        ws.check_upgrade("GET", [*GOOD, (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ==")])


def test_http_response_is_well_formed() -> None:
    raw = ws.http_response(503, "draining; retry later\n", (("Retry-After", "1"),))
    head, body = raw.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 503 Service Unavailable"
    assert b"Retry-After: 1" in lines and b"Connection: close" in lines
    assert f"Content-Length: {len(body)}".encode() in lines


# -- frames the server writes -------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 125, 126, 65535, 65536, 70000])
def test_server_frames_have_the_shortest_length_encoding(n: int) -> None:
    payload = bytes(range(256)) * (n // 256) + bytes(range(n % 256))
    frame = ws.build_frame(OP_BINARY, payload)
    assert frame[0] == 0x82  # FIN + binary, no RSV
    assert not frame[1] & 0x80  # server frames are never masked
    head = 2 if n < 126 else 4 if n < 65536 else 10
    assert frame[head:] == payload
    assert len(frame) == head + n


def test_close_frames_carry_code_and_a_bounded_utf8_reason() -> None:
    frame = ws.close_frame(4009, "slow consumer")
    assert frame[:2] == b"\x88\x0f" and frame[2:4] == (4009).to_bytes(2, "big")
    long = ws.close_frame(1000, "é" * 100)  # 200 bytes of UTF-8: cut to 123, on a boundary
    assert long[1] <= 125
    long[4:].decode()  # still valid UTF-8
    assert ws.parse_close((1001).to_bytes(2, "big") + b"bye") == (1001, "bye")
    assert ws.parse_close(b"") == (ws.NO_STATUS, "")
    for good in (1000, 1003, 1007, 1011, 1012, 1013, 1014, 3000, 4999):
        assert ws.parse_close(good.to_bytes(2, "big")) == (good, "")
    for code in (999, 1004, 1005, 1006, 1015, 1016, 2999, 5000):
        with pytest.raises(WebSocketError):
            ws.parse_close(code.to_bytes(2, "big"))
    for bad in (b"\x03", (999).to_bytes(2, "big"), (1005).to_bytes(2, "big")):
        with pytest.raises(WebSocketError) as info:
            ws.parse_close(bad)
        assert info.value.code == 1002
    with pytest.raises(WebSocketError) as info:
        ws.parse_close((1000).to_bytes(2, "big") + b"\xff")
    assert info.value.code == 1007


# -- frames the server reads --------------------------------------------------------------------
def test_frames_are_read_whole_or_in_pieces() -> None:
    data = (
        client_frame(OP_TEXT, b'{"t":"ping"}')
        + client_frame(OP_BINARY, b"\x81\xa1t\xa4ping")
        + client_frame(OP_PING, b"hb")
        + client_frame(OP_TEXT, "é".encode() * 200)  # 16-bit length
    )
    expected = [
        (OP_TEXT, '{"t":"ping"}'),
        (OP_BINARY, b"\x81\xa1t\xa4ping"),
        (OP_PING, b"hb"),
        (OP_TEXT, "é" * 200),
    ]
    assert FrameReader(1 << 16).feed(data) == expected
    reader = FrameReader(1 << 16)
    got = []
    for i in range(len(data)):  # one byte at a time
        got += reader.feed(data[i : i + 1])
    assert got == expected and reader.buffered == 0


def test_fragments_are_joined_with_control_frames_between() -> None:
    word = "żółw".encode()  # split inside a character across fragments
    data = (
        client_frame(OP_TEXT, word[:3], fin=False)
        + client_frame(OP_PING, b"")
        + client_frame(OP_CONT, word[3:6], fin=False)
        + client_frame(OP_CONT, word[6:])
    )
    assert FrameReader(1 << 16).feed(data) == [(OP_PING, b""), (OP_TEXT, "żółw")]


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (client_frame(OP_TEXT, b"x", mask=False), 1002),
        (client_frame(OP_TEXT, b"x", rsv=0x40), 1002),
        (client_frame(0x3, b"x"), 1002),
        (client_frame(0xB, b"x"), 1002),
        (client_frame(OP_CONT, b"x"), 1002),
        (client_frame(OP_PING, b"x" * 126), 1002),
        (client_frame(OP_PONG, b"x", fin=False), 1002),
        (client_frame(OP_TEXT, b"a", fin=False) + client_frame(OP_TEXT, b"b"), 1002),
        (client_frame(OP_TEXT, b"\xff\xfe"), 1007),
        (client_frame(OP_TEXT, b"\xc3", fin=False) + client_frame(OP_CONT, b"("), 1007),
    ],
)
def test_protocol_violations_close_with_their_code(data: bytes, code: int) -> None:
    fails(data, code)


def test_a_frame_too_large_is_refused_from_its_header() -> None:
    # Only the header has arrived: refused before any payload is buffered.
    header = bytes((0x81, 0x80 | 127)) + (1 << 40).to_bytes(8, "big") + b"mask"
    fails(header, 1009)
    fails(client_frame(OP_BINARY, b"x" * 1025), 1009, max_size=1024)
    assert FrameReader(1024).feed(client_frame(OP_BINARY, b"x" * 1024)) == [
        (OP_BINARY, b"x" * 1024)
    ]
    # Fragments that are small one by one but too large together.
    pieces = client_frame(OP_BINARY, b"x" * 600, fin=False) + client_frame(OP_CONT, b"x" * 600)
    fails(pieces, 1009, max_size=1024)


def test_close_frame_is_returned_for_the_transport() -> None:
    payload = (1000).to_bytes(2, "big") + b"done"
    assert FrameReader(1024).feed(client_frame(OP_CLOSE, payload)) == [(OP_CLOSE, payload)]


@settings(max_examples=200, deadline=None)
@given(
    messages=st.lists(
        st.one_of(
            st.tuples(st.just(OP_TEXT), st.text(max_size=300)),
            st.tuples(st.just(OP_BINARY), st.binary(max_size=300)),
        ),
        max_size=8,
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=5000), max_size=10),
    fragment=st.integers(min_value=1, max_value=64),
)
def test_any_messages_split_anywhere_come_back_the_same(
    messages: list[tuple[int, str | bytes]], cuts: list[int], fragment: int
) -> None:
    data = b""
    for op, body in messages:
        raw = body.encode() if isinstance(body, str) else body
        parts = [raw[i : i + fragment] for i in range(0, len(raw), fragment)] or [b""]
        for i, part in enumerate(parts):
            data += client_frame(op if i == 0 else OP_CONT, part, fin=i == len(parts) - 1)
    reader = FrameReader(1 << 16)
    got = []
    last = 0
    for cut in [*sorted(c for c in cuts if c < len(data)), len(data)]:
        got += reader.feed(data[last:cut])
        last = cut
    assert got == messages


@given(st.binary(max_size=200), st.binary(min_size=4, max_size=4))
def test_the_pure_mask_matches_the_c_one(data: bytes, mask: bytes) -> None:
    expected = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    assert ws.apply_mask(data, mask) == expected
    saved, ws._apply_mask_c = ws._apply_mask_c, None
    try:
        assert ws.apply_mask(data, mask) == expected
    finally:
        ws._apply_mask_c = saved


def test_messages_before_a_violation_are_returned_then_nothing_more() -> None:
    reader = FrameReader(1 << 16)
    good = client_frame(OP_TEXT, b'{"t":"ping","rid":1}') + client_frame(OP_TEXT, b"x")
    out = reader.feed(good + client_frame(OP_TEXT, b"y", mask=False) + client_frame(OP_TEXT, b"z"))
    assert out == [(OP_TEXT, '{"t":"ping","rid":1}'), (OP_TEXT, "x")]
    assert reader.failure is not None and reader.failure.code == 1002
    with pytest.raises(WebSocketError):
        reader.feed(client_frame(OP_TEXT, b"after"))


def test_a_message_in_too_many_fragments_is_refused_at_the_first_one_over() -> None:
    reader = FrameReader(1 << 16, max_fragments=4)
    whole = client_frame(OP_TEXT, b"a", fin=False) + b"".join(
        client_frame(OP_CONT, b"b", fin=i == 2) for i in range(3)
    )
    assert reader.feed(whole) == [(OP_TEXT, "abbb")]  # exactly 4 pieces: fine
    over = client_frame(OP_TEXT, b"", fin=False) + client_frame(OP_CONT, b"", fin=False) * 10
    with pytest.raises(WebSocketError) as info:
        reader.feed(over)
    assert info.value.code == 1009 and "4 fragments" in info.value.reason


def test_every_frame_is_counted_whole_or_not() -> None:
    reader = FrameReader(1 << 16)
    data = (
        client_frame(OP_TEXT, b"x", fin=False)
        + client_frame(OP_PING, b"")
        + client_frame(OP_CONT, b"y", fin=False)
        + client_frame(OP_PONG, b"")
    )
    last = client_frame(OP_CONT, b"z")
    events = reader.feed(data + last[:3])
    assert [op for op, _ in events] == [OP_PING, OP_PONG]
    assert reader.frames == 4  # two fragments of an unfinished message and two controls
    assert reader.feed(last[3:]) == [(OP_TEXT, "xyz")]
    assert reader.frames == 5  # the last piece, counted once it is whole
