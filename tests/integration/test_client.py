"""The reconnecting Python client against real gateways: a node killed or drained under
it, a refusal, an expired token, and an ack lost with its connection."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from agora_client import AgoraClient, Backoff, ReconnectingClient
from core.settings import Settings
from storage.pools import ShardPools
from tests.integration.helpers import create_group, uid, wait_stored
from tests.stack import Stack

pytestmark = pytest.mark.engines

FAST = Backoff(base_s=0.1, cap_s=1.0)


async def drain_msgs(c: ReconnectingClient, conv: str, count: int, timeout: float) -> list[Any]:
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        try:
            frame = await c.next_event("msg", timeout=deadline - time.monotonic())
        except TimeoutError:
            break
        if frame["conv"] == conv:
            got.append(frame)
    return got


@pytest.mark.parametrize("how", ["sigkill", "drain"])
async def test_node_lost_under_the_client_resumes_on_the_other_without_gap_or_duplicate(
    settings: Settings, http: httpx.AsyncClient, how: str
) -> None:
    s = Stack(settings)
    try:
        g1, g2 = s.gateway(f"rc-{how}-g1"), s.gateway(f"rc-{how}-g2")
        s.fanout(f"rc-{how}-f")
        a, b = uid("a"), uid("b")
        conv = await create_group(http, s, g2, a, [b])
        sender = await AgoraClient.connect(g2.ws_url, s.token(a))
        client = ReconnectingClient([g1.ws_url, g2.ws_url], s.token(b), backoff=FAST)
        await client.start()
        first_node = client.conn.hello["node"] if client.conn else ""
        await client.subscribe(conv)
        for i in range(10):
            await sender.send(conv, f"before {i}", cid=f"before-{i}")
        assert len(await drain_msgs(client, conv, 10, 20)) == 10

        # Messages keep flowing while g1 goes away; a send of the client's own is pending.
        async def keep_sending() -> None:
            for i in range(40):
                await sender.send(conv, f"during {i}", cid=f"during-{i}")
                await asyncio.sleep(0.02)

        flow = asyncio.create_task(keep_sending())
        if how == "sigkill":
            g1.kill()
        else:
            # SIGTERM: `reconnect` with after_ms, then 1001 at the deadline. In a thread: a
            # blocked event loop would keep our clients from answering the nodes' pings.
            await asyncio.to_thread(g1.stop)
        own = asyncio.create_task(client.send(conv, "mine, sent across the move", cid="own-1"))
        await flow
        ack = await asyncio.wait_for(own, 30)
        got = await drain_msgs(client, conv, 41, 30)
        seqs = [m["seq"] for m in got]
        print(
            f"{how}: connects {client.connects}, drains {client.drains}, "
            f"last close {client.last_close}, seqs {seqs}"
        )
        assert client.connects == 2
        assert client.conn is not None and client.conn.hello["node"] != first_node
        assert seqs == list(range(11, 52)), "a gap or a duplicate"
        mine = [m for m in got if m["cid"] == "own-1"]
        assert len(mine) == 1 and mine[0]["id"] == ack["id"]
        if how == "drain":
            assert client.drains == 1  # told to move by the draining node, not by a crash
        await client.close()
        await sender.close()
    finally:
        s.stop_all()


async def test_a_lost_ack_is_retried_with_the_same_cid_and_stored_once(
    settings: Settings, http: httpx.AsyncClient, pools: ShardPools
) -> None:
    s = Stack(settings)
    try:
        g = s.gateway("rc-ack-g")
        s.fanout("rc-ack-f")
        a = uid("a")
        conv = await create_group(http, s, g, a, [])
        client = ReconnectingClient(g.ws_url, s.token(a), backoff=FAST)
        await client.start()
        await client.subscribe(conv)
        conn = client.conn
        assert conn is not None
        # Cut the connection right after the frame leaves: the server may well accept it,
        # but its ack can never arrive on this socket.
        original = conn.ws.send

        async def send_then_cut(data: Any) -> None:
            await original(data)
            if '"send"' in str(data):
                conn.ws.transport.abort()

        conn.ws.send = send_then_cut  # type: ignore[method-assign]
        ack = await asyncio.wait_for(client.send(conv, "exactly once", cid="lost-ack"), 30)
        assert client.connects == 2
        got = await drain_msgs(client, conv, 1, 10)
        # A fence: messages of a conversation are stored in send order, so once this one
        # is stored, a second copy of the retried send would be too.
        fence = await client.send(conv, "fence", cid="fence")
        stored = await wait_stored(pools, conv, 2, 20, fence="fence")
        print(f"ack {ack}, stored {[(m.seq, m.cid, m.id) for m in stored]}")
        assert [(m.cid, str(m.id)) for m in stored] == [
            ("lost-ack", ack["id"]),
            ("fence", fence["id"]),
        ]
        assert [m["id"] for m in got] == [ack["id"]]
        await client.close()
    finally:
        s.stop_all()


async def test_a_refused_client_waits_out_retry_after_then_connects(settings: Settings) -> None:
    s = Stack(settings, extra_env={"AGORA_MAX_CONNECTIONS": "1"})
    try:
        g = s.gateway("rc-503-g")
        holder = await AgoraClient.connect(g.ws_url, s.token(uid("holder")))
        client = ReconnectingClient(g.ws_url, s.token(uid("waiter")), backoff=FAST)
        started = time.monotonic()
        await client.start(wait=False)
        # Until the second attempt has started: the first was refused (503, Retry-After
        # >= 1 s), so it may not start before 1 s after `started` (with the 0.1 s backoff
        # alone it would come ~0.1 s after the first). Load only makes it later.
        deadline = started + 20
        while client.attempts < 2:
            assert time.monotonic() < deadline, f"{client.attempts} attempts in 20 s"
            await asyncio.sleep(0.01)
        second = time.monotonic() - started
        assert client.connects == 0
        await holder.close()
        await client.start(wait=True, timeout=15)
        waited = time.monotonic() - started
        print(f"second attempt after {second:.2f}s, connected after {waited:.1f}s")
        assert second >= 1.0
        assert client.connects == 1
        await client.close()
    finally:
        s.stop_all()


async def test_4001_stops_reconnecting_until_a_new_token(settings: Settings) -> None:
    s = Stack(settings)
    try:
        g = s.gateway("rc-4001-g")
        user = uid("tok")
        client = ReconnectingClient(g.ws_url, s.token(user, ttl=-60), backoff=FAST)
        await client.start(wait=False)
        deadline = time.monotonic() + 10
        while client.state != "unauthorized":
            assert time.monotonic() < deadline, f"state {client.state} after 10 s"
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)  # five backoff periods, in which no attempt may follow
        print(f"attempts with an expired token: {client.attempts}, state {client.state}")
        assert client.state == "unauthorized" and client.last_close == 4001
        assert client.attempts == 1  # no retry loop on a token that cannot work
        client.set_token(s.token(user))
        await client.start(wait=True, timeout=10)
        assert client.connects == 1 and (await client.ping())["t"] == "pong"
        await client.close()
    finally:
        s.stop_all()


async def test_plain_client_reports_a_close_before_hello(settings: Settings) -> None:
    from agora_client import Closed

    s = Stack(settings)
    try:
        g = s.gateway("rc-closed-g")
        started = time.monotonic()
        with pytest.raises(Closed) as info:
            await AgoraClient.connect(g.ws_url, "not-a-token")
        assert info.value.code == 4001
        assert time.monotonic() - started < 5  # not a timeout waiting for hello
    finally:
        s.stop_all()
