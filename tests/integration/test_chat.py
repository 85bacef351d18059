"""Chat end to end: two gateway processes, two fan-out workers, the real engines.

Every figure a test asserts on (sent, acked, delivered, lost, duplicated) is printed, so a
failure says what was seen.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest
import redis.asyncio as aioredis
from websockets.exceptions import ConnectionClosed, InvalidStatus

from agora_client import AgoraClient, ServerError
from core.settings import Settings
from storage import messages
from storage.pools import ShardPools
from tests.integration.helpers import (
    collect,
    create_group,
    metric,
    uid,
    wait_close_counted,
    wait_stored,
)
from tests.stack import Proc, Stack

pytestmark = pytest.mark.engines


@pytest.fixture(scope="module")
def stack(settings: Settings) -> Iterator[Stack]:
    s = Stack(settings)
    try:
        s.gateway("chat-g1")
        s.gateway("chat-g2")
        s.fanout("chat-f1")
        s.fanout("chat-f2")
        yield s
    finally:
        s.stop_all()


def check_stream(frames: list[dict[str, Any]], expected: int, label: str) -> None:
    seqs = [f["seq"] for f in frames]
    dup = len(seqs) - len(set(seqs))
    print(f"{label}: expected {expected}, delivered {len(frames)}, duplicated {dup}")
    assert seqs == list(range(seqs[0] if seqs else 1, (seqs[0] if seqs else 1) + len(seqs)))
    assert len(frames) == expected


# -- a. many conversations, both nodes ----------------------------------------------------


async def test_many_conversations_every_member_gets_every_message_once_in_order(
    stack: Stack, g1: Proc, g2: Proc, http: httpx.AsyncClient
) -> None:
    convs, per_conv = 50, 200
    pairs = [(uid("a"), uid("b")) for _ in range(convs)]
    ids = await asyncio.gather(*(create_group(http, stack, g1, a, [b]) for a, b in pairs))
    clients: list[tuple[str, AgoraClient, AgoraClient]] = []
    for conv, (a, b) in zip(ids, pairs, strict=True):
        ca = await AgoraClient.connect(g1.ws_url, stack.token(a))
        cb = await AgoraClient.connect(g2.ws_url, stack.token(b), "msgpack")
        await ca.sub(conv)
        await cb.sub(conv)
        clients.append((conv, ca, cb))

    async def sender(client: AgoraClient, conv: str, n: int, who: str) -> int:
        acked = 0
        for i in range(n):
            await client.send(conv, f"{who} {i}", cid=f"{who}-{i}")
            acked += 1
        return acked

    started = time.monotonic()
    sends = []
    for conv, ca, cb in clients:
        sends.append(sender(ca, conv, per_conv // 2, "a"))
        sends.append(sender(cb, conv, per_conv // 2, "b"))
    receives = [collect(c, conv, per_conv, 90) for conv, ca, cb in clients for c in (ca, cb)]
    results = await asyncio.gather(asyncio.gather(*sends), asyncio.gather(*receives))
    acked = sum(results[0])
    streams = results[1]
    elapsed = time.monotonic() - started
    delivered = sum(len(s) for s in streams)
    print(f"sent {convs * per_conv}, acked {acked}, delivered {delivered} in {elapsed:.1f}s")
    assert acked == convs * per_conv
    for i, frames in enumerate(streams):
        conv = clients[i // 2][0]
        check_stream(frames, per_conv, f"conv {conv} member {i % 2}")
        assert [f["seq"] for f in frames] == list(range(1, per_conv + 1))
        assert {f["cid"] for f in frames} == {f"a-{j}" for j in range(100)} | {
            f"b-{j}" for j in range(100)
        }
        # Each sender's own messages keep the order it sent them in.
        mine = [int(f["cid"][2:]) for f in frames if f["cid"].startswith("a-")]
        assert mine == sorted(mine)
    for _, ca, cb in clients:
        await ca.close()
        await cb.close()


# -- b. idempotent retry ------------------------------------------------------------------


async def test_retried_send_yields_one_message_and_the_same_id(
    stack: Stack, g1: Proc, g2: Proc, http: httpx.AsyncClient, pools: ShardPools
) -> None:
    a, b = uid("a"), uid("b")
    conv = await create_group(http, stack, g1, a, [b])
    ca = await AgoraClient.connect(g1.ws_url, stack.token(a))
    cb = await AgoraClient.connect(g2.ws_url, stack.token(a))  # same user, other node
    first = await ca.send(conv, "once", cid="retry-1")
    again = await ca.send(conv, "once", cid="retry-1")
    other_node = await cb.send(conv, "once", cid="retry-1")
    r = await http.post(
        f"{g2.http_url}/v1/conversations/{conv}/messages",
        json={"cid": "retry-1", "body": "once"},
        headers={"Authorization": f"Bearer {stack.token(a)}"},
    )
    assert r.status_code == 202
    assert first["id"] == again["id"] == other_node["id"] == r.json()["id"]
    # Concurrent duplicates too: all get the same id.
    acks = await asyncio.gather(*(ca.send(conv, "x", cid="retry-2") for _ in range(5)))
    assert len({x["id"] for x in acks}) == 1
    # A fence: a conversation's messages are stored in send order, so once a message sent
    # after all of them is stored, so is any duplicate of theirs.
    await ca.send(conv, "fence", cid="fence")
    stored = await wait_stored(pools, conv, 3, 20, fence="fence")
    print(f"stored {len(stored)} messages for 2 distinct cids and the fence")
    assert [m.cid for m in stored] == ["retry-1", "retry-2", "fence"]
    assert [m.seq for m in stored] == [1, 2, 3]
    await ca.close()
    await cb.close()


# -- c. recovery across nodes -------------------------------------------------------------


async def test_reconnect_to_the_other_node_with_since_recovers_exactly_the_missed(
    stack: Stack, g1: Proc, g2: Proc, http: httpx.AsyncClient
) -> None:
    a, b = uid("a"), uid("b")
    conv = await create_group(http, stack, g1, a, [b])
    sender = await AgoraClient.connect(g1.ws_url, stack.token(a))
    reader = await AgoraClient.connect(g1.ws_url, stack.token(b))
    await reader.sub(conv)
    for i in range(10):
        await sender.send(conv, f"m{i}", cid=f"pre-{i}")
    seen = await collect(reader, conv, 10, 20)
    last = seen[-1]["seq"]
    assert last == 10
    await reader.close()
    for i in range(100):
        await sender.send(conv, f"missed {i}", cid=f"miss-{i}")
    back = await AgoraClient.connect(g2.ws_url, stack.token(b))
    live_task = asyncio.create_task(sender.send(conv, "live 0", cid="live-0"))
    subbed = await back.sub(conv, since=last)
    await live_task
    frames = []
    while not back.events.empty():
        frames.append(back.events.get_nowait())
    msgs = [f for f in frames if f["t"] == "msg"]
    msgs += await collect(back, conv, 111 - 10 - len(msgs), 20)
    print(f"missed 100 + live 1: delivered {len(msgs)}, subbed {subbed}")
    assert subbed["recovered"] is True
    assert [f["seq"] for f in msgs] == list(range(11, 112))
    assert [f["cid"] for f in msgs[:100]] == [f"miss-{i}" for i in range(100)]
    # And then live ones keep coming.
    await sender.send(conv, "after", cid="after")
    nxt = await collect(back, conv, 1, 10)
    assert [f["seq"] for f in nxt] == [112]
    await sender.close()
    await back.close()


async def test_gap_beyond_the_replay_limit_is_not_recovered(
    stack: Stack, g1: Proc, http: httpx.AsyncClient, pools: ShardPools
) -> None:
    a = uid("a")
    conv = await create_group(http, stack, g1, a, [])
    c = await AgoraClient.connect(g1.ws_url, stack.token(a))
    limit = stack.settings.replay_limit
    for start in range(0, limit + 5, 200):  # pipelined, within the in-flight window
        end = min(start + 200, limit + 5)
        await asyncio.gather(*(c.send(conv, f"m{i}", cid=f"c{i}") for i in range(start, end)))
    await wait_stored(pools, conv, limit + 5, 30)
    full = await AgoraClient.connect(g1.ws_url, stack.token(a))
    subbed = await full.sub(conv, since=5)  # exactly `limit` missed: all replayed
    msgs = await collect(full, conv, limit, 20)
    print(f"since=5: subbed {subbed}, replayed {len(msgs)}")
    assert subbed["recovered"] is True and subbed["seq"] == limit + 5
    assert [m["seq"] for m in msgs] == list(range(6, limit + 6))
    behind = await AgoraClient.connect(g1.ws_url, stack.token(a))
    subbed = await behind.sub(conv, since=0)
    print(f"since=0: subbed {subbed}")
    assert subbed["recovered"] is False and subbed["seq"] == limit + 5
    assert behind.events.empty()
    # The storage read behind it decides from last_seq first: nothing is read that could
    # not be sent (it used to read limit + 1 full rows and drop them).
    assert await messages.recover(pools, int(conv), 0, limit) == (limit + 5, [])
    latest, rows = await messages.recover(pools, int(conv), 5, limit)
    assert latest == limit + 5 and [m.seq for m in rows] == list(range(6, limit + 6))
    for x in (c, full, behind):
        await x.close()


# -- d. access control --------------------------------------------------------------------


async def test_non_members_get_the_same_not_found_as_for_no_conversation(
    stack: Stack, g1: Proc, http: httpx.AsyncClient
) -> None:
    a, b, eve = uid("a"), uid("b"), uid("eve")
    conv = await create_group(http, stack, g1, a, [b])
    missing = "123456789012345"
    c = await AgoraClient.connect(g1.ws_url, stack.token(eve))
    for target in (conv, missing):
        for attempt in (c.sub(target), c.send(target, "let me in")):
            with pytest.raises(ServerError) as info:
                await attempt
            assert info.value.code == "not_found"
            assert info.value.frame["msg"] == "no such conversation"
    hdr = {"Authorization": f"Bearer {stack.token(eve)}"}
    for path in ("", "/messages"):
        answers = [
            await http.get(f"{g1.http_url}/v1/conversations/{target}{path}", headers=hdr)
            for target in (conv, missing)
        ]
        print(f"GET {path or '/'} as a non-member: {[(r.status_code, r.text) for r in answers]}")
        assert answers[0].status_code == answers[1].status_code == 404
        assert answers[0].json() == answers[1].json()
    for target in (conv, missing):
        r = await http.post(
            f"{g1.http_url}/v1/conversations/{target}/messages",
            json={"cid": "x", "body": "y"},
            headers=hdr,
        )
        assert r.status_code == 404
        r = await http.post(
            f"{g1.http_url}/v1/conversations/{target}/members", json={"user": eve}, headers=hdr
        )
        assert r.status_code == 404
    assert (await c.ping())["t"] == "pong"  # still connected
    await c.close()


@pytest.mark.parametrize("case", ["none", "wrong_key", "expired", "no_sub", "garbage", "missing"])
async def test_bad_tokens_close_with_4001(stack: Stack, g1: Proc, case: str) -> None:
    secret = stack.settings.jwt_secret
    claims: dict[str, Any] = {"sub": "mallory", "exp": int(time.time()) + 60}
    token: str | None
    if case == "none":
        token = jwt.encode(claims, None, algorithm="none")
    elif case == "wrong_key":
        token = jwt.encode(claims, "not-the-secret-but-a-key-of-full-length", algorithm="HS256")
    elif case == "expired":
        token = jwt.encode({**claims, "exp": int(time.time()) - 3600}, secret, algorithm="HS256")
    elif case == "no_sub":
        token = jwt.encode({"exp": claims["exp"]}, secret, algorithm="HS256")
    elif case == "garbage":
        token = "a.b.c"
    else:
        token = None
    from websockets.asyncio.client import connect

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with connect(g1.ws_url, additional_headers=headers) as ws:
        with pytest.raises(Exception):  # noqa: B017 - the close is what we check
            await asyncio.wait_for(ws.recv(), 5)
        assert ws.close_code == 4001
    async with httpx.AsyncClient() as http:
        r = await http.get(f"{g1.http_url}/v1/me", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"


async def test_token_in_query_string_for_browsers(stack: Stack, g2: Proc) -> None:
    c = await AgoraClient.connect(g2.ws_url, stack.token("browser-user"), use_header=False)
    assert c.hello["user"] == "browser-user" and c.hello["node"]
    assert c.hello["hb"] == stack.settings.heartbeat_ms
    assert c.hello["max_frame"] == stack.settings.max_frame_bytes
    await c.close()


# -- e. both encodings --------------------------------------------------------------------


async def test_json_and_msgpack_clients_see_identical_content(
    stack: Stack, g1: Proc, g2: Proc, http: httpx.AsyncClient
) -> None:
    a, b = uid("a"), uid("b")
    conv = await create_group(http, stack, g1, a, [b])
    cj = await AgoraClient.connect(g1.ws_url, stack.token(a), "json")
    cm = await AgoraClient.connect(g2.ws_url, stack.token(b), "msgpack")
    await cj.sub(conv)
    await cm.sub(conv)
    bodies = [
        "plain",
        "ünïcödé ✓ 🚀",
        'quote " and \\ backslash',
        "x" * 4000,
        "'; DROP TABLE messages; --",
    ]
    for i, body in enumerate(bodies):
        await (cj if i % 2 else cm).send(conv, body, cid=f"enc-{i}")
    got_j = await collect(cj, conv, len(bodies), 20)
    got_m = await collect(cm, conv, len(bodies), 20)
    assert got_j == got_m
    assert [f["body"] for f in got_j] == bodies
    assert all(isinstance(f["id"], str) and isinstance(f["conv"], str) for f in got_m)
    await cj.close()
    await cm.close()


# -- g. bad frames ------------------------------------------------------------------------


async def test_bad_frames_get_the_protocol_answer_and_others_are_unaffected(
    stack: Stack, g1: Proc, http: httpx.AsyncClient
) -> None:
    a = uid("a")
    conv = await create_group(http, stack, g1, a, [])
    bystander = await AgoraClient.connect(g1.ws_url, stack.token(a))
    await bystander.sub(conv)

    c = await AgoraClient.connect(g1.ws_url, stack.token(a))
    # Field errors: err with the rid, connection stays open.
    cases: list[tuple[dict[str, Any], str]] = [
        ({"t": "send", "conv": conv, "body": "no cid"}, "bad_request"),
        ({"t": "send", "conv": conv, "cid": "c", "body": 7}, "bad_request"),
        ({"t": "send", "conv": conv, "cid": "c", "body": "x" * 4001}, "too_large"),
        ({"t": "sub", "conv": 12345}, "bad_request"),
        ({"t": "sub"}, "bad_request"),
    ]
    for frame, code in cases:
        with pytest.raises(ServerError) as info:
            await c.request(frame)
        assert info.value.code == code, frame
        assert isinstance(info.value.frame["rid"], int)
    assert (await c.ping())["t"] == "pong"

    async def closes_with(raw: str | bytes, encoding: str = "json") -> int | None:
        x = await AgoraClient.connect(g1.ws_url, stack.token(a), encoding)
        await x.send_raw(raw)
        await asyncio.wait_for(x.closed.wait(), 10)
        return x.close_code

    assert await closes_with("{not json") == 4002
    assert await closes_with('{"t": "dance"}') == 4002
    assert await closes_with("[1, 2]") == 4002
    assert await closes_with(b"\x00\x01binary on json") == 4002
    assert await closes_with(b"\xc1", "msgpack") == 4002
    too_big = '{"t":"ping","pad":"' + "x" * (stack.settings.max_frame_bytes + 10) + '"}'
    assert await closes_with(too_big) == 1009

    # Everyone else keeps working.
    await c.send(conv, "still here", cid="after-bad")
    got = await collect(bystander, conv, 1, 10)
    assert got and got[0]["body"] == "still here"
    await c.close()
    await bystander.close()


# -- f. a fan-out worker dies mid-stream --------------------------------------------------


async def test_fanout_worker_sigkill_mid_stream_loses_nothing(
    stack: Stack, g1: Proc, g2: Proc, http: httpx.AsyncClient, pools: ShardPools
) -> None:
    convs = 8
    pairs = [(uid("a"), uid("b")) for _ in range(convs)]
    ids = await asyncio.gather(*(create_group(http, stack, g1, a, [b]) for a, b in pairs))
    senders, readers = [], []
    for conv, (a, b) in zip(ids, pairs, strict=True):
        s = await AgoraClient.connect(g1.ws_url, stack.token(a))
        r = await AgoraClient.connect(g2.ws_url, stack.token(b))
        await r.sub(conv)
        senders.append(s)
        readers.append(r)
    acked: dict[str, list[str]] = defaultdict(list)
    per_conv = 150

    async def send_all(i: int) -> None:
        for j in range(per_conv):
            ack = await senders[i].send(ids[i], f"m{j}", cid=f"k{j}")
            acked[ids[i]].append(ack["id"])
            await asyncio.sleep(0.005)

    workers = [p for p in stack.procs if p.name.startswith("chat-f") and p.alive()]
    victim = workers[0]

    async def kill_soon() -> None:
        # Mid-stream: once a fair share is acked, with most of it still to come.
        deadline = time.monotonic() + 60
        while sum(map(len, acked.values())) < convs * per_conv // 5:
            assert time.monotonic() < deadline, "nothing acked within 60 s"
            await asyncio.sleep(0.01)
        victim.kill()
        print(f"killed {victim.name} (pid {victim.popen.pid})")

    receive = [collect(readers[i], ids[i], per_conv, 90) for i in range(convs)]
    _, _, streams = await asyncio.gather(
        asyncio.gather(*(send_all(i) for i in range(convs))),
        kill_soon(),
        asyncio.gather(*receive),
    )
    stack.fanout(f"chat-f{len(stack.procs) + 1}")  # back to two workers for later tests
    total_acked = sum(len(v) for v in acked.values())
    delivered = sum(len(s) for s in streams)
    print(f"sent {convs * per_conv}, acked {total_acked}, delivered {delivered}")
    for i, frames in enumerate(streams):
        check_stream(frames, per_conv, f"conv {ids[i]}")
        assert [f["id"] for f in frames] == acked[ids[i]]
        stored = await messages.after(pools, int(ids[i]), 0, 1000)
        assert [m.seq for m in stored] == list(range(1, per_conv + 1))
        assert [str(m.id) for m in stored] == acked[ids[i]]
    for x in senders + readers:
        await x.close()


# -- heartbeats and admission -------------------------------------------------------------


async def test_dead_connections_are_closed_after_two_heartbeats(settings: Settings) -> None:
    s = Stack(settings, extra_env={"AGORA_HEARTBEAT_MS": "1000"})
    try:
        g = s.gateway("hb-g")
        from websockets.asyncio.client import connect

        # ping_interval=None and no reads: the client never answers the server's pings.
        ws = await connect(
            g.ws_url,
            additional_headers={"Authorization": f"Bearer {s.token('sleepy')}"},
            ping_interval=None,
        )
        hello = await ws.recv()
        assert "hello" in str(hello)
        ws.protocol.max_size = None
        # Stop answering: pause reading so pongs are never sent.
        ws.transport.pause_reading()
        started = time.monotonic()
        # Until the server has given up on it (two unanswered pings, then a 1011 close
        # frame that waits, unread, in this client's socket).
        await wait_close_counted(g, 1011, 30)
        ws.transport.resume_reading()
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
        print(f"closed after {time.monotonic() - started:.1f}s with {ws.close_code}")
        assert ws.state.name == "CLOSED" and ws.close_code == 1011
    finally:
        s.stop_all()


async def test_node_at_capacity_refuses_upgrades_with_503(settings: Settings) -> None:
    s = Stack(settings, extra_env={"AGORA_MAX_CONNECTIONS": "2"})
    try:
        g = s.gateway("cap-g")
        a = await AgoraClient.connect(g.ws_url, s.token("cap1"))
        b = await AgoraClient.connect(g.ws_url, s.token("cap2"))
        with pytest.raises(InvalidStatus) as info:
            await AgoraClient.connect(g.ws_url, s.token("cap3"))
        assert info.value.response.status_code == 503
        assert int(info.value.response.headers["Retry-After"]) >= 1
        assert (await a.ping())["t"] == "pong"  # existing connections keep working
        await a.close()
        # Until the node has let go of `a` (its slot frees when the socket is closed).
        deadline = time.monotonic() + 10
        while await metric(g, "agora_connections") > 1:
            assert time.monotonic() < deadline, "a closed connection still counted"
            await asyncio.sleep(0.05)
        c = await AgoraClient.connect(g.ws_url, s.token("cap3"))
        await b.close()
        await c.close()
    finally:
        s.stop_all()


# -- typing, user-addressed frames, the HTTP side of conversations ------------------------


async def test_typing_reaches_other_members_and_is_never_stored(
    stack: Stack, g1: Proc, g2: Proc, http: httpx.AsyncClient, pools: ShardPools
) -> None:
    a, b = uid("a"), uid("b")
    conv = await create_group(http, stack, g1, a, [b])
    ca = await AgoraClient.connect(g1.ws_url, stack.token(a))
    cb = await AgoraClient.connect(g2.ws_url, stack.token(b))
    await ca.sub(conv)
    await cb.sub(conv)
    await ca.typing(conv)
    frame = await cb.next_event("typing", timeout=5)
    assert frame == {"t": "typing", "conv": conv, "user": a}
    with pytest.raises(TimeoutError):
        await ca.next_event("typing", timeout=0.5)  # not echoed to the typist
    assert await messages.after(pools, int(conv), 0, 10) == []
    await ca.close()
    await cb.close()


async def test_a_frame_for_the_user_sent_right_after_hello_reaches_the_connection(
    stack: Stack, g1: Proc, http: httpx.AsyncClient, redis_client: aioredis.Redis
) -> None:
    """hello goes out once the connection is registered. Redis holds every write for a
    moment (the node's registration of the user's route among them, not the reads that
    find a user's nodes): a client with its hello, added to a group at once, gets joined."""
    a, b = uid("a"), uid("b")
    await redis_client.execute_command("CLIENT", "PAUSE", 500, "WRITE")
    try:
        cb = await AgoraClient.connect(g1.ws_url, stack.token(b))
        conv = await create_group(http, stack, g1, a, [b])
    finally:
        await redis_client.execute_command("CLIENT", "UNPAUSE")
    joined = await cb.next_event("joined", timeout=5)
    assert joined["conv"]["id"] == conv and b in joined["conv"]["members"]
    await cb.close()


async def test_joined_frames_reach_every_connection_of_the_added_user(
    stack: Stack, g1: Proc, g2: Proc, http: httpx.AsyncClient
) -> None:
    a, b, c = uid("a"), uid("b"), uid("c")
    b1 = await AgoraClient.connect(g1.ws_url, stack.token(b))
    b2 = await AgoraClient.connect(g2.ws_url, stack.token(b))
    # `hello` comes before a session's user route is registered, and `joined` goes only
    # where the route says: a request is answered once the session is registered.
    for client in (b1, b2):
        assert (await client.ping())["t"] == "pong"
    conv = await create_group(http, stack, g1, a, [b])
    for client in (b1, b2):
        joined = await client.next_event("joined", timeout=5)
        assert joined["conv"]["id"] == conv and b in joined["conv"]["members"]
    cc = await AgoraClient.connect(g2.ws_url, stack.token(c))
    assert (await cc.ping())["t"] == "pong"  # registered (see above)
    r = await http.post(
        f"{g1.http_url}/v1/conversations/{conv}/members",
        json={"user": c},
        headers={"Authorization": f"Bearer {stack.token(a)}"},
    )
    assert r.status_code == 204
    joined = await cc.next_event("joined", timeout=5)
    assert joined["conv"]["id"] == conv and c in joined["conv"]["members"]
    assert (await cc.sub(conv))["t"] == "subbed"  # and may now subscribe
    for client in (b1, b2, cc):
        await client.close()


async def test_http_conversations_list_get_members_history(
    stack: Stack, g1: Proc, g2: Proc, http: httpx.AsyncClient
) -> None:
    me, other, third = uid("me"), uid("o"), uid("t")
    hdr = {"Authorization": f"Bearer {stack.token(me)}"}
    convs = [await create_group(http, stack, g1, me, [other]) for _ in range(5)]
    r = await http.post(
        f"{g1.http_url}/v1/conversations", json={"kind": "direct", "members": [other]}, headers=hdr
    )
    assert r.status_code == 201 and r.json()["kind"] == "direct"
    direct = r.json()["id"]
    again = await http.post(
        f"{g2.http_url}/v1/conversations",
        json={"kind": "direct", "members": [me]},
        headers={"Authorization": f"Bearer {stack.token(other)}"},
    )
    assert again.status_code == 200 and again.json()["id"] == direct
    # Activity moves a conversation to the top of the list.
    c = await AgoraClient.connect(g1.ws_url, stack.token(me))
    for i in range(30):
        await c.send(convs[1], f"h{i}", cid=f"h{i}")
    deadline = time.monotonic() + 10
    while True:
        page = (await http.get(f"{g2.http_url}/v1/conversations?limit=2", headers=hdr)).json()
        top = page["items"][0]
        # Acked is not yet stored: wait until all 30 are (the list moves with the first).
        if (top["id"] == convs[1] and top["last_seq"] == 30) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert page["items"][0]["id"] == convs[1]
    seen = [x["id"] for x in page["items"]]
    while page["next"]:
        page = (
            await http.get(
                f"{g2.http_url}/v1/conversations?limit=2&cursor={page['next']}", headers=hdr
            )
        ).json()
        seen += [x["id"] for x in page["items"]]
    assert sorted(seen) == sorted([*convs, direct]) and len(seen) == 6
    one = (await http.get(f"{g1.http_url}/v1/conversations/{convs[1]}", headers=hdr)).json()
    assert one["members"] == sorted([me, other]) and one["last_seq"] == 30
    # History, newest first, keyset pages by seq, over both `cursor` and `before`.
    got: list[int] = []
    url = f"{g2.http_url}/v1/conversations/{convs[1]}/messages?limit=7"
    page = (await http.get(url, headers=hdr)).json()
    got += [m["seq"] for m in page["items"]]
    while page["next"]:
        page = (await http.get(f"{url}&cursor={page['next']}", headers=hdr)).json()
        got += [m["seq"] for m in page["items"]]
    assert got == list(range(30, 0, -1))
    before = (await http.get(f"{url}&before=5", headers=hdr)).json()
    assert [m["seq"] for m in before["items"]] == [4, 3, 2, 1] and before["next"] is None
    assert before["items"][0]["body"] == "h3" and before["items"][0]["from"] == me
    # Members: add (group only, members only), remove (self, or the creator removes).
    add = f"{g1.http_url}/v1/conversations/{convs[0]}/members"
    assert (await http.post(add, json={"user": third}, headers=hdr)).status_code == 204
    t_hdr = {"Authorization": f"Bearer {stack.token(third)}"}
    assert (
        await http.get(f"{g1.http_url}/v1/conversations/{convs[0]}", headers=t_hdr)
    ).status_code == 200
    o_hdr = {"Authorization": f"Bearer {stack.token(other)}"}
    r = await http.delete(f"{add}/{third}", headers=o_hdr)
    assert r.status_code == 403  # a plain member cannot remove someone else
    assert (await http.delete(f"{add}/{third}", headers=t_hdr)).status_code == 204  # leaves
    r = await http.get(f"{g1.http_url}/v1/conversations/{convs[0]}", headers=t_hdr)
    assert r.status_code == 404
    assert (await http.delete(f"{add}/{third}", headers=hdr)).status_code == 404
    r = await http.post(
        f"{g1.http_url}/v1/conversations/{direct}/members", json={"user": third}, headers=hdr
    )
    assert r.status_code == 403  # direct conversations have exactly two members
    await c.close()


async def test_a_pipelining_client_is_bounded_but_stays_connected(
    stack: Stack, g1: Proc, http: httpx.AsyncClient
) -> None:
    a = uid("a")
    conv = await create_group(http, stack, g1, a, [])
    c = await AgoraClient.connect(g1.ws_url, stack.token(a))
    results = await asyncio.gather(
        *(c.send(conv, f"p{i}", cid=f"p{i}") for i in range(600)), return_exceptions=True
    )
    acked = [r for r in results if isinstance(r, dict)]
    refused = [r for r in results if isinstance(r, ServerError)]
    print(f"600 pipelined sends: acked {len(acked)}, refused {len(refused)}")
    assert len(acked) + len(refused) == 600 and acked
    assert all(r.code == "rate_limited" and r.frame["retry_after_ms"] > 0 for r in refused)
    assert (await c.ping())["t"] == "pong" and not c.closed.is_set()
    await c.close()
