"""storage.metrics (the registry and worker endpoint) and the gateway's counters."""

from __future__ import annotations

import asyncio
import re
import time

import pytest

from gateway.connection import Connection, WireCounters
from gateway.metrics import GatewayMetrics
from gateway.protocol import codec, frames
from storage.metrics import Registry, serve


def parse(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}, checking every line is well-formed."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) [a-z_]+ .+$", line), line
            continue
        m = re.match(r'^([a-z_]+(?:\{(?:[a-z_]+="(?:[^"\\]|\\.)*",?)*\})?) (\S+)$', line)
        assert m, line
        out[m.group(1)] = float(m.group(2))
    return out


def test_counters_gauges_and_const_labels_render() -> None:
    r = Registry({"role": "test"})
    c = r.counter("agora_things_total", "Things.", ["kind"])
    c.labels("a").inc()
    c.labels("a").inc(2)
    c.labels('we"ird\\').inc()
    g = r.gauge("agora_level", "Level.")
    g.set(7.5)
    g.dec(0.5)
    got = parse(r.render())
    assert got['agora_things_total{role="test",kind="a"}'] == 3
    assert got['agora_things_total{role="test",kind="we\\"ird\\\\"}'] == 1
    assert got['agora_level{role="test"}'] == 7
    with pytest.raises(ValueError):
        c.labels("a").inc(-1)
    with pytest.raises(ValueError):
        r.counter("agora_things_total", "again")
    with pytest.raises(ValueError):
        r.counter("agora_bad", "a counter must end in _total")
    with pytest.raises(ValueError):
        c.labels("a", "b")


def test_histogram_buckets_are_cumulative() -> None:
    r = Registry()
    h = r.histogram("agora_wait_seconds", "Wait.", buckets=(0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    got = parse(r.render())
    assert got['agora_wait_seconds_bucket{le="0.1"}'] == 2  # le is inclusive
    assert got['agora_wait_seconds_bucket{le="1"}'] == 3
    assert got['agora_wait_seconds_bucket{le="+Inf"}'] == 4
    assert got["agora_wait_seconds_count"] == 4
    assert got["agora_wait_seconds_sum"] == pytest.approx(3.65)


def test_callbacks_are_read_at_scrape_time_and_a_broken_one_is_skipped() -> None:
    r = Registry()
    box = {"n": 1}
    r.callback("agora_box_total", "Box.", "counter", lambda: box["n"])
    r.callback("agora_by_total", "By.", "counter", lambda: {("x",): 2.0}, ["k"])
    r.callback("agora_broken", "Broken.", "gauge", lambda: 1 / 0)
    box["n"] = 5
    got = parse(r.render())
    assert got["agora_box_total"] == 5
    assert got['agora_by_total{k="x"}'] == 2
    assert not any(k.startswith("agora_broken") for k in got)


async def test_worker_endpoint_serves_metrics_and_404s_the_rest() -> None:
    r = Registry({"role": "fanout"})
    r.counter("agora_batches_total", "Batches.").inc(3)
    server = await serve(r, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    async def get(path: str, method: str = "GET") -> tuple[str, str]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = await reader.read()
        writer.close()
        head, _, body = data.decode().partition("\r\n\r\n")
        return head.splitlines()[0], body

    try:
        status, body = await get("/metrics")
        assert status == "HTTP/1.1 200 OK"
        assert parse(body)['agora_batches_total{role="fanout"}'] == 3
        assert (await get("/nope"))[0].startswith("HTTP/1.1 404")
        assert (await get("/metrics", "POST"))[0].startswith("HTTP/1.1 405")
    finally:
        server.close()
        await server.wait_closed()


# -- the gateway's counters ------------------------------------------------------------------


class _Socket:
    """What a connection's transport link records (no I/O: the counting is under test)."""

    def __init__(self) -> None:
        self.paused = False
        self.idle = 0
        self.written: list[bytes] = []
        self.closes: list[int] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def buffered(self) -> int:
        return 0

    def ping(self) -> None:
        pass

    def send_close(self, code: int, reason: str) -> None:
        self.closes.append(code)


async def test_gateway_metrics_count_frames_closes_and_latency() -> None:
    registry = Registry()
    m = GatewayMetrics(registry)
    wire = {False: WireCounters(), True: WireCounters()}
    m.bind_wire(wire)
    msg = frames.msg(1, 2, 3, "a", "hi", int(time.time() * 1000) - 250, "c", "text")
    shared = codec.JSON.frame(msg)
    a = Connection(_Socket(), codec.JSON, "a", 10, 1 << 20, wire[False])
    b = Connection(_Socket(), codec.JSON, "b", 10, 1 << 20, wire[False])
    c = Connection(_Socket(), codec.MSGPACK, "c", 10, 1 << 20, wire[True])
    for conn in (a, b):
        conn.push(shared)
    a.push_frame({"t": "pong", "rid": 1})
    c.push(codec.MSGPACK.frame(msg))
    wire[False].frames_in += 1
    m.count_close(4009)
    m.count_close(1000)
    m.latency.labels().observe(0.25, 3)  # one message written to three sockets at once
    got = parse(registry.render())
    assert got['agora_frames_out_total{encoding="json"}'] == 3
    assert got['agora_frames_out_total{encoding="msgpack"}'] == 1
    assert got['agora_ws_bytes_out_total{encoding="json"}'] == 2 * len(shared) + len(
        a.link.written[-1]  # type: ignore[attr-defined]
    )
    assert got['agora_frames_in_total{encoding="json"}'] == 1
    assert got["agora_slow_consumer_closes_total"] == 1
    assert got['agora_ws_closes_total{code="4009"}'] == 1
    assert got['agora_ws_closes_total{code="1000"}'] == 1
    assert got["agora_delivery_latency_seconds_count"] == 3
    assert got['agora_delivery_latency_seconds_bucket{le="0.1"}'] == 0
    assert got['agora_delivery_latency_seconds_bucket{le="1"}'] == 3
    assert abs(got["agora_delivery_latency_seconds_sum"] - 0.75) < 1e-9


async def test_a_connection_past_its_limits_while_paused_is_closed_4009() -> None:
    sock = _Socket()
    conn = Connection(sock, codec.JSON, "a", 3, 1 << 20)
    frame = codec.JSON.frame({"t": "pong", "rid": 1})
    for _ in range(5):
        conn.push(frame)  # not paused: written, however many
    sock.paused = True
    for _ in range(3):
        conn.push(frame)  # paused: counted, up to the limit
    assert sock.closes == [] and len(sock.written) == 8
    conn.resumed()  # drained: count afresh
    for _ in range(3):
        conn.push(frame)
    assert sock.closes == []
    conn.push(frame)  # the fourth while paused
    assert sock.closes == [4009] and conn.close_code == 4009
    conn.push(frame)  # nothing after the close
    assert len(sock.written) == 11 and conn.is_gone
