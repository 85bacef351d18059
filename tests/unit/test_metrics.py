"""storage.metrics (the registry and worker endpoint) and gateway.metrics (the ASGI edge)."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import msgpack
import orjson
import pytest

from gateway.metrics import GatewayMetrics, WireMetrics
from gateway.protocol import frames
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


# -- the ASGI edge --------------------------------------------------------------------------


def _app_script(frames_out: list[str | bytes], close_code: int) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        for data in frames_out:
            key = "bytes" if isinstance(data, bytes) else "text"
            await send({"type": "websocket.send", key: data})
        await receive()  # one client frame
        await send({"type": "websocket.close", "code": close_code})

    return app


async def _drive(middleware: WireMetrics, subprotocol: str) -> None:
    inbound = [
        {"type": "websocket.connect"},
        {"type": "websocket.receive", "text": '{"t":"ping"}'},
    ]

    async def receive() -> dict[str, Any]:
        return inbound.pop(0)

    async def send(message: dict[str, Any]) -> None:
        pass

    scope = {"type": "websocket", "subprotocols": [subprotocol], "path": "/v1/ws"}
    await middleware(scope, receive, send)


async def test_wire_metrics_count_frames_latency_and_slow_consumer_closes() -> None:
    registry = Registry()
    m = GatewayMetrics(registry)
    ts = int(time.time() * 1000) - 250  # accepted 250 ms ago
    msg = frames.msg(1, 2, 3, "a", "hi", ts, "c", "text")
    shared = orjson.dumps(msg).decode()
    out: list[str | bytes] = [shared, shared, '{"t":"pong"}']
    await _drive(WireMetrics(_app_script(out, 4009), m), "chat.v1.json")
    packed = msgpack.packb(msg)
    await _drive(WireMetrics(_app_script([packed], 1000), m), "chat.v1.msgpack")
    got = parse(registry.render())
    assert got['agora_frames_out_total{encoding="json"}'] == 3
    assert got['agora_frames_out_total{encoding="msgpack"}'] == 1
    assert got['agora_frames_in_total{encoding="json"}'] == 1
    assert got["agora_slow_consumer_closes_total"] == 1
    assert got['agora_ws_closes_total{code="4009"}'] == 1
    assert got["agora_ws_opened_total"] == 2
    # Two json recipients of the shared bytes and one msgpack one: three observations,
    # each about 250 ms (not 0: the ts was parsed; not the pong: only msg frames count).
    assert got["agora_delivery_latency_seconds_count"] == 3
    assert got['agora_delivery_latency_seconds_bucket{le="0.1"}'] == 0
    assert got['agora_delivery_latency_seconds_bucket{le="1"}'] == 3
