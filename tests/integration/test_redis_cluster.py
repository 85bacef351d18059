"""Agora against a real Redis Cluster (3 masters, 3 replicas): the core chat paths.

Two gateways and a fan-out worker with AGORA_REDIS_CLUSTER=true: send, ack and delivery
across gateways (sharded pub/sub), a retry with the same cid answered with the same id
(the claim script's keys in one slot), the cluster-wide send limit, and feeds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from agora_client import AgoraClient, ServerError
from core.settings import Settings
from storage.redis_keys import RedisKeys
from tests.engines import STATE_DIR
from tests.integration.helpers import collect, create_group, uid
from tests.redis_cluster import RedisClusterProcs, redis_cluster, unavailable_reason
from tests.stack import Stack

_REASON = unavailable_reason()
pytestmark = [
    pytest.mark.engines,
    pytest.mark.skipif(_REASON is not None, reason=f"Redis Cluster: {_REASON}"),
]


GRACE_S = 2


@pytest.fixture(scope="module")
def rc() -> Iterator[RedisClusterProcs]:
    with redis_cluster(STATE_DIR) as procs:
        yield procs


@pytest.fixture(scope="module")
def cluster_settings(settings: Settings, rc: RedisClusterProcs) -> Settings:
    return dataclasses.replace(
        settings,
        redis_url=rc.url,
        redis_cluster=True,
        redis_prefix=f"rc{secrets.token_hex(3)}",
        kafka_topic_prefix=f"rc{secrets.token_hex(3)}",
    )


@pytest.fixture(scope="module")
def stack(cluster_settings: Settings) -> Iterator[Stack]:
    s = Stack(cluster_settings, extra_env={"AGORA_PRESENCE_GRACE_S": str(GRACE_S)})
    try:
        s.gateway("rc-g1")
        s.gateway("rc-g2")
        s.fanout("rc-f1")
        s.scores("rc-s1")
        yield s
    finally:
        s.stop_all()


@pytest.fixture
async def rcli(rc: RedisClusterProcs) -> AsyncIterator[RedisCluster]:
    client = RedisCluster.from_url(rc.url)
    yield client
    await client.aclose()


def test_the_send_paths_keys_share_one_slot_per_user() -> None:
    keys = RedisKeys("agora", cluster=True)
    slots_seen = set()
    for user in ("alice", "bob", "x:y", "日本"):
        b = keys.send_bucket(user)
        claim = [
            keys.idempotency(user, "c1"),
            keys.id_counter(17, b),
            keys.rate("send", user, 123),
            keys.epoch(b),
        ]
        assert len({key_slot(k.encode()) for k in claim}) == 1, claim
        slots_seen.add(key_slot(claim[0].encode()))
    assert len(slots_seen) > 1  # users spread over slots


async def test_send_ack_deliver_across_gateways_and_retry_same_cid(
    stack: Stack, http: httpx.AsyncClient, rcli: RedisCluster, rc: RedisClusterProcs
) -> None:
    g1, g2 = stack.procs[0], stack.procs[1]
    alice, bob = uid("a"), uid("b")
    conv = await create_group(http, stack, g1, alice, [bob])
    ca = await AgoraClient.connect(g1.ws_url, stack.token(alice))
    cb = await AgoraClient.connect(g2.ws_url, stack.token(bob))
    try:
        await ca.sub(conv)
        await cb.sub(conv)
        acks = [await ca.send(conv, f"m{i}", cid=f"c{i}") for i in range(20)]
        got = await collect(cb, conv, 20, 20)
        assert [f["id"] for f in got] == [a["id"] for a in acks]
        assert [f["seq"] for f in got] == list(range(got[0]["seq"], got[0]["seq"] + 20))
        assert len({a["id"] for a in acks}) == 20
        # A retry of a cid is answered with the first id, from either gateway.
        again = await ca.send(conv, "m0", cid="c0")
        assert again["id"] == acks[0]["id"]
        cb_as_alice = await AgoraClient.connect(g2.ws_url, stack.token(alice))
        try:
            assert (await cb_as_alice.send(conv, "m5", cid="c5"))["id"] == acks[5]["id"]
        finally:
            await cb_as_alice.close()
        assert await collect(cb, conv, 1, 1.5) == []  # the retries were not delivered again
        # The records really live in the cluster, in the user's bucket slot.
        keys = RedisKeys(stack.settings.redis_prefix, cluster=True)
        assert await rcli.get(keys.idempotency(alice, "c0")) is not None
        # The node channels are sharded channels, not broadcast ones.
        channels: set[Any] = set()
        for port in rc.masters():
            node = rcli.get_node("127.0.0.1", port)
            channels |= set(await rcli.execute_command("PUBSUB SHARDCHANNELS", target_nodes=node))
        names = {c.decode() if isinstance(c, bytes) else c for c in channels}
        ours = {n for n in names if n.startswith(keys.node_channel(""))}
        assert len(ours) >= 2, names  # one per gateway
    finally:
        await ca.close()
        await cb.close()


async def test_the_cluster_wide_send_limit_counts_in_the_claim(
    cluster_settings: Settings, http: httpx.AsyncClient
) -> None:
    s = Stack(dataclasses.replace(cluster_settings, sends_per_s=3))
    try:
        g = s.gateway("rc-limit")
        alice, bob = uid("a"), uid("b")
        conv = await create_group(http, s, g, alice, [bob])
        ca = await AgoraClient.connect(g.ws_url, s.token(alice))
        try:
            outcomes = []
            for i in range(8):
                try:
                    outcomes.append((await ca.send(conv, "x", cid=f"l{i}"))["id"])
                except ServerError as exc:
                    outcomes.append(exc.code)
            assert "rate_limited" in outcomes
            assert sum(isinstance(o, str) and o.isdigit() for o in outcomes) >= 3
        finally:
            await ca.close()
    finally:
        s.stop_all()


async def test_feeds_work_on_the_cluster(stack: Stack, http: httpx.AsyncClient) -> None:
    g1 = stack.procs[0]
    user = uid("p")
    comm = f"c{secrets.token_hex(3)}"
    headers = {"Authorization": f"Bearer {stack.token(user)}"}
    made = []
    for i in range(3):
        r = await http.post(
            f"{g1.http_url}/v1/posts",
            json={"title": f"t{i}", "body": "", "community": comm},
            headers=headers,
        )
        assert r.status_code == 201, r.text
        made.append(r.json()["id"])
    for kind in ("new", "trending", "top"):
        seen: list[str] = []
        for _ in range(100):
            r = await http.get(
                f"{g1.http_url}/v1/feeds/{kind}", params={"community": comm}, headers=headers
            )
            assert r.status_code == 200, r.text
            seen = [p["id"] for p in r.json()["items"]]
            if set(made) <= set(seen):
                break
            await asyncio.sleep(0.1)
        assert set(made) <= set(seen), (kind, seen)
    # A vote goes through the scores worker, which re-ranks the post in the feeds.
    voter = {"Authorization": f"Bearer {stack.token(uid('v'))}"}
    r = await http.put(f"{g1.http_url}/v1/posts/{made[0]}/vote", json={"value": 1}, headers=voter)
    assert r.status_code == 200, r.text
    first = None
    for _ in range(100):
        r = await http.get(
            f"{g1.http_url}/v1/feeds/top",
            params={"community": comm, "window": "all"},
            headers=headers,
        )
        assert r.status_code == 200, r.text
        first = r.json()["items"][0]["id"]
        if first == made[0]:
            break
        await asyncio.sleep(0.1)
    assert first == made[0]


async def presence_of(client: AgoraClient, user: str, timeout: float) -> dict[str, Any]:
    while True:
        frame = await client.next_event("presence", timeout=timeout)
        if frame["user"] == user:
            return frame


async def test_presence_online_grace_and_offline_on_the_cluster(
    stack: Stack, http: httpx.AsyncClient
) -> None:
    """The presence scripts touch one slot each: online, a move to the other gateway
    within the grace (no flap: the offline compare-and-set sees the new `seen`), offline."""
    g1, g2 = stack.procs[0], stack.procs[1]
    a, b = uid("a"), uid("b")
    conv = await create_group(http, stack, g1, a, [b])
    watcher = await AgoraClient.connect(g1.ws_url, stack.token(a))
    try:
        await watcher.sub(conv)
        cb = await AgoraClient.connect(g2.ws_url, stack.token(b))
        assert (await presence_of(watcher, b, 10))["online"] is True
        await cb.close()
        cb = await AgoraClient.connect(g1.ws_url, stack.token(b))
        with pytest.raises(TimeoutError):
            await presence_of(watcher, b, GRACE_S + 2)
        await cb.close()
        frame = await presence_of(watcher, b, GRACE_S + 10)
        assert frame["online"] is False and frame["last_seen"]
    finally:
        await watcher.close()


async def test_revocation_and_typing_on_the_cluster(stack: Stack, http: httpx.AsyncClient) -> None:
    """The revocation stream (one key) and typing (a key, then SPUBLISH) on the cluster:
    a removed member is refused and unsubscribed on the other gateway at once."""
    g1, g2 = stack.procs[0], stack.procs[1]
    a, b = uid("a"), uid("b")
    conv = await create_group(http, stack, g1, a, [b])
    ca = await AgoraClient.connect(g1.ws_url, stack.token(a))
    cb = await AgoraClient.connect(g2.ws_url, stack.token(b))
    try:
        await ca.sub(conv)
        await cb.sub(conv)
        await ca.typing(conv)
        typing = await cb.next_event("typing", timeout=10)
        assert typing["conv"] == conv and typing["user"] == a
        await cb.send(conv, "before", cid="before")  # b's access is cached on g2 now
        r = await http.delete(
            f"{g1.http_url}/v1/conversations/{conv}/members/{b}",
            headers={"Authorization": f"Bearer {stack.token(a)}"},
        )
        assert r.status_code == 204
        unsubbed = await cb.next_event("unsubbed", timeout=5)
        assert unsubbed == {"t": "unsubbed", "conv": conv, "reason": "removed"}
        with pytest.raises(ServerError) as info:
            await cb.send(conv, "after", cid="after")
        assert info.value.code == "not_found"
    finally:
        await ca.close()
        await cb.close()


async def test_session_counts_go_down_to_nothing_on_the_cluster(
    stack: Stack, cluster_settings: Settings, rcli: RedisCluster
) -> None:
    """The session count's decrement script (one call per user: users' hashes are in
    different slots) lowers each user's field and deletes it, and the hash, at 0."""
    g1 = stack.procs[0]
    keys = RedisKeys(cluster_settings.redis_prefix, cluster=True)
    users = [uid(f"rcap{i}") for i in range(4)]
    hashes = [keys.user_sessions(u) for u in users]
    assert len({key_slot(k.encode()) for k in hashes}) > 1  # one script call cannot take them
    sessions = {
        u: [await AgoraClient.connect(g1.ws_url, stack.token(u)) for _ in range(2)] for u in users
    }
    for held in sessions.values():
        for c in held:
            assert (await c.ping())["t"] == "pong"  # answered once counted

    async def counts() -> list[list[int]]:
        return [[int(v) for v in (await rcli.hgetall(k)).values()] for k in hashes]

    assert await counts() == [[2]] * len(users)
    for held in sessions.values():
        await held[0].close()
    deadline = asyncio.get_running_loop().time() + 10
    while await counts() != [[1]] * len(users):
        assert asyncio.get_running_loop().time() < deadline, await counts()
        await asyncio.sleep(0.05)
    assert all([await rcli.ttl(k) > 0 for k in hashes])
    for held in sessions.values():
        await held[1].close()
    while any([await rcli.exists(k) for k in hashes]):
        assert asyncio.get_running_loop().time() < deadline + 10, await counts()
        await asyncio.sleep(0.05)
