"""Where bytes meet the gateway: uvicorn serves HTTP, and an upgrade to `/v1/ws` is taken
over here by a small asyncio protocol per connection.

Why not the ASGI WebSocket stack: profiled (bench/RESULTS.md), every frame went through
uvicorn's protocol, Starlette's WebSocket and a writer task per connection, and every
connection held the objects of all three. Here one `WebSocketLink` per connection turns
bytes into messages with the sans-I/O `gateway.protocol.websocket` and writes frames
straight to its transport; the session logic (admission, authentication, requests) is in
`gateway.ws`, the connection's state in `gateway.connection`.

The close handshake follows RFC 6455: whoever closes first sends a close frame; the other
side answers with one; the server then closes TCP. After sending ours we keep reading
(discarding) until the peer's answer arrives, at most CLOSE_TIMEOUT_S: closing the socket
with unread data in it would reset the connection and could destroy our close frame
before the client read it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

import httptools
from uvicorn.middleware.proxy_headers import _TrustedHosts
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from gateway.protocol import websocket as wsp
from gateway.protocol.websocket import OP_CLOSE, OP_PING, OP_PONG, WebSocketError

if TYPE_CHECKING:
    from gateway.connection import Connection
    from gateway.ws import Endpoint

log = logging.getLogger("agora.gateway")

WS_PATH = "/v1/ws"
# A reader that resumes within this still learns why it was closed (its close frame was
# behind unread data); one that never reads is cut off after it.
CLOSE_TIMEOUT_S = 10.0
# Past this many bytes waiting in a socket's buffer the transport pauses us and every
# further frame counts towards the connection's slow-consumer limits.
WRITE_HIGH_WATER = 64 * 1024
MAX_REQUEST_HEAD = 64 * 1024  # URL + headers of any HTTP request
# Bytes kept from a client before its session opens (hello sent, routing registered);
# past it, reading pauses until then.
EARLY_MAX = 256 * 1024


class _HeadTooLarge(Exception):
    pass


@functools.cache
def _trusted_hosts(allowed: str | tuple[str, ...]) -> _TrustedHosts:
    return _TrustedHosts(allowed if isinstance(allowed, str) else list(allowed))


class GatewayHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with bounds on the request head (its size, and the
    time it may take to arrive), and WebSocket upgrades handed to our endpoint instead of
    an ASGI WebSocket protocol.

    uvicorn times out only an idle keep-alive connection; a client that opens a socket
    and sends nothing, or a head one byte at a time (slowloris), would hold its socket
    and buffers forever. Here a head must be complete within AGORA_REQUEST_HEAD_TIMEOUT_S
    of the connection (or of its first byte on a kept-alive one), or it gets 408.
    """

    endpoint: ClassVar[Endpoint]
    _head_timer: asyncio.TimerHandle | None = None

    @classmethod
    def bound_to(cls, endpoint: Endpoint) -> type[GatewayHttpProtocol]:
        return type("BoundGatewayHttpProtocol", (cls,), {"endpoint": endpoint})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_head_timer()

    def _start_head_timer(self) -> None:
        if self._head_timer is None:
            seconds = self.endpoint.settings.request_head_timeout_s
            self._head_timer = self.loop.call_later(seconds, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.write(wsp.http_response(408, "request head took too long\n"))
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        self._head_bytes = 0
        self._start_head_timer()
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._stop_head_timer()
        super().on_headers_complete()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        super().on_header(name, value)

    def _count(self, n: int) -> None:
        # Raised inside a parser callback, this becomes uvicorn's prompt 400; without it a
        # client could stream headers forever into our memory.
        self._head_bytes += n
        if self._head_bytes > MAX_REQUEST_HEAD:
            raise _HeadTooLarge

    def _client(self) -> tuple[str, int] | None:
        """The client's address: the socket's peer, or, when that peer is a trusted proxy
        (uvicorn's `forwarded_allow_ips`, FORWARDED_ALLOW_IPS), the client it forwarded,
        as uvicorn's proxy-headers middleware does for HTTP requests (per-IP limits must
        see the real client behind a load balancer)."""
        client = self.client
        if client is None or not self.config.proxy_headers:
            return client
        allowed = self.config.forwarded_allow_ips
        trusted = _trusted_hosts(allowed if isinstance(allowed, str) else tuple(allowed))
        if client[0] not in trusted:
            return client
        for name, value in self.headers:
            if name == b"x-forwarded-for":
                host, port = trusted.get_trusted_client_address(value.decode("latin-1"))
                if host:
                    return (host, port)
        return client

    def _should_upgrade_to_ws(self) -> bool:
        return True

    def handle_websocket_upgrade(self) -> None:  # pragma: no cover - data_received's job
        self._upgrade(b"")

    def data_received(self, data: bytes) -> None:
        # uvicorn's, but keeping the bytes that follow the upgrade request's head.
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.send_400_response("Invalid HTTP request received.")
        except httptools.HttpParserUpgrade as exc:
            if self._should_upgrade():
                self._upgrade(data[exc.args[0] :] if exc.args else b"")
            else:
                self._unsupported_upgrade_warning()

    def _upgrade(self, rest: bytes) -> None:
        self._stop_head_timer()
        self.connections.discard(self)
        transport = self.transport
        try:
            url = httptools.parse_url(self.url)
        except httptools.HttpParserError:  # CONNECT host:port and other non-path targets
            transport.write(wsp.http_response(400, "request target is not a path\n"))
            transport.close()
            return
        path = (url.path or b"").decode("latin-1")
        if path != WS_PATH:
            transport.write(wsp.http_response(404, f"no WebSocket at {path}\n"))
            transport.close()
            return
        try:
            upgrade = wsp.check_upgrade(self.scope["method"], self.headers)
        except wsp.HandshakeError as exc:
            transport.write(wsp.http_response(exc.status, exc.message + "\n", exc.headers))
            transport.close()
            return
        link = WebSocketLink(self.endpoint, transport)
        transport.set_protocol(link)
        self.endpoint.links.add(link)
        try:
            self.endpoint.upgrade(link, self._client(), url.query or b"", upgrade)
        except Exception:  # a bug of ours: this client is cut off, the node goes on
            log.exception("WebSocket upgrade failed")
            transport.abort()
            return
        if rest:
            link.data_received(rest)


class WebSocketLink(asyncio.Protocol):
    """One upgraded connection's socket: frames in, frames out, the close handshake and
    flow control. `gateway.connection.Link` is what the session sees of it."""

    __slots__ = (
        "_counted",
        "_early",
        "_head",
        "_held",
        "_timer",
        "broken",
        "buffered",
        "closing",
        "conn",
        "endpoint",
        "idle",
        "lost",
        "paused",
        "reader",
        "ready",
        "transport",
        "write",
    )

    def __init__(self, endpoint: Endpoint, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.endpoint = endpoint
        self.reader = wsp.FrameReader(endpoint.max_frame_bytes, endpoint.max_fragments)
        self._counted = 0  # frames of `reader` already charged to the session's budget
        self.conn: Connection | None = None  # set once authenticated (before registration)
        self.ready = False  # registered and greeted: requests are handled from here on
        self.paused = False
        self.closing = False  # our close frame is written (or the peer's answered)
        self.broken = False  # the peer broke the protocol: nothing more is parsed
        self.lost = False
        self.idle = 0  # heartbeat rounds since the peer last sent anything
        self._early: list[bytes] | None = None  # bytes that came before the session opened
        self._held = False  # reading paused until the session opens (EARLY_MAX reached)
        self._head: bytes | None = None  # the 101 response, until the first frame goes out
        self._timer: asyncio.TimerHandle | None = None
        # The transport's own method, not one of ours calling it: a large room's delivery
        # calls this once per socket, and a Python frame per call is measurable there.
        self.write: Callable[[bytes], None] = transport.write
        self.buffered: Callable[[], int] = transport.get_write_buffer_size
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    # -- the session's side ------------------------------------------------------------------
    def accept(self, subprotocol: str | None, key: bytes) -> None:
        """Accept the upgrade. The 101 response goes out with the first frame (`hello`,
        or the close frame of a refused session), in one write: one system call per
        connection less (~5 % of a connection storm's gateway CPU, bench/RESULTS.md issue
        14, "Connects"). The client can send nothing before the 101 anyway, and `hello`
        is only sent once the session is registered and counted (gateway/ws.py)."""
        self._head = wsp.accept_response(key, subprotocol)
        self.write = self._send  # until the 101 has gone out with the first frame

    def _send(self, data: bytes) -> None:
        head = self._head
        if head is not None:
            self._head = None
            self.write = self.transport.write  # the 101 is out: frames go straight
            data = head + data
        self.transport.write(data)

    def refuse(self, status: int, text: str, headers: tuple[tuple[str, str], ...]) -> None:
        """Answer the upgrade with an HTTP status instead (nothing was accepted)."""
        self.closing = self.broken = True
        self.transport.write(wsp.http_response(status, text, headers))
        self.transport.close()

    def opened(self) -> None:
        """The session is ready for requests (after `hello`): parse what arrived meanwhile."""
        self.ready = True
        self._release_early()

    def _release_early(self) -> None:
        early, self._early = self._early, None
        if early and not (self.lost or self.broken):
            self.data_received(b"".join(early))
        if self._held and not self.lost:
            self._held = False
            self.transport.resume_reading()

    def ping(self) -> None:
        if not (self.closing or self.lost):
            self._send(wsp.PING)

    def send_close(self, code: int, reason: str) -> None:
        if self.closing or self.lost:
            return
        self.closing = True
        self.endpoint.closed_by_server(code)
        self._send(wsp.close_frame(code, reason))
        self._abort_later()
        # Closed before the session opened (4001, 1013): what the client sent meanwhile is
        # parsed only to find its close frame in it.
        self._release_early()

    def _abort_later(self) -> None:
        """Whatever happens next, the socket is gone within CLOSE_TIMEOUT_S (a peer that
        stops reading would otherwise hold it, and its unsent buffer, forever)."""
        if self._timer is None and not self.lost:
            self._timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT_S, self._abort)

    def _abort(self) -> None:
        self.transport.abort()

    # -- asyncio.Protocol --------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self.idle = 0
        if self.broken:
            return
        conn = self.conn
        if not self.ready and not self.closing:
            # Still authenticating/registering: keep it (bounded) for when the session opens.
            if self._early is None:
                self._early = []
            self._early.append(data)
            if sum(map(len, self._early)) > EARLY_MAX and not self._held:
                # Enough waiting: let TCP push back on the client until the session opens.
                self._held = True
                self.transport.pause_reading()
            return
        try:
            events = self.reader.feed(data)
        except WebSocketError as exc:
            self.broken = True
            self._fail(exc)
            return
        endpoint = self.endpoint
        # Every frame counts against the budget: the events below are charged one by one
        # (data messages by `message`), the frames that are not events (fragments of a
        # message, whole or not yet) here, in bulk.
        fragments = self.reader.frames - self._counted - len(events)
        self._counted = self.reader.frames
        if fragments and conn is not None and not self.closing:
            endpoint.charge(conn, fragments)
        for op, payload in events:
            if op == OP_CLOSE:
                self._close_received(payload)
                return
            if self.closing or conn is None:
                continue  # after our close frame, only the peer's close matters
            if op == OP_PING:
                # Not while the peer is not reading (RFC 6455 5.5.3 lets us answer only the
                # latest ping): pongs must not grow the buffer past the outbound limits.
                if endpoint.charge(conn, 1) and not self.paused:
                    self._send(wsp.build_frame(OP_PONG, payload))  # type: ignore[arg-type]
            elif op == OP_PONG:
                endpoint.charge(conn, 1)
            else:
                endpoint.message(conn, payload)
        failure = self.reader.failure
        if failure is not None and not self.broken:
            # Broken after some whole messages: those were handled (in order), now close.
            self.broken = True
            self._fail(failure)

    def _fail(self, exc: WebSocketError) -> None:
        """The peer broke the protocol: nothing it sends can be parsed any more, its close
        frame included. Close frame, then our half of TCP (RFC 6455 7.1.7); the peer reads
        both and closes its half; we discard what it sends meanwhile, so our socket never
        holds unread data at close (which would reset the connection)."""
        if self.conn is not None:
            self.conn.close(exc.code, exc.reason)
        else:
            self.send_close(exc.code, exc.reason)
        if not self.lost and self.transport.can_write_eof():
            self.transport.write_eof()

    def _close_received(self, payload: bytes | str) -> None:
        try:
            code, _reason = wsp.parse_close(payload)  # type: ignore[arg-type]
            reply = 1000 if code == wsp.NO_STATUS else code
        except WebSocketError as exc:
            reply = exc.code
        if not self.closing:
            # The peer closes: answer with its code, and we are done with the session.
            self.closing = True
            self._send(wsp.close_frame(reply))
            if self.conn is not None:
                self.conn.lost()
        self.transport.close()  # the server closes TCP first (RFC 6455 7.1.1)
        self._abort_later()  # close() waits for the buffer to drain: not forever

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.conn is not None:
            self.conn.resumed()

    def eof_received(self) -> bool | None:
        # A half-closed peer is gone: the session ends, the transport closes once what is
        # buffered is written (bounded by the abort timer).
        if self.conn is not None:
            self.conn.lost()
        self._abort_later()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._early = None
        if self._timer is not None:
            self._timer.cancel()
        conn, self.conn = self.conn, None  # no cycle left for the GC to find
        if conn is not None:
            conn.lost()
        self.endpoint.forget(self)
