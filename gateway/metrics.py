"""The gateway's metrics: what crosses the WebSocket boundary, measured at the ASGI edge.

`WireMetrics` wraps the whole app as plain ASGI middleware and sees every frame a socket
receives and every frame, close and refusal the app sends. Measuring there, rather than
inside the connection and node code, keeps the hot paths free of metric calls and counts
exactly what reached (or left) the socket layer. Counters the other modules already keep
(acked sends, deliveries, refusals by reason, loop lag) are read at scrape time.

End-to-end latency is `now - ts` of each `msg` frame when it is handed to the socket, per
recipient: `ts` is set by the gateway that accepted the message, so this covers Kafka, the
fan-out worker, the database write, Redis pub/sub and the recipient's outbound queue.
A node encodes a message once and hands the same object to every subscriber, so its `ts`
is parsed once per node (an identity cache), not once per recipient.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from typing import Any

import msgpack
import orjson
from starlette.applications import Starlette
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.protocol.frames import CloseCode
from storage import logs
from storage.metrics import Registry

_JSON_MSG = '{"t":"msg"'
_MSGPACK_MSG = b"\x89\xa1t\xa3msg"  # a 9-key map whose first entry is t: "msg"
_TS_CACHE = 256


class GatewayMetrics:
    def __init__(self, registry: Registry) -> None:
        r = self.registry = registry
        self.ws_opened = r.counter("agora_ws_opened_total", "WebSocket connections accepted.")
        self.frames_in = r.counter(
            "agora_frames_in_total", "Frames received from clients.", ["encoding"]
        )
        self.frames_out = r.counter(
            "agora_frames_out_total", "Frames written to clients.", ["encoding"]
        )
        self.bytes_in = r.counter(
            "agora_ws_bytes_in_total",
            "Payload size received (characters of JSON text).",
            ["encoding"],
        )
        self.bytes_out = r.counter(
            "agora_ws_bytes_out_total",
            "Payload size written (characters of JSON text).",
            ["encoding"],
        )
        self.closes = r.counter(
            "agora_ws_closes_total", "Connections closed by the server, by close code.", ["code"]
        )
        self.slow_consumer = r.counter(
            "agora_slow_consumer_closes_total",
            "Connections closed with 4009 because they did not read fast enough.",
        )
        self.denials = r.counter(
            "agora_ws_denied_total",
            "Upgrades answered with an HTTP status instead (503/429 refusals).",
            ["status"],
        )
        self.http = r.counter(
            "agora_http_responses_total", "HTTP responses, by status class.", ["class"]
        )
        self.latency = r.histogram(
            "agora_delivery_latency_seconds",
            "Server-side end-to-end latency of a message: its accept ts to the socket write.",
        )

    def bind(self, app: Starlette) -> None:
        """Read, at scrape time, the counters other modules keep on app.state."""
        state = app.state
        r = self.registry
        r.callback(
            "agora_connections",
            "Open WebSocket connections.",
            "gauge",
            lambda: len(state.node.connections),
        )
        r.callback(
            "agora_acked_sends_total",
            "Sends acknowledged after Kafka accepted them.",
            "counter",
            lambda: state.send_path.acked,
        )
        r.callback(
            "agora_deliveries_total",
            "Frames pushed to local subscribers' queues.",
            "counter",
            lambda: state.node.deliveries,
        )
        r.callback(
            "agora_refused_upgrades_total",
            "Upgrades refused by admission control, by reason.",
            "counter",
            lambda: {(k,): float(v) for k, v in state.admission.refused.items()},
            ["reason"],
        )
        r.callback(
            "agora_loop_lag_ms",
            "Event-loop lag as measured by admission control.",
            "gauge",
            lambda: state.admission.lag_ms,
        )
        r.callback(
            "agora_handshakes_in_progress",
            "WebSocket handshakes being processed.",
            "gauge",
            lambda: state.admission.handshakes,
        )


def _encoding(scope: Scope) -> str:
    offered = scope.get("subprotocols") or []
    for name in offered:
        if name in ("chat.v1.msgpack", "chat.v1.json"):
            return "msgpack" if name.endswith("msgpack") else "json"
    return "json"


class _TsCache:
    """ts of recently seen msg frames, by object identity (holding the object, so its id
    cannot be reused while cached)."""

    def __init__(self) -> None:
        self._items: OrderedDict[int, tuple[object, int | None]] = OrderedDict()

    def ts_of(self, data: str | bytes) -> int | None:
        if isinstance(data, str):
            if not data.startswith(_JSON_MSG):
                return None
        elif not data.startswith(_MSGPACK_MSG):
            return None
        key = id(data)
        hit = self._items.get(key)
        if hit is not None and hit[0] is data:
            return hit[1]
        ts = _parse_ts(data)
        self._items[key] = (data, ts)
        if len(self._items) > _TS_CACHE:
            self._items.popitem(last=False)
        return ts


def _parse_ts(data: str | bytes) -> int | None:
    try:
        frame: Any = orjson.loads(data) if isinstance(data, str) else msgpack.unpackb(data)
    except Exception:
        return None
    ts = frame.get("ts") if isinstance(frame, dict) else None
    return ts if type(ts) is int else None


class WireMetrics:
    """ASGI middleware counting frames, closes, refusals, HTTP statuses and latency."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.m = metrics
        self._ts = _TsCache()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        counted = self.m.http

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                counted.labels(f"{message['status'] // 100}xx").inc()
            await send(message)

        await self.app(scope, receive, send_counted)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        m = self.m
        enc = _encoding(scope)
        frames_in, bytes_in = m.frames_in.labels(enc), m.bytes_in.labels(enc)
        frames_out, bytes_out = m.frames_out.labels(enc), m.bytes_out.labels(enc)
        latency = m.latency.labels()
        ts_of = self._ts.ts_of
        # The id every log line of this connection carries (its tasks inherit the context).
        logs.bind_connection(secrets.token_hex(4))

        async def receive_counted() -> Message:
            message = await receive()
            if message["type"] == "websocket.receive":
                data = message.get("text")
                if data is None:
                    data = message.get("bytes") or b""
                frames_in.inc()
                bytes_in.inc(len(data))
            return message

        async def send_counted(message: Message) -> None:
            kind = message["type"]
            if kind == "websocket.send":
                data = message.get("text")
                if data is None:
                    data = message.get("bytes") or b""
                ts = ts_of(data)
                await send(message)
                frames_out.inc()
                bytes_out.inc(len(data))
                if ts is not None:
                    latency.observe(max(0.0, time.time() - ts / 1000))
                return
            if kind == "websocket.accept":
                m.ws_opened.inc()
            elif kind == "websocket.close":
                code = int(message.get("code", 1000))
                m.closes.labels(str(code)).inc()
                if code == CloseCode.SLOW_CONSUMER:
                    m.slow_consumer.inc()
            elif kind == "websocket.http.response.start":
                m.denials.labels(str(message.get("status", 0))).inc()
            await send(message)

        await self.app(scope, receive_counted, send_counted)
