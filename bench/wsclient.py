"""A lean WebSocket client for load generation (RFC 6455 over asyncio.Protocol).

The full client (`agora_client`, on python-websockets) costs tens of microseconds per frame
and a task per connection; one load-generator core could then not open 20,000 connections
quickly nor read 50,000 frames/s. This one is a single Protocol object per connection: it
writes the upgrade request, checks the 101, parses server frames in `data_received`,
answers pings, and hands each text/binary frame to `on_frame`. JSON subprotocol only.
Server frames are never masked; client frames always are (RFC 6455 5.3).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import socket
import struct
import time
from typing import Any, cast

import orjson

try:
    from websockets.speedups import apply_mask as _apply_mask  # C, when built
except ImportError:  # pragma: no cover - pure-Python fallback

    def _apply_mask(data: bytes | bytearray | memoryview, mask: bytes | bytearray) -> bytes:
        n = len(data)
        key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
        return (int.from_bytes(data, "big") ^ key).to_bytes(n, "big")


_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10


class HandshakeError(Exception):
    def __init__(self, status: int, retry_after: str | None) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.retry_after = retry_after


class ClosedBeforeHello(Exception):
    def __init__(self, code: int | None) -> None:
        super().__init__(f"closed before hello ({code})")
        self.code = code


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """One final, masked client frame."""
    n = len(payload)
    mask = os.urandom(4)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    return head + mask + _apply_mask(payload, mask)


class WsClient(asyncio.Protocol):
    """One connection. Subclasses override `on_frame` (and `on_closed`)."""

    __slots__ = (
        "_buf",
        "_frag",
        "_frag_op",
        "_key",
        "_request",
        "close_code",
        "closed",
        "hello",
        "opened",
        "t_hello",
        "t_start",
        "transport",
        "upgraded",
    )

    def __init__(self, host: str, port: int, token: str, path: str = "/v1/ws") -> None:
        key = base64.b64encode(os.urandom(16))
        self._key = key
        self._request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: {key.decode()}\r\n"
            "Sec-WebSocket-Protocol: chat.v1.json\r\n"
            f"Authorization: Bearer {token}\r\n\r\n"
        ).encode()
        self._buf = bytearray()
        self._frag = bytearray()
        self._frag_op = 0
        self.transport: asyncio.Transport | None = None
        self.upgraded = False
        self.hello: dict[str, Any] | None = None
        self.opened: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.closed = False
        self.close_code: int | None = None
        self.t_start = 0.0
        self.t_hello = 0.0

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > 65536:
                    self._fail(HandshakeError(0, None))
                return
            head = bytes(buf[:end]).decode("latin-1")
            del buf[: end + 4]
            lines = head.split("\r\n")
            parts = lines[0].split(" ", 2)
            status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if status != 101:
                self._fail(HandshakeError(status, headers.get("retry-after")))
                return
            accept = base64.b64encode(hashlib.sha1(self._key + _GUID).digest()).decode()
            if headers.get("sec-websocket-accept") != accept:
                self._fail(HandshakeError(101, None))
                return
            self.upgraded = True
        self._parse()

    def _parse(self) -> None:
        buf = self._buf
        pos = 0
        size = len(buf)
        while size - pos >= 2:
            b0 = buf[pos]
            n = buf[pos + 1] & 0x7F
            head = 2
            if n == 126:
                if size - pos < 4:
                    break
                n = (buf[pos + 2] << 8) | buf[pos + 3]
                head = 4
            elif n == 127:
                if size - pos < 10:
                    break
                n = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                head = 10
            if size - pos < head + n:
                break
            payload = bytes(buf[pos + head : pos + head + n])
            pos += head + n
            opcode = b0 & 0x0F
            if opcode in (OP_TEXT, OP_BINARY):
                if b0 & 0x80:
                    self._frame(payload)
                else:
                    self._frag_op = opcode
                    self._frag = bytearray(payload)
            elif opcode == OP_CONT:
                self._frag += payload
                if b0 & 0x80:
                    self._frame(bytes(self._frag))
                    self._frag = bytearray()
            elif opcode == OP_PING:
                if self.transport is not None and not self.transport.is_closing():
                    self.transport.write(encode_frame(OP_PONG, payload))
            elif opcode == OP_CLOSE:
                self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                if self.transport is not None and not self.transport.is_closing():
                    self.transport.write(encode_frame(OP_CLOSE, payload[:2]))
                    self.transport.close()
        if pos:
            del buf[:pos]

    def _frame(self, payload: bytes) -> None:
        if self.hello is None:
            frame = orjson.loads(payload)
            if frame.get("t") == "hello":
                self.hello = frame
                self.t_hello = time.monotonic()
                if not self.opened.done():
                    self.opened.set_result(frame)
                return
        self.on_frame(payload)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.opened.done():
            self.opened.set_exception(
                ClosedBeforeHello(self.close_code if self.upgraded else None)
                if exc is None or self.upgraded
                else exc
            )
        if self.close_code is None:
            self.close_code = 1006
        self.on_closed()

    def _fail(self, exc: Exception) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    # -- for subclasses and callers -------------------------------------------------------------
    def on_frame(self, payload: bytes) -> None:
        """A text frame after hello (raw JSON bytes)."""

    def on_closed(self) -> None:
        """The connection is gone (close_code says how)."""

    def send_json(self, frame: dict[str, Any]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(encode_frame(OP_TEXT, orjson.dumps(frame)))

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    @property
    def is_open(self) -> bool:
        return self.upgraded and not self.closed


async def open_client(
    client: WsClient, host: str, port: int, source_ip: str | None, timeout: float
) -> dict[str, Any]:
    """Connect `client` from `source_ip` (a 127.0.0.x) and wait for its `hello` frame."""
    loop = asyncio.get_running_loop()
    client.t_start = time.monotonic()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if source_ip:
            # Defer the port choice to connect(): the 4-tuple, not the port, must be unique.
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source_ip, 0))
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, (host, port))
            await loop.create_connection(lambda: client, sock=sock)
            return await client.opened
    except BaseException:
        if client.transport is not None:
            client.transport.abort()
        else:
            sock.close()
        raise
