"""RFC 6455 for the server side, sans I/O: the upgrade check, frame parsing, frame building.

Like the `websockets` library's core, nothing here touches a socket: `FrameReader.feed`
takes bytes and returns whole messages and control frames; the builders return bytes.
`gateway.transport` does the I/O. Written for the gateway's traffic (small frames, many
connections): a reader holds no buffer between frames, a whole frame in one read is parsed
without copying it twice, and a server frame is built once and its bytes written to every
recipient (server frames are not masked, so they are the same for all of them).
Extensions (permessage-deflate) are not negotiated: compression would triple the memory
of an idle connection.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from websockets.utils import apply_mask as _apply_mask_public

_apply_mask_c: Callable[[bytes, bytes], bytes] | None
try:
    # The C mask of the websockets library (what its own frames.py uses when built). Its
    # public `websockets.utils.apply_mask` is pure Python: measured 8x slower on a 64-byte
    # frame and 75x on 64 KiB, and every client frame is masked, so the C one is used when
    # present and the public one otherwise (docs/architecture.md, the transport).
    from websockets.speedups import apply_mask as _apply_mask_c
except ImportError:  # pragma: no cover - a websockets built without its extension
    _apply_mask_c = None

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONT = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA
_DATA_OPS = (OP_TEXT, OP_BINARY)
_CONTROL_OPS = (OP_CLOSE, OP_PING, OP_PONG)

# Close codes of RFC 6455 the transport itself uses.
PROTOCOL_ERROR = 1002
INVALID_DATA = 1007
MESSAGE_TOO_BIG = 1009
NO_STATUS = 1005  # "no code in the close frame"; never sent on the wire
MAX_HEADER_LINE = 8190  # per header of an upgrade, as the websockets library allows


class WebSocketError(Exception):
    """The peer broke RFC 6455: close the connection with `code`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


# -- the opening handshake --------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class HandshakeError(Exception):
    """An upgrade request that cannot be accepted: answer with this HTTP status."""

    status: int
    message: str
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Upgrade:
    key: bytes
    subprotocols: tuple[str, ...]
    authorization: str | None


def check_upgrade(method: str, headers: Sequence[tuple[bytes, bytes]]) -> Upgrade:
    """Validate an upgrade request (header names lower-case, as ASGI servers give them)."""
    if method != "GET":
        raise HandshakeError(405, "a WebSocket upgrade must be a GET", (("Allow", "GET"),))
    connection: list[bytes] = []
    upgrade = version = key = authorization = None
    protocols: list[str] = []
    for name, value in headers:
        if len(name) + len(value) > MAX_HEADER_LINE:
            raise HandshakeError(400, "handshake header too large")
        if name == b"connection":
            connection.extend(t.strip().lower() for t in value.split(b","))
        elif name == b"upgrade":
            upgrade = value.strip().lower()
        elif name == b"sec-websocket-version":
            version = value.strip()
        elif name == b"sec-websocket-key":
            if key is not None:
                raise HandshakeError(400, "more than one Sec-WebSocket-Key")
            key = value.strip()
        elif name == b"sec-websocket-protocol":
            protocols.extend(p.strip() for p in value.decode("latin-1").split(",") if p.strip())
        elif name == b"authorization":
            authorization = value.decode("latin-1")
    if upgrade != b"websocket" or b"upgrade" not in connection:
        raise HandshakeError(400, "not a WebSocket upgrade (Connection/Upgrade headers)")
    if version != b"13":
        raise HandshakeError(
            426, "Sec-WebSocket-Version must be 13", (("Sec-WebSocket-Version", "13"),)
        )
    if key is None:
        raise HandshakeError(400, "missing Sec-WebSocket-Key")
    try:
        raw = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 16:
        raise HandshakeError(400, "Sec-WebSocket-Key is not 16 bytes in base64")
    return Upgrade(key, tuple(protocols), authorization)


def accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def accept_response(key: bytes, subprotocol: str | None) -> bytes:
    """The 101 response (status line and headers) for a checked request."""
    lines = [
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n",
        b"Sec-WebSocket-Accept: " + accept_key(key) + b"\r\n",
    ]
    if subprotocol is not None:
        lines.append(b"Sec-WebSocket-Protocol: " + subprotocol.encode("latin-1") + b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


def http_response(
    status: int, text: str, headers: Sequence[tuple[str, str]] = (), close: bool = True
) -> bytes:
    """A small plain-text HTTP/1.1 response (a refused or malformed upgrade)."""
    body = text.encode()
    head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}"]
    head.append("Content-Type: text/plain; charset=utf-8")
    head.append(f"Content-Length: {len(body)}")
    head.extend(f"{k}: {v}" for k, v in headers)
    if close:
        head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


_REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    426: "Upgrade Required",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


# -- frames the server writes -----------------------------------------------------------------
def build_frame(opcode: int, payload: bytes) -> bytes:
    """One unfragmented, unmasked frame: the same bytes for every recipient."""
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 65536:
        return bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big") + payload
    return bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big") + payload


def close_frame(code: int, reason: str = "") -> bytes:
    # A control frame carries at most 125 bytes: 2 for the code, 123 for the reason.
    data = reason.encode()[:123]
    while data:
        try:
            data.decode()
            break
        except UnicodeDecodeError:  # cut inside a character: drop its first bytes
            data = data[:-1]
    return build_frame(OP_CLOSE, code.to_bytes(2, "big") + data)


PING = build_frame(OP_PING, b"")


