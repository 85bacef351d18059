"""Operations on real processes: metrics on every process, JSON logs, the dev token
endpoint (on and off), the served browser client and demo app."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from websockets.exceptions import InvalidStatus

from agora_client import AgoraClient
from core.settings import Settings
from tests.engines import free_port
from tests.integration.helpers import collect, create_group, uid
from tests.stack import LOG_DIR, Proc, Stack
from tests.unit.test_metrics import parse

pytestmark = pytest.mark.engines


class Ops:
    def __init__(self, settings: Settings) -> None:
        self.fanout_port = free_port()
        self.scores_port = free_port()
        dev = {"AGORA_DEV_TOKENS": "true", "AGORA_LOG_FORMAT": "json"}
        self.stack = Stack(settings, extra_env=dev)
        # One Stack per worker kind: each gets its own metrics port.
        self.fanout_stack = Stack(settings, extra_env={"AGORA_METRICS_PORT": str(self.fanout_port)})
        self.scores_stack = Stack(settings, extra_env={"AGORA_METRICS_PORT": str(self.scores_port)})
        # Dev tokens off (the default) and room for one connection: refusals are counted.
        self.plain_stack = Stack(settings, extra_env={"AGORA_MAX_CONNECTIONS": "1"})
        self.g1 = self.stack.gateway(f"ops-g1-{uid('x')}")
        self.g2 = self.stack.gateway(f"ops-g2-{uid('x')}")
        self.plain = self.plain_stack.gateway(f"ops-plain-{uid('x')}")
        self.fanout_stack.fanout("ops-f")
        self.scores_stack.scores("ops-s")

    def stop(self) -> None:
        for s in (self.stack, self.fanout_stack, self.scores_stack, self.plain_stack):
            s.stop_all()


@pytest.fixture(scope="module")
def ops(settings: Settings) -> Iterator[Ops]:
    o = Ops(settings)
    try:
        yield o
    finally:
        o.stop()


async def scrape(url: str) -> dict[str, float]:
    async with httpx.AsyncClient(timeout=5) as http:
        r = await http.get(url)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(r.text)


def total(metrics: dict[str, float], name: str) -> float:
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


async def test_dev_token_endpoint_exists_only_when_switched_on(ops: Ops) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        r = await http.post(f"{ops.g1.http_url}/v1/dev/token", json={"user": "dev-ann"})
        assert r.status_code == 200, r.text
        token = r.json()["token"]
        me = await http.get(
            f"{ops.g2.http_url}/v1/me", headers={"Authorization": f"Bearer {token}"}
        )
        assert me.json()["id"] == "dev-ann"  # signed with the secret every node verifies
        bad = await http.post(f"{ops.g1.http_url}/v1/dev/token", json={"user": "no spaces"})
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "bad_request"
        off = await http.post(f"{ops.plain.http_url}/v1/dev/token", json={"user": "dev-ann"})
        assert off.status_code == 404 and off.json()["error"]["code"] == "not_found"
        doc_on = (await http.get(f"{ops.g1.http_url}/openapi.json")).json()
        doc_off = (await http.get(f"{ops.plain.http_url}/openapi.json")).json()
        assert "/v1/dev/token" in doc_on["paths"]
        assert "/v1/dev/token" not in doc_off["paths"]


async def test_browser_client_and_demo_app_are_served(ops: Ops) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        page = await http.get(f"{ops.plain.http_url}/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert '<script type="module" src="/static/app.js">' in page.text
        js = await http.get(f"{ops.plain.http_url}/static/agora.js")
        assert js.status_code == 200
        assert "javascript" in js.headers["content-type"]
        assert "export class AgoraClient" in js.text
        again = await http.get(
            f"{ops.plain.http_url}/static/agora.js", headers={"If-None-Match": js.headers["etag"]}
        )
        assert again.status_code == 304
        missing = await http.get(f"{ops.plain.http_url}/static/nope.js")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


async def test_every_process_serves_metrics_that_move_with_traffic(ops: Ops) -> None:
    stack = ops.stack
    a, b = uid("ma"), uid("mb")
    async with httpx.AsyncClient(timeout=20) as http:
        conv = await create_group(http, stack, ops.g1, a, [b])
        sender = await AgoraClient.connect(ops.g1.ws_url, stack.token(a))
        reader = await AgoraClient.connect(ops.g2.ws_url, stack.token(b), "msgpack")
        await reader.sub(conv)
        before = await scrape(f"{ops.g2.http_url}/metrics")
        n = 20
        for i in range(n):
            await sender.send(conv, f"m{i}", cid=f"m{i}")
        got = await collect(reader, conv, n, 20)
        assert len(got) == n
        # A vote goes through the scores worker.
        hdr = {"Authorization": f"Bearer {stack.token(a)}"}
        post = await http.post(
            f"{ops.g1.http_url}/v1/posts",
            json={"title": "metrics", "body": "", "community": "ops"},
            headers=hdr,
        )
        assert post.status_code == 201, post.text
        vote = await http.put(
            f"{ops.g1.http_url}/v1/posts/{post.json()['id']}/vote", json={"value": 1}, headers=hdr
        )
        assert vote.status_code == 200, vote.text
        for _ in range(3):  # first pages: fetched, then served from the page cache
            feed = await http.get(f"{ops.g1.http_url}/v1/feeds/new?community=ops", headers=hdr)
            assert feed.status_code == 200, feed.text

    g1 = await scrape(f"{ops.g1.http_url}/metrics")
    pages = total(g1, "agora_feed_page_hits_total") + total(g1, "agora_feed_page_fetches_total")
    assert total(g1, "agora_feed_page_fetches_total") >= 1 and pages >= 3
    g2 = await scrape(f"{ops.g2.http_url}/metrics")
    node2 = reader.hello["node"]
    print({k: v for k, v in g2.items() if "bucket" not in k})
    assert total(g1, "agora_acked_sends_total") >= n
    # The sends' shard reads on the gateway's held connections: one per shard, not per read.
    assert 1 <= total(g1, "agora_pg_held_connects_total") <= 2
    assert total(g1, "agora_frames_in_total") >= n
    assert g2[f'agora_connections{{node="{node2}",role="gateway"}}'] >= 1
    assert total(g2, "agora_deliveries_total") - total(before, "agora_deliveries_total") >= n
    assert g2[f'agora_frames_out_total{{encoding="msgpack",node="{node2}",role="gateway"}}'] >= n
    latency = f'agora_delivery_latency_seconds_count{{node="{node2}",role="gateway"}}'
    assert g2[latency] - before.get(latency, 0) >= n
    assert total(g2, "agora_http_responses_total") >= 1
    # The process's own runtime, under the same labels (prometheus_client's collectors).
    assert g2[f'process_resident_memory_bytes{{node="{node2}",role="gateway"}}'] > 0
    assert total(g2, "python_gc_collections_total") >= 1

    # The workers: batches, records and lag per partition, on their own ports. A commit
    # is counted when the broker answers it, in the background after the batch was
    # delivered: wait for it too, not only for the vote's record.
    deadline = time.monotonic() + 10
    while True:
        fan = await scrape(f"http://127.0.0.1:{ops.fanout_port}/metrics")
        sco = await scrape(f"http://127.0.0.1:{ops.scores_port}/metrics")
        counted = total(sco, "agora_consumer_records_total") >= 1
        committed = total(fan, "agora_consumer_commits_total") >= 1
        if (counted and committed) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.3)
    assert total(fan, "agora_consumer_batches_total") >= 1
    assert total(fan, "agora_consumer_records_total") >= n
    assert total(fan, "agora_consumer_commits_total") >= 1
    assert any(k.startswith("agora_consumer_lag{") for k in fan), "no lag gauge"
    assert all(v >= 0 for k, v in fan.items() if k.startswith("agora_consumer_lag{"))
    assert total(sco, "agora_consumer_records_total") >= 1
    for worker in (fan, sco):
        assert total(worker, "process_cpu_seconds_total") > 0
        assert total(worker, "process_open_fds") >= 1
    assert any('role="scores"' in k for k in sco)
    await sender.close()
    await reader.close()


async def test_refused_upgrades_are_counted(ops: Ops) -> None:
    holder = await AgoraClient.connect(ops.plain.ws_url, ops.stack.token(uid("hold")))
    try:
        with pytest.raises(InvalidStatus) as info:
            await AgoraClient.connect(ops.plain.ws_url, ops.stack.token(uid("late")))
        assert info.value.response.status_code == 503
        m = await scrape(f"{ops.plain.http_url}/metrics")
        assert total(m, "agora_refused_upgrades_total") >= 1
        assert total(m, "agora_ws_denied_total") >= 1
    finally:
        await holder.close()


def _json_lines(proc: Proc) -> list[dict[str, object]]:
    path = Path(LOG_DIR) / f"{proc.name}.log"
    out = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            out.append(orjson.loads(line))
    return out


async def test_gateway_logs_are_json_lines_with_node_and_role(ops: Ops) -> None:
    c = await AgoraClient.connect(ops.g1.ws_url, ops.stack.token(uid("log")))
    node = c.hello["node"]
    await c.close()
    lines = _json_lines(ops.g1)
    ours = [d for d in lines if str(d.get("logger", "")).startswith("agora")]
    assert ours, "no JSON log line from an agora logger"
    assert any(d.get("msg") == f"gateway node {node} ready" for d in ours)
    assert all(d.get("node") == node and d.get("role") == "gateway" for d in ours)
    assert all({"ts", "level", "logger", "msg"} <= d.keys() for d in lines)
