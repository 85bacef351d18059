"""Fault injection with real processes and engines. Each test prints the figures it
asserts on: sent, acked, delivered, lost, duplicated.

Engines a test breaks are its own (a private Redis, PostgreSQL cluster or broker on a
free port), never the session's shared ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from agora_client import AgoraClient, ServerError
from core.settings import Settings
from devstack import services
from storage import messages
from storage.pools import ShardPools
from tests.engines import free_port
from tests.faults import OwnPostgres, OwnRedis, private_shard
from tests.integration.helpers import collect, create_group, uid
from tests.stack import Proc, Stack

pytestmark = pytest.mark.engines


class Follower:
    """A subscriber that survives its node: on a drop it reconnects to the next node and
    resubscribes with `since` = the last seq it has; it keeps every msg it receives."""

    def __init__(self, stack: Stack, nodes: list[Proc], user: str, conv: str) -> None:
        self.stack, self.nodes, self.user, self.conv = stack, nodes, user, conv
        self.seqs: list[int] = []
        self.times: list[float] = []  # monotonic arrival time of each of `seqs`
        self.reconnects = 0
        self.task: asyncio.Task[None] | None = None
        self.stop = asyncio.Event()

    async def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            node = self.nodes[i % len(self.nodes)]
            i += 1
            try:
                c = await AgoraClient.connect(node.ws_url, self.stack.token(self.user), timeout=3)
            except Exception:
                await asyncio.sleep(0.2)
                continue
            try:
                await c.sub(self.conv, since=self.seqs[-1] if self.seqs else 0)
                while not self.stop.is_set() and not c.closed.is_set():
                    with contextlib.suppress(TimeoutError):
                        f = await c.next_event("msg", timeout=0.2)
                        self.seqs.append(f["seq"])
                        self.times.append(time.monotonic())
            except Exception:
                pass
            finally:
                await c.close()
            if not self.stop.is_set():
                self.reconnects += 1

    def start(self) -> None:
        self.task = asyncio.create_task(self.run())

    async def finish(self) -> None:
        self.stop.set()
        if self.task is not None:
            await self.task


async def send_steadily(
    stack: Stack, nodes: list[Proc], user: str, conv: str, count: int, pause: float
) -> tuple[list[str], int]:
    """Send `count` messages, retrying each cid until acked (across nodes and outages).
    Returns the acked ids in order and how many attempts failed."""
    acked: list[str] = []
    failures = 0
    client: AgoraClient | None = None
    i = 0
    node_i = 0
    deadline = time.monotonic() + 120
    while i < count and time.monotonic() < deadline:
        if client is None or client.closed.is_set():
            try:
                client = await AgoraClient.connect(
                    nodes[node_i % len(nodes)].ws_url, stack.token(user), timeout=3
                )
            except Exception:
                node_i += 1
                failures += 1
                await asyncio.sleep(0.2)
                continue
        try:
            ack = await client.send(conv, f"m{i}", cid=f"s{i}")
            acked.append(ack["id"])
            i += 1
            await asyncio.sleep(pause)
        except ServerError as exc:
            assert exc.code in ("unavailable", "rate_limited"), exc.frame
            failures += 1
            await asyncio.sleep(0.2)
        except Exception:
            failures += 1
            node_i += 1
            await asyncio.sleep(0.1)
    if client is not None:
        await client.close()
    return acked, failures


def report(label: str, sent: int, acked: list[str], delivered: list[int], stored: int) -> None:
    dup = len(delivered) - len(set(delivered))
    lost = len(acked) - len(set(delivered))
    print(
        f"{label}: sent {sent}, acked {len(acked)}, stored {stored}, delivered "
        f"{len(delivered)}, lost {lost}, duplicated {dup}"
    )


# -- a gateway dies with its clients ------------------------------------------------------


async def test_gateway_sigkill_clients_recover_on_the_other_node(
    settings: Settings, http: httpx.AsyncClient, pools: ShardPools
) -> None:
    s = Stack(settings)
    try:
        g1, g2 = s.gateway("gk-g1"), s.gateway("gk-g2")
        s.fanout("gk-f")
        sender_user = uid("s")
        readers = [uid("r") for _ in range(20)]
        conv = await create_group(http, s, g2, sender_user, readers)
        followers = [Follower(s, [g1, g2], r, conv) for r in readers]
        for f in followers:
            f.start()
        await asyncio.sleep(1.0)
        sending = asyncio.create_task(send_steadily(s, [g2], sender_user, conv, 300, 0.01))
        await asyncio.sleep(1.0)
        g1.kill()
        acked, _ = await sending
        acked_at = time.monotonic()
        # Until every follower has them all (those of the killed node reconnect and catch
        # up with `since`, which on a loaded machine can take longer than a fixed pause),
        # then at least as long as the old fixed 3 s after the last ack: a duplicate would
        # arrive by then.
        deadline = acked_at + 60
        while not all(len(f.seqs) >= 300 for f in followers) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        print(f"every follower caught up {time.monotonic() - acked_at:.2f}s after the last ack")
        await asyncio.sleep(max(0.5, acked_at + 3.0 - time.monotonic()))
        for f in followers:
            await f.finish()
        stored = await messages.after(pools, int(conv), 0, 1000)
        for f in followers:
            report(
                f"follower {f.user} ({f.reconnects} reconnects)", 300, acked, f.seqs, len(stored)
            )
        assert len(acked) == 300 and len(stored) == 300
        assert sum(f.reconnects for f in followers) >= 1
        for f in followers:
            assert f.seqs == list(range(1, 301)), f"{f.user}: {len(f.seqs)} seqs"
    finally:
        s.stop_all()


# -- Redis restarts, then is flushed ------------------------------------------------------


async def test_redis_restart_and_flush_during_traffic(
    settings: Settings, http: httpx.AsyncClient, pools: ShardPools
) -> None:
    redis = OwnRedis()
    redis.start()
    s = Stack(settings, extra_env={"AGORA_REDIS_URL": redis.url, "AGORA_ROUTE_LEASE_S": "3"})
    # Redis is down 1.5 s and comes back empty; a gateway whose lease renewals failed for a
    # whole lease (3 s: the failures before the kill's detection and the first reconnect
    # count too) sheds its connections with 1013, as designed (the follower resumes with
    # `since`, which this test checks). Whether it does depends on the renewal timing.
    s.expect_log(r"Redis unreachable for [\d.]+ s; closing \d+ connections with 1013")
    try:
        g1, g2 = s.gateway("rd-g1"), s.gateway("rd-g2")
        s.fanout("rd-f")
        a, b = uid("a"), uid("b")
        conv = await create_group(http, s, g1, a, [b])
        follower = Follower(s, [g2, g1], b, conv)
        follower.start()
        await asyncio.sleep(1.0)
        sending = asyncio.create_task(send_steadily(s, [g1, g2], a, conv, 400, 0.01))
        await asyncio.sleep(1.0)
        redis.kill()
        print("redis killed")
        await asyncio.sleep(1.5)
        redis.start()
        print("redis restarted (empty)")
        await asyncio.sleep(1.5)
        import redis.asyncio as aioredis

        r = aioredis.Redis.from_url(redis.url)
        await r.flushall()
        await r.aclose()
        print("redis flushed")
        acked, failures = await sending
        # Routing must be back within seconds: a fresh message reaches the follower live.
        probe = await AgoraClient.connect(g1.ws_url, s.token(a))
        started = time.monotonic()
        acked.append((await probe.send(conv, "probe", cid="probe"))["id"])
        while len(follower.seqs) < len(acked) and time.monotonic() - started < 15:
            await asyncio.sleep(0.1)
        recovered_in = time.monotonic() - started
        await probe.close()
        await follower.finish()
        stored = await messages.after(pools, int(conv), 0, 1000)
        report(
            f"redis restart+flush (failed attempts {failures})",
            401,
            acked,
            follower.seqs,
            len(stored),
        )
        print(f"probe delivered {recovered_in:.1f}s after redis came back")
        assert len(acked) == 401
        assert {str(m.id) for m in stored} >= set(acked)
        assert follower.seqs == list(range(1, len(stored) + 1))
        assert recovered_in < 10
    finally:
        s.stop_all()
        redis.kill()


# -- one PostgreSQL shard stops -----------------------------------------------------------


@pytest.fixture
def own_shard(settings: Settings) -> Iterator[tuple[Settings, OwnPostgres]]:
    with private_shard(settings) as (two, pg):
        yield two, pg


def user_on(pools: ShardPools, physical: int, prefix: str) -> str:
    for i in range(10_000):
        name = f"{prefix}-{i}-{time.monotonic_ns() % 100000}"
        if pools.for_user(name) == physical:
            return name
    raise AssertionError("no user found")


async def test_one_shard_down_fails_only_what_needs_it(
    own_shard: tuple[Settings, OwnPostgres], http: httpx.AsyncClient
) -> None:
    settings, pg = own_shard
    pools = ShardPools(settings)
    s = Stack(settings)
    try:
        g = s.gateway("sd-g")
        s.fanout("sd-f")
        up_user, down_user = user_on(pools, 0, "up"), user_on(pools, 1, "down")
        conv_up = await create_group(http, s, g, up_user, [])
        conv_down = await create_group(http, s, g, down_user, [])
        cu = await AgoraClient.connect(g.ws_url, s.token(up_user))
        cd = await AgoraClient.connect(g.ws_url, s.token(down_user))
        await cu.sub(conv_up)
        await cd.sub(conv_down)
        await cd.send(conv_down, "before", cid="before")
        assert (await collect(cd, conv_down, 1, 10))[0]["seq"] == 1

        pg.stop()
        print("shard #1 stopped")
        await asyncio.sleep(6)  # past the access cache's TTL
        hdr = {"Authorization": f"Bearer {s.token(down_user)}"}
        r = await http.get(f"{g.http_url}/v1/conversations/{conv_down}", headers=hdr)
        print(f"GET on the dead shard: {r.status_code} {r.json()}")
        assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
        assert int(r.headers["Retry-After"]) >= 1
        with pytest.raises(ServerError) as info:
            await cd.send(conv_down, "during", cid="during")
        assert info.value.code == "unavailable" and info.value.frame["retry_after_ms"] > 0
        # The healthy shard: reads, sends, delivery all unaffected.
        hdr_up = {"Authorization": f"Bearer {s.token(up_user)}"}
        r = await http.get(f"{g.http_url}/v1/conversations/{conv_up}", headers=hdr_up)
        assert r.status_code == 200
        for i in range(20):
            await cu.send(conv_up, f"up {i}", cid=f"up{i}")
        got = await collect(cu, conv_up, 20, 15)
        print(f"healthy shard while the other is down: sent 20, delivered {len(got)}")
        assert [f["seq"] for f in got] == list(range(1, 21))
        async with httpx.AsyncClient() as h:
            ready = await h.get(f"{g.http_url}/readyz")
        assert ready.status_code == 503 and any("#1" in k for k in ready.json()["down"])

        pg.start()
        print("shard #1 back")
        deadline = time.monotonic() + 20
        while True:
            try:
                await cd.send(conv_down, "during", cid="during")
                break
            except ServerError as exc:
                assert exc.code == "unavailable"
                assert time.monotonic() < deadline, "shard did not come back"
                await asyncio.sleep(0.5)
        got = await collect(cd, conv_down, 1, 15)
        assert [f["seq"] for f in got] == [2] and got[0]["cid"] == "during"
        r = await http.get(f"{g.http_url}/v1/conversations/{conv_down}", headers=hdr)
        assert r.status_code == 200
        await cu.close()
        await cd.close()
    finally:
        s.stop_all()
        await pools.close()


# -- the broker stops ---------------------------------------------------------------------


async def test_broker_down_gives_unavailable_never_a_false_ack(
    settings: Settings, http: httpx.AsyncClient, pools: ShardPools
) -> None:
    port = free_port()
    log = services.Path(".agora/test/tansu-own.log")

    def start_broker() -> subprocess.Popen[bytes]:
        return services.start_tansu("127.0.0.1", port, log)

    broker = start_broker()
    s = Stack(settings, extra_env={"AGORA_KAFKA_BOOTSTRAP": f"127.0.0.1:{port}"})
    # aiokafka logs at ERROR each failed attempt to reach the hung broker.
    s.expect_log(r"^aiokafka: Unable (connect to node|to update metadata)")
    try:
        g = s.gateway("bk-g")
        s.fanout("bk-f")
        a = uid("a")
        conv = await create_group(http, s, g, a, [])
        c = await AgoraClient.connect(g.ws_url, s.token(a))
        await c.sub(conv)
        await c.send(conv, "before", cid="before")
        assert len(await collect(c, conv, 1, 15)) == 1

        # The broker stops answering (SIGSTOP: it hangs, its sockets stay open). Not a kill:
        # Tansu is memory-only, so a restarted one would have lost its whole log and every
        # offset, which no Apache Kafka restart does, and clients would be testing that.
        broker.send_signal(signal.SIGSTOP)
        print("broker stopped")
        errors: list[dict[str, Any]] = []
        for i in range(3):
            try:
                ack = await c.send(conv, f"down {i}", cid=f"down{i}")
                raise AssertionError(f"false ack while the broker is down: {ack}")
            except ServerError as exc:
                errors.append(exc.frame)
        print(f"sends while down: {[e['code'] for e in errors]}")
        assert all(e["code"] == "unavailable" and e["retry_after_ms"] > 0 for e in errors)

        broker.send_signal(signal.SIGCONT)
        print("broker answering again")
        # As docs/protocol.md tells a client: retry each `unavailable` send with the same cid.
        # A send that timed out may still have been delivered by the producer's retries;
        # the retry then gets that message's id, never a second message.
        deadline = time.monotonic() + 60
        acks: dict[str, str] = {}
        for i in range(3):
            while f"down{i}" not in acks:
                try:
                    acks[f"down{i}"] = (await c.send(conv, f"down {i}", cid=f"down{i}"))["id"]
                except ServerError as exc:
                    assert exc.code == "unavailable"
                    assert time.monotonic() < deadline, "no recovery after the broker returned"
                    await asyncio.sleep(0.5)
        got = await collect(c, conv, 3, 30)
        await asyncio.sleep(1.0)
        stored = await messages.after(pools, int(conv), 0, 100)
        print(f"after recovery: delivered {[f['cid'] for f in got]}, stored {len(stored)}")
        assert sorted(m.cid for m in stored) == ["before", "down0", "down1", "down2"]
        assert {m.cid: str(m.id) for m in stored if m.cid != "before"} == acks
        assert [m.seq for m in stored] == [1, 2, 3, 4]
        assert sorted(f["cid"] for f in got) == ["down0", "down1", "down2"]
        assert [f["seq"] for f in got] == [2, 3, 4]
        assert c.events.empty() or all(e.get("t") != "msg" for e in list(c.events._queue))
        await c.close()
    finally:
        s.stop_all()
        broker.kill()
