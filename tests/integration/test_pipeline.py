"""A connection's pipelined sends (gateway/ws.py, gateway/sendorder.py) on the real engines:
handled concurrently, stored in the order they were sent, failures answered in place,
the in-flight limit still refusing.

Frames are written one after another without waiting for replies (the client's own
`request` would send them from concurrent tasks, in no promised order), and the replies
are read by `rid` as they come, in whatever order the server answers.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from agora_client import AgoraClient
from core.settings import Settings
from gateway.protocol.frames import MAX_BODY_CHARS
from gateway.ws import MAX_PENDING_REQUESTS
from storage.pools import ShardPools
from tests.integration.helpers import create_group, metric, uid, wait_stored
from tests.stack import Proc, Stack

pytestmark = pytest.mark.engines


# Every test runs twice: through the gateway's own produce line (the default) and through
# aiokafka's producer alone (AGORA_KAFKA_PRODUCE_LINE=false), so order and failures in
# place hold on both produce paths.
@pytest.fixture(scope="module", params=["line", "aiokafka"])
def stack(settings: Settings, request: pytest.FixtureRequest) -> Iterator[Stack]:
    line = "true" if request.param == "line" else "false"
    s = Stack(
        settings,
        extra_env={"AGORA_PIPELINE_SENDS": "true", "AGORA_KAFKA_PRODUCE_LINE": line},
    )
    try:
        s.gateway("pipe-g1")
        s.fanout("pipe-f1")
        yield s
    finally:
        s.stop_all()


BASE_RID = 10_000


async def write(c: AgoraClient, frames: list[dict[str, Any]]) -> None:
    """Write `frames` back to back (rids from BASE_RID on, in list order)."""
    for i, f in enumerate(frames):
        await c.send_raw(c.encode({**f, "rid": BASE_RID + i}))


async def read(c: AgoraClient, replies: dict[int, dict[str, Any]], until: int) -> None:
    """Read replies (by list index) into `replies` until it holds `until` of them."""
    while len(replies) < until:
        frame = await c.next_event(timeout=30)
        if frame.get("t") in ("ack", "err") and isinstance(frame.get("rid"), int):
            assert frame["rid"] - BASE_RID not in replies, frame
            replies[frame["rid"] - BASE_RID] = frame


async def pipeline(c: AgoraClient, frames: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Write `frames` back to back, then read every reply; the replies by list index."""
    await write(c, frames)
    replies: dict[int, dict[str, Any]] = {}
    await read(c, replies, len(frames))
    return replies


def send(conv: str, cid: str, body: str | None = None) -> dict[str, Any]:
    return {"t": "send", "conv": conv, "cid": cid, "body": body or cid}


async def test_pipelined_sends_are_stored_in_the_order_sent(
    stack: Stack, g1: Proc, http: httpx.AsyncClient, pools: ShardPools
) -> None:
    a = uid("a")
    convs = [await create_group(http, stack, g1, a, []) for _ in range(3)]
    c = await AgoraClient.connect(g1.ws_url, stack.token(a))
    through_line = await metric(g1, "agora_produce_line_records_total")
    # One conversation, then three interleaved: 200 sends each, none waiting for an ack.
    for targets in ([convs[0]], convs):
        tag = uid("p")
        frames = [send(targets[i % len(targets)], f"{tag}-{i}") for i in range(200)]
        replies = await pipeline(c, frames)
        arrival = list(replies)  # dicts keep insertion order: the order replies came in
        out_of_order = sum(1 for x, y in itertools.pairwise(arrival) if y < x)
        assert all(r["t"] == "ack" for r in replies.values()), replies
        for conv in targets:
            sent = [f["cid"] for f in frames if f["conv"] == conv]
            stored = await wait_stored(pools, conv, len(sent), 30, fence=sent[-1])
            mine = [m for m in stored if m.cid.startswith(tag)]
            print(f"{len(targets)} conversation(s), conv {conv}: {len(mine)} stored")
            assert [m.cid for m in mine] == sent  # seq order == send order
            assert [m.seq for m in mine] == sorted(m.seq for m in mine)
            acked = {replies[i]["cid"]: replies[i]["id"] for i, f in enumerate(frames)}
            assert [acked[m.cid] for m in mine] == [str(m.id) for m in mine]
        print(f"replies out of rid order: {out_of_order} (allowed)")
    # The path the parameter chose is the one the records took.
    through_line = await metric(g1, "agora_produce_line_records_total") - through_line
    if stack.extra_env["AGORA_KAFKA_PRODUCE_LINE"] == "true":
        assert through_line >= 400
    else:
        assert through_line == 0
    # Any other request waits for the sends before it: its reply comes after their acks.
    tag = uid("q")
    for i in range(20):
        await c.send_raw(c.encode({**send(convs[0], f"{tag}-{i}"), "rid": 50_000 + i}))
    pong = await c.ping()
    assert pong["t"] == "pong"
    acks = [c.events.get_nowait() for _ in range(c.events.qsize())]
    assert sorted(f["rid"] for f in acks if f.get("t") == "ack") == list(range(50_000, 50_020))
    await c.close()


