"""The two encodings of the wire protocol, chosen per connection by subprotocol.

JSON travels in text frames, MessagePack in binary frames, with the same keys. A frame of
the wrong kind (binary on a JSON connection) is a protocol violation.
"""

from __future__ import annotations

from typing import Any, Protocol

import msgpack
import orjson

from gateway.protocol.frames import ProtocolViolation
from gateway.protocol.websocket import OP_BINARY, OP_TEXT, build_frame

JSON_SUBPROTOCOL = "chat.v1.json"
MSGPACK_SUBPROTOCOL = "chat.v1.msgpack"
MAX_DEPTH = 32  # nesting deeper than any valid frame needs is refused before it costs much


class Codec(Protocol):
    name: str
    binary: bool

    def decode(self, data: bytes | str) -> Any: ...

    def encode(self, frame: dict[str, Any]) -> bytes | str: ...

    def frame(self, frame: dict[str, Any]) -> bytes: ...


def _depth_ok(obj: Any, limit: int = MAX_DEPTH) -> bool:
    if type(obj) is dict and limit >= 1:
        # Every request frame but a few is a flat object: one pass over its values, no
        # stack (this check is a few percent of a send's gateway CPU otherwise).
        for v in obj.values():
            if isinstance(v, dict | list):
                break
        else:
            return True
    stack = [(obj, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return False
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return True


class JsonCodec:
    name = JSON_SUBPROTOCOL
    binary = False

    def decode(self, data: bytes | str) -> Any:
        if not isinstance(data, str):
            raise ProtocolViolation("binary frame on a JSON connection")
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise ProtocolViolation("frame is not valid JSON") from None
        if not _depth_ok(obj):
            raise ProtocolViolation("frame is nested too deeply")
        return obj

    def encode(self, frame: dict[str, Any]) -> str:
        # The payload as str, as a text frame carries it (frame() skips this decode).
        return orjson.dumps(frame).decode()

    def frame(self, frame: dict[str, Any]) -> bytes:
        """The whole WebSocket text frame, ready for every recipient's socket."""
        return build_frame(OP_TEXT, orjson.dumps(frame))


class MsgpackCodec:
    name = MSGPACK_SUBPROTOCOL
    binary = True

    def decode(self, data: bytes | str) -> Any:
        if not isinstance(data, bytes):
            raise ProtocolViolation("text frame on a MessagePack connection")
        try:
            # Limits stop a tiny frame from announcing a huge container.
            obj = msgpack.unpackb(
                data,
                raw=False,
                strict_map_key=True,
                max_array_len=1024,
                max_map_len=64,
                max_str_len=len(data),
                max_bin_len=len(data),
            )
        except Exception:  # msgpack raises several unrelated types for bad input
            raise ProtocolViolation("frame is not valid MessagePack") from None
        if not _depth_ok(obj):
            raise ProtocolViolation("frame is nested too deeply")
        return obj

    def encode(self, frame: dict[str, Any]) -> bytes:
        out: bytes = msgpack.packb(frame)
        return out

    def frame(self, frame: dict[str, Any]) -> bytes:
        """The whole WebSocket binary frame, ready for every recipient's socket."""
        return build_frame(OP_BINARY, self.encode(frame))


JSON = JsonCodec()
MSGPACK = MsgpackCodec()


def choose(offered: list[str]) -> tuple[Codec, str | None]:
    """The codec for the offered subprotocols, and the one to echo (None: none offered)."""
    for name in offered:
        if name == MSGPACK_SUBPROTOCOL:
            return MSGPACK, name
        if name == JSON_SUBPROTOCOL:
            return JSON, name
    return JSON, None
