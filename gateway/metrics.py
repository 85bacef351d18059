"""The gateway's metrics.

Counters the other modules keep anyway (frames and bytes per encoding in
`connection.WireCounters`, acked sends, deliveries, refusals by reason, loop lag) are read
at scrape time, so the per-frame paths pay one integer increment, not a metric call.
Closes, denied upgrades and HTTP statuses are counted where they happen; `WireMetrics`
is the ASGI middleware that counts HTTP statuses.

End-to-end latency is `now - ts` of a live `msg` frame when it is written to its
subscribers' sockets: `ts` is set by the gateway that accepted the message, so this covers
Kafka, the fan-out worker, the database write and Redis pub/sub. A node writes a message
to all its subscribers in one call, so it observes once, counted once per recipient.
Messages replayed on `sub` with `since` are not observed: their age is not latency.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter
from starlette.applications import Starlette
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.metrics import LabelValues, ProcessRegistry, ReadAtScrape, WeightedHistogram
from gateway.connection import WireCounters
from gateway.protocol.frames import CloseCode

_WIRE = (
    ("agora_frames_in_total", "Frames received from clients.", "frames_in"),
    ("agora_frames_out_total", "Frames written to clients.", "frames_out"),
    ("agora_ws_bytes_in_total", "Payload received (JSON chars, msgpack bytes).", "bytes_in"),
    ("agora_ws_bytes_out_total", "Bytes written, frame headers included.", "bytes_out"),
)


class GatewayMetrics:
    def __init__(self, registry: ProcessRegistry) -> None:
        r = self.registry = registry
        self.ws_opened = Counter(
            "agora_ws_opened_total", "WebSocket connections accepted.", registry=r
        )
        self.closes = Counter(
            "agora_ws_closes_total",
            "Connections closed by the server, by close code.",
            ["code"],
            registry=r,
        )
        self.slow_consumer = Counter(
            "agora_slow_consumer_closes_total",
            "Connections closed with 4009 because they did not read fast enough.",
            registry=r,
        )
        self.denials = Counter(
            "agora_ws_denied_total",
            "Upgrades answered with an HTTP status instead (503/429 refusals).",
            ["status"],
            registry=r,
        )
        self.http = Counter(
            "agora_http_responses_total", "HTTP responses, by status class.", ["class"], registry=r
        )
        self.latency = WeightedHistogram(
            r,
            "agora_delivery_latency_seconds",
            "Server-side end-to-end latency of a live message: accept ts to the socket write.",
        )

    def count_close(self, code: int) -> None:
        self.closes.labels(str(code)).inc()
        if code == CloseCode.SLOW_CONSUMER:
            self.slow_consumer.inc()

    def bind_wire(self, wire: dict[bool, WireCounters]) -> None:
        """Read the frame counters the connections keep by encoding (keyed by
        codec.binary) at scrape time."""
        r = self.registry
        for name, doc, attr in _WIRE:

            def by_encoding(attr: str = attr) -> dict[LabelValues, float]:
                return {
                    ("json",): float(getattr(wire[False], attr)),
                    ("msgpack",): float(getattr(wire[True], attr)),
                }

            ReadAtScrape(r, name, doc, "counter", by_encoding, ["encoding"])

    def bind(self, app: Starlette) -> None:
        """Read, at scrape time, the counters other modules keep on app.state."""
        state = app.state
        r = self.registry
        ReadAtScrape(
            r,
            "agora_connections",
            "Open WebSocket connections.",
            "gauge",
            lambda: len(state.node.connections),
        )
        ReadAtScrape(
            r,
            "agora_acked_sends_total",
            "Sends acknowledged after Kafka accepted them.",
            "counter",
            lambda: state.send_path.acked,
        )
        ReadAtScrape(
            r,
            "agora_sends_from_shard_total",
            "Sends answered with the id of a copy stored earlier that Redis no longer knew "
            "(a retry after the idempotency window or after Redis lost records).",
            "counter",
            lambda: state.send_path.from_shard,
        )
        ReadAtScrape(
            r,
            "agora_sends_settled_total",
            "Sends that waited for their copy to be stored before answering (Redis lost "
            "its data recently: gateway/idempotency.py).",
            "counter",
            lambda: state.send_path.settled,
        )
        ReadAtScrape(
            r,
            "agora_pg_held_connects_total",
            "Connections made for the send path's shard reads, held between reads (one per "
            "shard at first; more when one broke and was made again).",
            "counter",
            lambda: state.send_path.pools.held_connects,
        )
        ReadAtScrape(
            r,
            "agora_produce_line_records_total",
            "Records given to the send path's own produce line (gateway/produceline.py).",
            "counter",
            lambda: _line_count(state, "records"),
        )
        ReadAtScrape(
            r,
            "agora_produce_line_requests_total",
            "Produce requests the line sent (records / requests: the batch size).",
            "counter",
            lambda: _line_count(state, "requests"),
        )
        ReadAtScrape(
            r,
            "agora_produce_line_handed_over_total",
            "Records the line handed to aiokafka's producer after a failed request.",
            "counter",
            lambda: _line_count(state, "handed_over"),
        )
        ReadAtScrape(
            r,
            "agora_deliveries_total",
            "Frames written to local subscribers' sockets.",
            "counter",
            lambda: state.node.deliveries,
        )
        ReadAtScrape(
            r,
            "agora_refused_upgrades_total",
            "Upgrades refused by admission control, by reason.",
            "counter",
            lambda: {(k,): float(v) for k, v in state.admission.refused.items()},
            ["reason"],
        )
        ReadAtScrape(
            r,
            "agora_loop_lag_ms",
            "Event-loop lag as measured by admission control.",
            "gauge",
            lambda: state.admission.lag_ms,
        )
        ReadAtScrape(
            r,
            "agora_handshakes_in_progress",
            "WebSocket handshakes being processed.",
            "gauge",
            lambda: state.admission.handshakes,
        )
        ReadAtScrape(
            r,
            "agora_feed_page_hits_total",
            "Feed first pages served from this gateway's page cache.",
            "counter",
            lambda: state.feed_pages.hits,
        )
        ReadAtScrape(
            r,
            "agora_feed_page_fetches_total",
            "Feed first pages fetched (cache misses and stale pages).",
            "counter",
            lambda: state.feed_pages.fetches,
        )


class WireMetrics:
    """ASGI middleware counting HTTP responses by status class."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.m = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
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


def _line_count(state: Any, attr: str) -> int:
    """A counter of the send path's produce line; 0 where there is none (turned off, TLS or
    SASL: every record goes through aiokafka)."""
    line = state.send_path.produce_line
    return int(getattr(line, attr)) if line is not None else 0
