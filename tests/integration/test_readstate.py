"""Read state end to end: read pointers, `read` echoes to a user's other devices, unread
counts, read receipts. Two gateways, a fan-out worker, the real engines."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from agora_client import AgoraClient, ServerError
from core.settings import Settings
from fanout.envelope import Delivery, encode_delivery
from storage.pools import ShardPools
from storage.redis_keys import RedisKeys
from tests.integration.helpers import auth, collect, create_group, uid
from tests.stack import Proc, Stack

pytestmark = pytest.mark.engines
RECEIPTS_MAX = 3


@pytest.fixture(scope="module")
def stack(settings: Settings) -> Iterator[Stack]:
    s = Stack(settings, extra_env={"AGORA_RECEIPTS_MAX_MEMBERS": str(RECEIPTS_MAX)})
    try:
        s.gateway("rs-g1")
        s.gateway("rs-g2")
        s.fanout("rs-f1")
        yield s
    finally:
        s.stop_all()


async def pointer(pools: ShardPools, conv: str, user: str) -> int:
    async with pools.connection(pools.for_id(int(conv))) as pg:
        seq: int = await pg.fetchval(
            "SELECT read_seq FROM members WHERE conv_id = $1 AND user_id = $2", int(conv), user
        )
    return seq


async def frames_of(client: AgoraClient, t: str, until: Any, timeout: float = 15) -> list[Any]:
    """Pushed frames of type `t` until `until(frames)` holds."""
    got: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not until(got):
        got.append(await client.next_event(t, timeout=max(0.01, deadline - loop.time())))
    return got


async def test_pointers_stay_monotonic_under_concurrent_devices(
    stack: Stack,
    g1: Proc,
    g2: Proc,
    http: httpx.AsyncClient,
    pools: ShardPools,
    redis_client: aioredis.Redis,
) -> None:
    a, b = uid("a"), uid("b")
    conv = await create_group(http, stack, g1, a, [b])
    cb = await AgoraClient.connect(g2.ws_url, stack.token(b))
    await cb.sub(conv)
    for i in range(60):
        await cb.send(conv, f"m{i}")
    assert len(await collect(cb, conv, 60, 20)) == 60
    devices = [
        await AgoraClient.connect((g1 if i % 2 else g2).ws_url, stack.token(a)) for i in range(4)
    ]
    # `hello` comes before a session's user route is registered; a node not yet routed
    # misses the `read` frames. The first reads reach the final seq at once (seed 3: the
    # second device reads 69), so every device must be registered (a pong) first.
    for d in devices:
        assert (await d.ping())["t"] == "pong"
    observed: list[int] = []
    storm_done = asyncio.Event()

    async def watch() -> None:  # the stored pointer, sampled while the devices race
        while not storm_done.is_set():
            observed.append(await pointer(pools, conv, a))
            await asyncio.sleep(0.005)

    rng = random.Random(3)
    sent: list[int] = []

    async def device(d: AgoraClient) -> None:
        for _ in range(40):
            seq = rng.randint(0, 70)  # forward, backward, and past the last seq
            sent.append(seq)
            await d.read(conv, seq)

    watcher = asyncio.create_task(watch())
    await asyncio.gather(*(device(d) for d in devices))
    storm_done.set()
    await watcher
    final = await pointer(pools, conv, a)
    print(f"{len(sent)} reads, max sent {max(sent)}, pointer {final}, {len(observed)} samples")
    assert final == min(max(sent), 60)  # never past the conversation's last seq
    assert observed == sorted(observed), "the pointer moved back"
    # Every device hears the moves (from both nodes, so not necessarily in order: a
    # client keeps the largest); the largest it heard is the pointer.
    for d in devices:
        heard = await frames_of(d, "read", lambda got: any(f["seq"] == final for f in got))
        assert all(f["conv"] == conv and f["seq"] <= final for f in heard)
    # A read that does not move it changes nothing and is echoed to no one.
    await devices[0].read(conv, 1)
    assert await pointer(pools, conv, a) == final
    # Frames of the storm may still be on their way to devices[1]: each was published
    # before its read was answered (gateway/readstate.py), so a marker published on its
    # node's channel now reaches it after all of them (not a fixed pause: under load a
    # node can take longer). Drain them up to the marker.
    channel = RedisKeys(stack.settings.redis_prefix).node_channel(devices[1].hello["node"])
    marker = {"t": "notify", "n": {"id": "storm-over", "kind": "dm"}}
    await redis_client.publish(channel, encode_delivery(Delivery(user_frames=[(a, marker)])))
    while (frame := await devices[1].next_event(timeout=10)) != marker:
        assert frame["t"] == "read" and frame["seq"] <= final, frame
    await devices[0].read(conv, 2)
    with pytest.raises(TimeoutError):
        await devices[1].next_event("read", timeout=0.5)
    for c in (cb, *devices):
        await c.close()


async def test_unread_counts_texts_of_others_and_list_is_by_activity(
    stack: Stack, g1: Proc, g2: Proc, http: httpx.AsyncClient
) -> None:
    a, b = uid("a"), uid("b")
    quiet = await create_group(http, stack, g1, a, [b])
    busy = await create_group(http, stack, g1, a, [b])
    ca = await AgoraClient.connect(g1.ws_url, stack.token(a))
    cb = await AgoraClient.connect(g2.ws_url, stack.token(b))
    await ca.sub(busy)
    await ca.send(quiet, "old news")
    ids = [(await cb.send(busy, f"n{i}"))["id"] for i in range(5)]
    await ca.send(busy, "mine does not count")
    await cb.react(busy, ids[0], "👍")  # an event, not a message to read
    await cb.edit(busy, ids[1], "edited")
    got = await collect(ca, busy, 8, 20)
    assert len(got) == 8

    async def mine() -> dict[str, Any]:
        r = await http.get(f"{g2.http_url}/v1/conversations", headers=auth(stack, a))
        assert r.status_code == 200, r.text
        return {c["id"]: c for c in r.json()["items"]}

    listed = await mine()
    assert list(listed)[:2] == [busy, quiet]  # most recently active first
    assert listed[busy]["unread"] == 5 and listed[busy]["read_seq"] == 0
    assert listed[quiet]["unread"] == 0
    r = await http.put(
        f"{g1.http_url}/v1/conversations/{busy}/read", json={"seq": 3}, headers=auth(stack, a)
    )
    assert r.status_code == 200 and r.json()["seq"] == 3
    assert (await mine())[busy]["unread"] == 2
    r = await http.put(
        f"{g1.http_url}/v1/conversations/{busy}/read", json={"seq": 2}, headers=auth(stack, a)
    )
    assert r.json()["seq"] == 3  # never back
    one = await http.get(f"{g1.http_url}/v1/conversations/{busy}", headers=auth(stack, a))
    assert one.json()["unread"] == 2 and one.json()["read_seq"] == 3
    for bad in ({"seq": -1}, {"seq": "3"}, {"seq": True}, {}):
        r = await http.put(
            f"{g1.http_url}/v1/conversations/{busy}/read", json=bad, headers=auth(stack, a)
        )
        assert r.status_code == 422, bad
    outsider = uid("z")
    r = await http.put(
        f"{g1.http_url}/v1/conversations/{busy}/read",
        json={"seq": 1},
        headers=auth(stack, outsider),
    )
    assert r.status_code == 404  # a non-member: the same answer as for no such conversation
    with pytest.raises(ServerError) as exc:
        await ca.request({"t": "read", "conv": busy, "seq": -2})
    assert exc.value.code == "bad_request"
    await ca.close()
    await cb.close()


async def test_receipts_in_small_groups_only(
    stack: Stack, g1: Proc, g2: Proc, http: httpx.AsyncClient
) -> None:
    a, b, c = uid("a"), uid("b"), uid("c")
    small = await create_group(http, stack, g1, a, [b, c])  # 3 members: receipts
    big = await create_group(http, stack, g1, a, [b, c, uid("d")])  # 4: none
    ca = await AgoraClient.connect(g1.ws_url, stack.token(a))
    cc = await AgoraClient.connect(g2.ws_url, stack.token(c))
    cb = await AgoraClient.connect(g2.ws_url, stack.token(b))
    for conv in (small, big):
        await cb.sub(conv)
        await ca.send(conv, "hi all")
        await ca.send(conv, "anyone?")
        assert len(await collect(cb, conv, 2, 15)) == 2  # stored: a read can reach seq 2
    await cb.read(big, 2)
    await cb.read(small, 2)
    for client in (ca, cc):
        got = await client.next_event("receipt")
        assert got == {"t": "receipt", "conv": small, "user": b, "seq": 2}
    assert (await cb.next_event("read")) == {"t": "read", "conv": big, "seq": 2}
    assert (await cb.next_event("read"))["conv"] == small
    with pytest.raises(TimeoutError):  # b's own devices hear `read`, not a receipt
        await cb.next_event("receipt", timeout=0.5)
    r = await http.get(f"{g2.http_url}/v1/conversations/{small}/receipts", headers=auth(stack, c))
    assert r.status_code == 200
    assert {i["user"]: i["seq"] for i in r.json()["items"]} == {a: 0, b: 2, c: 0}
    r = await http.get(f"{g2.http_url}/v1/conversations/{big}/receipts", headers=auth(stack, c))
    assert r.status_code == 403
    for client in (ca, cb, cc):
        await client.close()