def parse_close(payload: bytes) -> tuple[int, str]:
    """The code and reason of a close frame the peer sent (RFC 6455 5.5.1, 7.4)."""
    if not payload:
        return NO_STATUS, ""
    if len(payload) == 1:
        raise WebSocketError(PROTOCOL_ERROR, "close frame of one byte")
    code = int.from_bytes(payload[:2], "big")
    # Sendable codes: RFC 6455 7.4.1 and IANA's 1012-1014; 1004-1006 and 1015 never are.
    if not (1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code < 5000):
        raise WebSocketError(PROTOCOL_ERROR, f"invalid close code {code}")
    try:
        reason = payload[2:].decode()
    except UnicodeDecodeError:
        raise WebSocketError(INVALID_DATA, "close reason is not UTF-8") from None
    return code, reason


# -- frames the server reads ------------------------------------------------------------------
def apply_mask(data: bytes, mask: bytes) -> bytes:
    if _apply_mask_c is not None:
        out: bytes = _apply_mask_c(data, mask)
        return out
    return _apply_mask_public(data, mask)


class FrameReader:
    """Parses client frames. `feed(data)` returns `(opcode, payload)` for every whole data
    message (fragments joined; text already checked to be UTF-8 and returned as str) and
    every control frame, in order; raises WebSocketError when the peer breaks the protocol.

    Memory is bounded by `max_size`: a frame or fragmented message announcing more is
    refused (1009) from its header, before its payload is buffered; and by
    `max_fragments`: a message in more pieces is refused (1009) at the first one too many
    (empty fragments cost the reader memory and time but no bytes of `max_size`).
    `frames` counts every frame parsed, of every kind, for the caller's rate limit.
    """

    __slots__ = (
        "_buf",
        "_frag_op",
        "_frag_size",
        "_frags",
        "failure",
        "frames",
        "max_fragments",
        "max_size",
    )

    def __init__(self, max_size: int, max_fragments: int = 1024) -> None:
        self._buf = b""
        self.max_size = max_size
        self.max_fragments = max_fragments
        self.frames = 0
        self._frag_op = 0  # opcode of a fragmented message in progress (0: none)
        self._frags: list[bytes] = []
        self._frag_size = 0
        self.failure: WebSocketError | None = None

    def feed(self, data: bytes) -> list[tuple[int, bytes | str]]:
        """The whole messages in `data` (and what was buffered). When the peer breaks the
        protocol after some whole messages, those are returned first and `failure` is set
        (the caller handles them, then closes); with none before it, the error is raised.
        Nothing more is parsed after a failure."""
        if self.failure is not None:
            raise self.failure
        out: list[tuple[int, bytes | str]] = []
        try:
            self._parse(self._buf + data if self._buf else data, out)
        except WebSocketError as exc:
            self.failure = exc
            self._buf = b""
            if not out:
                raise
        return out

    def _parse(self, buf: bytes, out: list[tuple[int, bytes | str]]) -> None:
        pos, n = 0, len(buf)
        while n - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            if b0 & 0x70:
                raise WebSocketError(PROTOCOL_ERROR, "reserved bits set (no extension agreed)")
            if not b1 & 0x80:
                raise WebSocketError(PROTOCOL_ERROR, "client frames must be masked")
            op = b0 & 0x0F
            length = b1 & 0x7F
            head = pos + 2
            if length == 126:
                if n - head < 2:
                    break
                length = int.from_bytes(buf[head : head + 2], "big")
                head += 2
            elif length == 127:
                if n - head < 8:
                    break
                length = int.from_bytes(buf[head : head + 8], "big")
                head += 8
            if op >= 8:
                if op not in _CONTROL_OPS:
                    raise WebSocketError(PROTOCOL_ERROR, f"unknown opcode {op}")
                if not b0 & 0x80 or length > 125:
                    raise WebSocketError(PROTOCOL_ERROR, "control frames are short and whole")
            elif op not in _DATA_OPS and op != OP_CONT:
                raise WebSocketError(PROTOCOL_ERROR, f"unknown opcode {op}")
            elif length + self._frag_size > self.max_size:
                raise WebSocketError(MESSAGE_TOO_BIG, f"frame larger than {self.max_size} bytes")
            end = head + 4 + length
            if n < end:
                break
            payload = apply_mask(buf[head + 4 : end], buf[head : head + 4]) if length else b""
            pos = end
            self.frames += 1
            if op >= 8:
                out.append((op, payload))
                continue
            fin = b0 & 0x80
            if op == OP_CONT:
                if not self._frag_op:
                    raise WebSocketError(PROTOCOL_ERROR, "continuation without a message")
                if len(self._frags) >= self.max_fragments:
                    raise WebSocketError(
                        MESSAGE_TOO_BIG, f"message in more than {self.max_fragments} fragments"
                    )
                self._frags.append(payload)
                self._frag_size += length
                if not fin:
                    continue
                op, payload = self._frag_op, b"".join(self._frags)
                self._frag_op, self._frags, self._frag_size = 0, [], 0
            elif self._frag_op:
                raise WebSocketError(PROTOCOL_ERROR, "new message inside a fragmented one")
            elif not fin:
                self._frag_op, self._frags, self._frag_size = op, [payload], length
                continue
            if op == OP_TEXT:
                try:
                    out.append((op, payload.decode()))
                except UnicodeDecodeError:
                    raise WebSocketError(INVALID_DATA, "text frame is not UTF-8") from None
            else:
                out.append((op, payload))
        self._buf = buf[pos:] if pos < n else b""

    @property
    def buffered(self) -> int:
        return len(self._buf) + self._frag_size