async def test_failures_in_the_middle_are_answered_and_the_rest_go_through_in_order(
    stack: Stack, g1: Proc, http: httpx.AsyncClient, pools: ShardPools
) -> None:
    a, other = uid("a"), uid("o")
    conv = await create_group(http, stack, g1, a, [])
    second = await create_group(http, stack, g1, a, [])
    elsewhere = await create_group(http, stack, g1, other, [])  # a is not a member
    c = await AgoraClient.connect(g1.ws_url, stack.token(a))
    tag = uid("f")
    frames: list[dict[str, Any]] = []
    expect: dict[int, str] = {}  # index -> "ack" or the err code
    for i in range(60):
        if i % 10 == 3:
            frames.append(send(elsewhere, f"{tag}-x{i}"))
            expect[len(frames) - 1] = "not_found"
        elif i % 10 == 5:
            frames.append(send(conv, f"{tag}-long{i}", "y" * (MAX_BODY_CHARS + 1)))
            expect[len(frames) - 1] = "too_large"
        elif i % 10 == 7:
            frames.append(send(conv, f"{tag}-{i - 1}"))  # the previous send's cid again
            expect[len(frames) - 1] = "ack"
        elif i % 10 == 9:
            frames.append(send(second, f"{tag}-{i - 3}"))  # a cid used in conv: conflict
            expect[len(frames) - 1] = "conflict"
        else:
            frames.append(send(conv, f"{tag}-{i}"))
            expect[len(frames) - 1] = "ack"
    replies = await pipeline(c, frames)
    got = {i: r["t"] if r["t"] == "ack" else r["code"] for i, r in replies.items()}
    print(f"outcomes: {sorted(got.items())}")
    assert got == expect
    firsts = {f["cid"]: i for i, f in reversed(list(enumerate(frames)))}
    for i, f in enumerate(frames):
        if got[i] == "ack" and firsts[f["cid"]] != i:  # a duplicate: the first one's id
            assert replies[i]["id"] == replies[firsts[f["cid"]]]["id"], (i, replies[i])
    sent = []
    for i, f in enumerate(frames):
        if got[i] == "ack" and f["cid"] not in sent:
            sent.append(f["cid"])
    stored = await wait_stored(pools, conv, len(sent), 30, fence=sent[-1])
    print(f"stored {len(stored)} of {len(sent)} distinct cids acked")
    assert [m.cid for m in stored] == sent  # each once, in send order
    assert not await wait_stored(pools, elsewhere, 0, 5)  # nothing went where a is no member
    assert not await wait_stored(pools, second, 0, 5)  # nor under a conflicting cid
    await c.close()


async def test_the_in_flight_limit_still_refuses_beyond_it(
    stack: Stack, g1: Proc, http: httpx.AsyncClient, pools: ShardPools, settings: Settings
) -> None:
    a = uid("a")
    conv = await create_group(http, stack, g1, a, [])
    c = await AgoraClient.connect(g1.ws_url, stack.token(a))
    await c.send(conv, "warm", cid="warm")  # the membership is cached from here on
    extra = 40
    tag = uid("l")
    frames = [send(conv, f"{tag}-{i}") for i in range(MAX_PENDING_REQUESTS + extra)]
    replies: dict[int, dict[str, Any]] = {}
    redis = aioredis.Redis.from_url(settings.redis_url)
    try:
        # Every claim waits while Redis takes no writes (a bounded pause, well under the
        # send path's Redis timeout): the sends stay in flight, so exactly the limit's
        # worth is taken and the rest are refused at once.
        await redis.execute_command("CLIENT", "PAUSE", "4000", "WRITE")
        await write(c, frames)
        await read(c, replies, extra)
        assert all(r["t"] == "err" for r in replies.values()), replies
    finally:
        await redis.execute_command("CLIENT", "UNPAUSE")
        await redis.aclose()
    await read(c, replies, len(frames))
    refused = [i for i, r in replies.items() if r["t"] == "err"]
    print(f"{len(frames)} pipelined sends while Redis paused: {len(refused)} refused")
    assert all(replies[i]["code"] == "rate_limited" for i in refused)
    assert all(replies[i]["retry_after_ms"] == 100 for i in refused)
    assert sorted(refused) == list(range(MAX_PENDING_REQUESTS, len(frames)))
    sent = [f["cid"] for f in frames[:MAX_PENDING_REQUESTS]]
    stored = await wait_stored(pools, conv, len(sent) + 1, 30, fence=sent[-1])
    assert [m.cid for m in stored] == ["warm", *sent]  # the claims raced; the order held
    await c.close()
