"""core.metrics (the process registry, its collectors, the worker endpoint) and the
gateway's counters."""

from __future__ import annotations

import asyncio
import re
import time

import pytest
from prometheus_client import Counter, Gauge
from prometheus_client.exposition import choose_encoder
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from core.metrics import ProcessRegistry, ReadAtScrape, WeightedHistogram, serve
from gateway.connection import Connection, WireCounters
from gateway.metrics import GatewayMetrics
from gateway.protocol import codec, frames


def parse(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}, checking every line is well-formed.
    (prometheus_client writes a sample's labels sorted by name.)"""
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
    r = ProcessRegistry({"role": "test"}, runtime=False)
    c = Counter("agora_things_total", "Things.", ["kind"], registry=r)
    c.labels("a").inc()
    c.labels("a").inc(2)
    c.labels('we"ird\\').inc()
    g = Gauge("agora_level", "Level.", registry=r)
    g.set(7.5)
    g.dec(0.5)
    got = parse(r.render())
    assert got['agora_things_total{kind="a",role="test"}'] == 3
    assert got['agora_things_total{kind="we\\"ird\\\\",role="test"}'] == 1
    assert got['agora_level{role="test"}'] == 7
    assert not any("_created" in k for k in got)  # one series per counter, as before
    with pytest.raises(ValueError):
        c.labels("a").inc(-1)
    with pytest.raises(ValueError):
        Counter("agora_things_total", "again", registry=r)
    with pytest.raises(ValueError):
        c.labels("a", "b")


def test_every_process_reports_its_runtime_under_its_own_labels() -> None:
    # Two registries in one process: each has its own process/GC collectors, nothing global.
    a = parse(ProcessRegistry({"role": "fanout", "node": "n1"}).render())
    b = parse(ProcessRegistry({"role": "scores"}).render())
    assert a['process_cpu_seconds_total{node="n1",role="fanout"}'] >= 0
    assert a['process_open_fds{node="n1",role="fanout"}'] >= 1
    assert 'python_gc_collections_total{generation="2",node="n1",role="fanout"}' in a
    assert any(k.startswith("python_info{") and 'node="n1",' in k for k in a)
    assert b['process_resident_memory_bytes{role="scores"}'] > 0
    assert not any("n1" in k for k in b)


def test_weighted_histogram_buckets_are_cumulative_and_weighted() -> None:
    r = ProcessRegistry(runtime=False)
    h = WeightedHistogram(r, "agora_wait_seconds", "Wait.", buckets=(0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    h.observe(0.5, 10)  # one message written to ten sockets
    got = parse(r.render())
    assert got['agora_wait_seconds_bucket{le="0.1"}'] == 2  # le is inclusive
    assert got['agora_wait_seconds_bucket{le="1.0"}'] == 13
    assert got['agora_wait_seconds_bucket{le="+Inf"}'] == 14
    assert got["agora_wait_seconds_count"] == 14 == h.count
    assert got["agora_wait_seconds_sum"] == pytest.approx(3.65 + 5.0)
    with pytest.raises(ValueError):
        WeightedHistogram(r, "agora_wait_seconds", "again")
    with pytest.raises(ValueError):
        WeightedHistogram(r, "agora_nothing_seconds", "No finite bucket.", buckets=())


def test_values_read_at_scrape_time_and_a_broken_one_is_skipped() -> None:
    r = ProcessRegistry(runtime=False)
    box = {"n": 1}
    ReadAtScrape(r, "agora_box_total", "Box.", "counter", lambda: box["n"])
    ReadAtScrape(r, "agora_by_total", "By.", "counter", lambda: {("x",): 2.0}, ["k"])
    ReadAtScrape(r, "agora_broken", "Broken.", "gauge", lambda: 1 / 0)
    box["n"] = 5
    got = parse(r.render())
    assert got["agora_box_total"] == 5
    assert got['agora_by_total{k="x"}'] == 2
    assert not any(k.startswith("agora_broken") for k in got)
    with pytest.raises(ValueError):
        ReadAtScrape(r, "agora_box_total", "again", "counter", lambda: 1)
    with pytest.raises(ValueError):
        ReadAtScrape(r, "agora_bad", "a counter must end in _total", "counter", lambda: 1)


async def test_worker_endpoint_serves_metrics_and_healthz_and_404s_the_rest() -> None:
    r = ProcessRegistry({"role": "fanout"})
    Counter("agora_batches_total", "Batches.", registry=r).inc(3)
    server = serve(r, "127.0.0.1", 0)

    async def get(path: str, method: str = "GET") -> tuple[str, str, str]:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        head, _, body = data.decode().partition("\r\n\r\n")
        return head.splitlines()[0], head.lower(), body

    try:
        status, head, body = await get("/metrics")
        assert status == "HTTP/1.0 200 OK"
        assert "content-type: text/plain; version=0.0.4" in head
        got = parse(body)
        assert got['agora_batches_total{role="fanout"}'] == 3
        assert got['process_cpu_seconds_total{role="fanout"}'] >= 0
        status, _, body = await get("/healthz")
        assert status == "HTTP/1.0 200 OK" and body == "ok\n"
        assert (await get("/nope"))[0].startswith("HTTP/1.0 404")
        assert (await get("/metrics", "POST"))[0].startswith("HTTP/1.0 405")
        assert (await get("/healthz", "POST"))[0].startswith("HTTP/1.0 405")
    finally:
        await asyncio.to_thread(server.close)
    with pytest.raises(OSError):  # closed: the port is free and nothing answers
        await get("/healthz")


def test_openmetrics_when_the_scraper_asks_for_it() -> None:
    # Prometheus asks for OpenMetrics first; every collector must survive that encoder too.
    r = ProcessRegistry({"role": "gateway", "node": "n1"})
    m = GatewayMetrics(r)
    m.latency.observe(0.02, 4)
    m.count_close(4009)
    encode, content_type = choose_encoder("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    families = {f.name: f for f in text_string_to_metric_families(encode(r).decode())}
    latency = families["agora_delivery_latency_seconds"]
    count = next(s for s in latency.samples if s.name.endswith("_count"))
    assert count.value == 4 and count.labels == {"node": "n1", "role": "gateway"}
    assert families["agora_slow_consumer_closes"].type == "counter"
    assert "process_cpu_seconds" in families
    assert choose_encoder("")[1] == "text/plain; version=0.0.4; charset=utf-8"


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
    registry = ProcessRegistry(runtime=False)
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
    m.latency.observe(0.25, 3)  # one message written to three sockets at once
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
    assert got['agora_delivery_latency_seconds_bucket{le="1.0"}'] == 3
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
