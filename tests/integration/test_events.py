"""Edit, delete, react and reply end to end: two gateways, two fan-out workers, the real
engines. Each change is an event with its own seq: `sub since` replays it, HTTP history
shows the current state, and the two agree."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from agora_client import AgoraClient, ServerError
from agora_client.timeline import Timeline
from core.settings import Settings
from storage.pools import ShardPools
from tests.integration.helpers import auth, collect, create_group, uid
from tests.stack import Proc, Stack

pytestmark = pytest.mark.engines


@pytest.fixture(scope="module")
def stack(settings: Settings) -> Iterator[Stack]:
    s = Stack(settings)
    try:
        s.gateway("ev-g1")
        s.gateway("ev-g2")
        s.fanout("ev-f1")
        s.fanout("ev-f2")
        yield s
    finally:
        s.stop_all()


async def history(
    http: httpx.AsyncClient, stack: Stack, node: Proc, user: str, conv: str
) -> dict[str, Any]:
    r = await http.get(
        f"{node.http_url}/v1/conversations/{conv}/messages?limit=100", headers=auth(stack, user)
    )
    assert r.status_code == 200, r.text
    page: dict[str, Any] = r.json()
    return page


async def settled(
    http: httpx.AsyncClient, stack: Stack, node: Proc, client: AgoraClient, user: str, conv: str
) -> dict[str, Any]:
    """History once everything acked so far is stored: a marker sent after it (same
    conversation, so the same partition, sequenced after it) shows up in history."""
    marker = (await client.send(conv, "marker"))["id"]
    for _ in range(400):
        page = await history(http, stack, node, user, conv)
        if any(m["id"] == marker for m in page["items"]):
            return page
        await asyncio.sleep(0.05)
    raise AssertionError("the marker was never stored")


async def wait_seq(client: AgoraClient, conv: str, seq: int, timeout: float = 20) -> list[Any]:
    """Every msg frame of conv until one with `seq` arrives."""
    got: list[dict[str, Any]] = []
    while not got or got[-1]["seq"] < seq:
        frames = await collect(client, conv, 1, timeout)
        assert frames, f"no msg up to seq {seq}; got {[f['seq'] for f in got]}"
        got.extend(frames)
    return got


async def test_edit_delete_react_reply_reach_the_other_gateway_and_history(
    stack: Stack, g1: Proc, g2: Proc, http: httpx.AsyncClient, pools: ShardPools
) -> None:
    a, b = uid("a"), uid("b")
    conv = await create_group(http, stack, g1, a, [b])
    ca = await AgoraClient.connect(g1.ws_url, stack.token(a))
    cb = await AgoraClient.connect(g2.ws_url, stack.token(b), "msgpack")
    await ca.sub(conv)
    await cb.sub(conv)
    first = await ca.send(conv, "secret first draft", cid="m1")
    edit = await ca.edit(conv, first["id"], "second draft", cid="e1")  # right after its ack
    again = await ca.edit(conv, first["id"], "second draft", cid="e1")
    assert again["id"] == edit["id"]  # idempotent by cid
    reply = await cb.send(conv, "an answer", cid="r1", reply_to=first["id"])
    await cb.react(conv, first["id"], "👍", cid="x1")
    await ca.react(conv, first["id"], "👍", cid="x2")
    await cb.react(conv, first["id"], "👍", remove=True, cid="x3")
    frames = await wait_seq(cb, conv, 6)
    kinds = [(f["seq"], f["kind"]) for f in frames]
    print("b saw", kinds)
    assert kinds == [
        (1, "text"),
        (2, "edit"),
        (3, "text"),
        (4, "react"),
        (5, "react"),
        (6, "unreact"),
    ]
    assert frames[1]["ref"] == first["id"] and frames[1]["body"] == "second draft"
    assert frames[2]["reply_to"] == first["id"] and frames[2]["id"] == reply["id"]
    assert frames[3]["body"] == "👍" and frames[3]["from"] == b

    # Only the sender edits or deletes; a reaction that changes nothing is not an event.
    with pytest.raises(ServerError) as exc:
        await cb.edit(conv, first["id"], "hijacked")
    assert exc.value.code == "forbidden"
    with pytest.raises(ServerError) as exc:
        await cb.delete(conv, first["id"])
    assert exc.value.code == "forbidden"
    await ca.react(conv, first["id"], "👍", cid="x4")  # a already has 👍: refused quietly

    page = await history(http, stack, g2, b, conv)
    by_id = {m["id"]: m for m in page["items"]}
    assert [m["kind"] for m in page["items"]] == ["text", "text"]  # events are not items
    assert by_id[first["id"]]["body"] == "second draft" and by_id[first["id"]]["edited"]
    assert by_id[first["id"]]["reactions"] == {"👍": 1}
    assert by_id[first["id"]]["my_reactions"] == []
    assert by_id[reply["id"]]["reply_to"] == first["id"]
    assert page["last_seq"] == 6

    deleted = await ca.delete(conv, first["id"], cid="d1")
    frames = await wait_seq(cb, conv, 7)
    assert frames[-1]["kind"] == "delete" and frames[-1]["ref"] == first["id"]
    assert frames[-1]["id"] == deleted["id"]
    # The text is gone from storage: the message's and its edit's.
    async with pools.connection(pools.for_id(int(conv))) as pg:
        leftovers = await pg.fetchval(
            "SELECT count(*) FROM messages WHERE conv_id = $1 AND body LIKE '%draft%'", int(conv)
        )
        refused = await pg.fetchval(
            "SELECT count(*) FROM refused_events WHERE conv_id = $1", int(conv)
        )
    assert leftovers == 0
    assert refused == 1  # x4
    page = await history(http, stack, g1, a, conv)
    tomb = {m["id"]: m for m in page["items"]}[first["id"]]
    assert tomb["deleted"] and tomb["body"] == "" and tomb["reactions"] == {}
    with pytest.raises(ServerError) as exc:
        await ca.edit(conv, first["id"], "back from the dead")
    assert exc.value.code == "not_found"
    with pytest.raises(ServerError) as exc:
        await cb.react(conv, first["id"], "❤️")
    assert exc.value.code == "not_found"
    # A retry of the delete answers with the same event, though the target is gone now.
    assert (await ca.delete(conv, first["id"], cid="d1"))["id"] == deleted["id"]
    with pytest.raises(ServerError) as exc:
        await cb.send(conv, "to nothing", reply_to="123456789")
    assert exc.value.code == "not_found"
    await ca.close()
    await cb.close()


async def test_bad_event_frames_are_refused_and_the_connection_stays(
    stack: Stack, g1: Proc, http: httpx.AsyncClient
) -> None:
    a = uid("a")
    conv = await create_group(http, stack, g1, a, [])
    ca = await AgoraClient.connect(g1.ws_url, stack.token(a))
    m = await ca.send(conv, "hello")
    bad = [
        {"t": "edit", "conv": conv, "cid": "c", "ref": m["id"], "body": ""},
        {"t": "edit", "conv": conv, "cid": "c", "body": "x"},
        {"t": "delete", "conv": conv, "ref": m["id"]},
        {"t": "react", "conv": conv, "cid": "c", "ref": m["id"], "emoji": "a b"},
        {"t": "react", "conv": conv, "cid": "c", "ref": m["id"], "emoji": "x" * 33},
        {"t": "react", "conv": conv, "cid": "c", "ref": m["id"], "emoji": "y", "remove": 1},
        {"t": "send", "conv": conv, "cid": "c", "body": "x", "reply_to": 5},
    ]
    for frame in bad:
        with pytest.raises(ServerError) as exc:
            await ca.request(frame)
        assert exc.value.code == "bad_request", frame
    assert (await ca.ping())["t"] == "pong"
    r = await httpx.AsyncClient().patch(
        f"{g1.http_url}/v1/conversations/{conv}/messages/{m['id']}",
        json={"cid": "p", "body": ""},
        headers=auth(stack, a),
    )
    assert r.status_code == 422
    await ca.close()


async def test_edit_delete_race_replayed_by_sub_since_matches_history(
    stack: Stack, g1: Proc, g2: Proc, http: httpx.AsyncClient
) -> None:
    """Two devices of the sender edit and delete the same messages concurrently while a
    reader is away; its `sub since` replay rebuilds exactly what history shows."""
    a, b = uid("a"), uid("b")
    conv = await create_group(http, stack, g1, a, [b])
    d1 = await AgoraClient.connect(g1.ws_url, stack.token(a))
    d2 = await AgoraClient.connect(g2.ws_url, stack.token(a), "msgpack")
    reader = await AgoraClient.connect(g2.ws_url, stack.token(b))
    await reader.sub(conv)
    ids = [(await d1.send(conv, f"original {i}"))["id"] for i in range(10)]
    seen = await wait_seq(reader, conv, 10)
    timeline = Timeline(b)
    for f in seen:
        timeline.apply(f)
    await reader.close()  # away while the race runs

    rng = random.Random(7)
    outcomes: dict[str, int] = {"acked": 0, "not_found": 0}

    async def device(client: AgoraClient, name: str) -> None:
        for step in range(30):
            ref = rng.choice(ids)
            try:
                if rng.random() < 0.15:
                    await client.delete(conv, ref)
                else:
                    await client.edit(conv, ref, f"{name} edit {step}")
                outcomes["acked"] += 1
            except ServerError as exc:
                assert exc.code == "not_found", exc.frame  # deleted meanwhile
                outcomes["not_found"] += 1

    async def reacting(user: str) -> None:
        c = await AgoraClient.connect(g1.ws_url, stack.token(user))
        for _ in range(15):
            try:
                await c.react(conv, rng.choice(ids), rng.choice("😀👍"), remove=rng.random() < 0.3)
            except ServerError as exc:
                assert exc.code == "not_found"
        await c.close()

    await asyncio.gather(device(d1, "d1"), device(d2, "d2"), reacting(b), reacting(a))
    print("race outcomes", outcomes)
    page = await settled(http, stack, g1, d1, b, conv)
    latest = page["last_seq"]
    reader = await AgoraClient.connect(g1.ws_url, stack.token(b), "msgpack")
    replay_done = asyncio.ensure_future(collect(reader, conv, latest - timeline.seq, 30))
    subbed = await reader.sub(conv, since=timeline.seq)
    replayed = await replay_done
    assert subbed["recovered"] is True
    seqs = [f["seq"] for f in replayed]
    assert seqs == list(range(11, latest + 1)), "replay must be gap-free and in order"
    for f in replayed:
        timeline.apply(f)

    from_http = Timeline(b)
    from_http.load_page(page)
    assert timeline.snapshot() == from_http.snapshot()
    deleted = [i for i, it in from_http.items.items() if it.deleted]
    print(f"{latest} seqs, {len(deleted)} deleted, replay matched history")
    for client in (d1, d2, reader):
        await client.close()


async def test_reactions_counted_exactly_under_concurrent_users(
    stack: Stack, g1: Proc, g2: Proc, http: httpx.AsyncClient, pools: ShardPools
) -> None:
    owner = uid("o")
    users = [uid("u") for _ in range(24)]
    conv = await create_group(http, stack, g1, owner, users)
    co = await AgoraClient.connect(g1.ws_url, stack.token(owner))
    watcher = await AgoraClient.connect(g2.ws_url, stack.token(owner))
    await watcher.sub(conv)
    target = (await co.send(conv, "react to me"))["id"]
    clients = [
        await AgoraClient.connect((g1 if i % 2 else g2).ws_url, stack.token(u))
        for i, u in enumerate(users)
    ]

    async def storm(i: int, client: AgoraClient) -> None:
        # Every user adds 👍 three times at once (one counts), half also ❤️ then take it back.
        await asyncio.gather(*(client.react(conv, target, "👍") for _ in range(3)))
        if i % 2:
            await client.react(conv, target, "❤️")
            await client.react(conv, target, "❤️", remove=True)
        if i % 3 == 0:
            await client.react(conv, target, "🎉")

    await asyncio.gather(*(storm(i, c) for i, c in enumerate(clients)))
    expected = {"👍": len(users), "🎉": len(range(0, len(users), 3))}
    page = await settled(http, stack, g2, co, users[0], conv)
    got = {m["id"]: m for m in page["items"]}[target]
    print("counts", got["reactions"], "expected", expected, "last_seq", page["last_seq"])
    assert got["reactions"] == expected
    assert got["my_reactions"] == ["👍", "🎉"]
    async with pools.connection(pools.for_id(int(conv))) as pg:
        rows = await pg.fetchval(
            "SELECT count(*) FROM reactions WHERE message_id = $1", int(target)
        )
    assert rows == sum(expected.values())
    # Counting the delivered events gives the same totals: each moved a count by one.
    live = Timeline(owner)
    for f in await wait_seq(watcher, conv, page["last_seq"]):
        live.apply(f)
    assert live.items[target].reactions == expected
    for c in (co, watcher, *clients):
        await c.close()


async def test_http_edit_delete_react_and_reply(
    stack: Stack, g1: Proc, g2: Proc, http: httpx.AsyncClient
) -> None:
    a, b = uid("a"), uid("b")
    conv = await create_group(http, stack, g1, a, [b])
    base = f"{g2.http_url}/v1/conversations/{conv}/messages"
    r = await http.post(base, json={"cid": "h1", "body": "over http"}, headers=auth(stack, a))
    mid = r.json()["id"]
    r = await http.post(
        base, json={"cid": "h2", "body": "re", "reply_to": mid}, headers=auth(stack, b)
    )
    assert r.status_code == 202, r.text
    r = await http.patch(f"{base}/{mid}", json={"cid": "h3", "body": "x"}, headers=auth(stack, b))
    assert r.status_code == 403
    r = await http.patch(
        f"{base}/{mid}", json={"cid": "h3", "body": "edited"}, headers=auth(stack, a)
    )
    assert r.status_code == 202, r.text
    r = await http.post(
        f"{base}/{mid}/reactions", json={"cid": "h4", "emoji": "🔥"}, headers=auth(stack, b)
    )
    assert r.status_code == 202, r.text
    r = await http.post(
        f"{base}/{mid}/reactions", json={"cid": "h5", "emoji": ""}, headers=auth(stack, b)
    )
    assert r.status_code == 422
    for _ in range(100):  # stored asynchronously: poll until the state shows
        page = await history(http, stack, g1, b, conv)
        item = {m["id"]: m for m in page["items"]}[mid]
        if item["reactions"] and item["edited"]:
            break
        await asyncio.sleep(0.05)
    assert item["body"] == "edited" and item["reactions"] == {"🔥": 1}
    assert item["my_reactions"] == ["🔥"]
    first = await http.delete(f"{base}/{mid}", headers=auth(stack, a))
    second = await http.delete(f"{base}/{mid}", headers=auth(stack, a))
    assert first.status_code == second.status_code == 202, second.text
    assert first.json()["id"] == second.json()["id"]  # the derived cid: one delete
    r = await http.delete(f"{base}/{mid}", headers=auth(stack, b))
    assert r.status_code in (403, 404)
