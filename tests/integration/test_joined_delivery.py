"""Several messages of one conversation dispatched together (one pub/sub delivery carrying
them, or several deliveries read from pub/sub at once) go out in one write per subscriber
socket, as separate frames in order; a subscriber the joined write does not fit (a paused
socket, one the write would take past its high-water mark, one not expecting the first of
them) gets them one by one exactly as before, slow-consumer counting included.

A node as gateway.app composes it, with real Redis and PostgreSQL; its connections' links
are recording sockets (what is written, and how: the number of writes is under test).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import redis.asyncio as aioredis

from core.settings import Settings
from fanout.envelope import Delivery, encode_delivery
from gateway.connection import Connection
from gateway.node import Node
from gateway.protocol import codec, frames
from gateway.protocol.codec import Codec
from gateway.protocol.frames import CloseCode
from gateway.protocol.messages import message_frame
from gateway.transport import WRITE_HIGH_WATER
from storage import conversations
from storage.ids import IdGenerator
from storage.models import Message
from storage.pools import ShardPools
from storage.redis_client import make_lease_redis, make_redis
from storage.redis_keys import RedisKeys
from tests.integration.helpers import store_texts, uid

pytestmark = pytest.mark.engines


class Socket:
    """A connection's link that records every write (one entry per write call) but the
    presence frames the node sends on its own as members come online."""

    def __init__(self, buffered: int = 0) -> None:
        self.paused = False
        self.idle = 0
        self.writes: list[bytes] = []
        self.closes: list[int] = []
        self.wrote = asyncio.Event()
        self._buffered = buffered

    def write(self, data: bytes) -> None:
        if b"presence" not in data:  # a frame of its own, never joined with messages
            self.writes.append(data)
            self.wrote.set()

    def buffered(self) -> int:
        return self._buffered

    def ping(self) -> None:
        pass

    def send_close(self, code: int, reason: str) -> None:
        self.closes.append(code)


@dataclass
class Room:
    node: Node
    conv: int
    owner: str
    members: list[str]


@pytest.fixture
async def room(settings: Settings, pools: ShardPools, ids: IdGenerator) -> AsyncIterator[Room]:
    redis, lease_redis = make_redis(settings), make_lease_redis(settings)
    node = Node(settings, uid("joined-node"), redis, pools, lease_redis)
    members = [uid("jm") for _ in range(4)]
    conv = (await conversations.create_group(pools, ids, members[0], members[1:], "joined")).id
    await node.start()
    try:
        yield Room(node, conv, members[0], members)
    finally:
        await node.stop()
        await lease_redis.aclose()
        await redis.aclose()


async def connect(
    room: Room, user: str, sock: Socket, enc: Codec = codec.JSON, max_frames: int = 100
) -> Connection:
    conn = Connection(sock, enc, user, max_frames, 1 << 20)
    conn.on_close(room.node.detach)  # as gateway.ws wires it
    # Not attached (no user route, no presence): a presence frame to a paused socket would
    # count towards its slow-consumer limit at a time the test does not choose.
    await room.node.subscribe(conn, room.conv, None)
    sock.writes.clear()  # whatever subscribing wrote: only deliveries are under test
    return conn


async def store(pools: ShardPools, ids: IdGenerator, room: Room, n: int) -> list[Message]:
    return await store_texts(pools, ids, room.conv, room.owner, n)


def frames_of(enc: Codec, msgs: list[Message]) -> list[bytes]:
    return [enc.frame(message_frame(m)) for m in msgs]


async def test_consecutive_messages_go_out_in_one_write_per_socket_as_separate_frames(
    room: Room, pools: ShardPools, ids: IdGenerator
) -> None:
    # One delivery with three messages of the conversation (a fan-out batch): each socket
    # gets one write, the three frames in order, in its own encoding; every delivery is
    # counted, on the node and in the wire counters.
    socks = [Socket(), Socket(), Socket()]
    encs: list[Codec] = [codec.JSON, codec.JSON, codec.MSGPACK]
    conns = [
        await connect(room, room.members[i], s, e)
        for i, (s, e) in enumerate(zip(socks, encs, strict=True))
    ]
    msgs = await store(pools, ids, room, 3)
    before = room.node.deliveries
    frames_before = [c.wire.frames_out for c in conns]
    room.node.dispatch(Delivery(messages=msgs))
    for sock, enc in zip(socks, encs, strict=True):
        assert sock.writes == [b"".join(frames_of(enc, msgs))]
    assert room.node.deliveries - before == 9
    assert [c.wire.frames_out - n for c, n in zip(conns, frames_before, strict=True)] == [3] * 3
    assert all(c.subs[room.conv].last_seq == 3 for c in conns)
    # The next message, alone, takes the single-message path: one write of one frame.
    (m4,) = await store(pools, ids, room, 1)
    room.node.dispatch(Delivery(messages=[m4]))
    assert [s.writes[1:] for s in socks] == [frames_of(e, [m4]) for e in encs]


async def test_deliveries_dispatched_together_share_a_write_unless_something_comes_between(
    room: Room, pools: ShardPools, ids: IdGenerator
) -> None:
    # As the node dispatches what it read from pub/sub at once: the messages of the first
    # two deliveries share one write; a typing frame in the second ends the run, so the
    # third delivery's message follows it in a write of its own, order kept.
    sock = Socket()
    await connect(room, room.members[1], sock)
    msgs = await store(pools, ids, room, 4)
    typing = (room.conv, room.owner)
    room.node.dispatch_many(
        [
            Delivery(messages=msgs[:1]),
            Delivery(messages=msgs[1:3], typing=[typing]),
            Delivery(messages=msgs[3:]),
        ]
    )
    assert sock.writes == [
        b"".join(frames_of(codec.JSON, msgs[:3])),
        codec.JSON.frame(frames.typing(*typing)),
        *frames_of(codec.JSON, msgs[3:]),
    ]


async def test_a_paused_socket_gets_the_frames_one_by_one_and_is_closed_4009_past_its_limit(
    room: Room, pools: ShardPools, ids: IdGenerator
) -> None:
    # Paused (its buffer past the high-water mark): every frame counts towards the
    # slow-consumer limit as when frames came apart. Two frames allowed; the third closes
    # the connection with 4009 and is not written. The others get their one write.
    ok, slow = Socket(), Socket()
    await connect(room, room.members[1], ok)
    slow_conn = await connect(room, room.members[2], slow, max_frames=2)
    slow.paused = True
    msgs = await store(pools, ids, room, 3)
    room.node.dispatch(Delivery(messages=msgs))
    assert ok.writes == [b"".join(frames_of(codec.JSON, msgs))]
    assert slow.writes == frames_of(codec.JSON, msgs[:2])
    assert slow.closes == [CloseCode.SLOW_CONSUMER]
    assert slow_conn.close_code == CloseCode.SLOW_CONSUMER
    assert room.conv not in slow_conn.subs  # detached: nothing more is delivered to it
    (m4,) = await store(pools, ids, room, 1)
    room.node.dispatch(Delivery(messages=[m4]))
    assert len(slow.writes) == 2 and ok.writes[1:] == frames_of(codec.JSON, [m4])


async def test_a_socket_the_joined_write_would_take_past_its_high_water_mark_gets_them_apart(
    room: Room, pools: ShardPools, ids: IdGenerator
) -> None:
    # Not paused yet, but the joined write would cross the mark: written frame by frame,
    # so the transport would pause it between frames exactly as before.
    full = Socket(buffered=WRITE_HIGH_WATER - 10)
    conn = await connect(room, room.members[1], full)
    msgs = await store(pools, ids, room, 3)
    room.node.dispatch(Delivery(messages=msgs))
    assert full.writes == frames_of(codec.JSON, msgs)
    assert conn.close_code is None and conn.subs[room.conv].last_seq == 3


async def test_a_subscriber_not_expecting_the_first_gets_the_rest_one_by_one(
    room: Room, pools: ShardPools, ids: IdGenerator
) -> None:
    # `late` subscribes after seq 1 is stored (it starts at 1): of the run 1..3 it gets 2
    # and 3, one write each, the duplicate dropped; `early` gets all three in one write.
    early, late = Socket(), Socket()
    await connect(room, room.members[1], early)
    msgs = await store(pools, ids, room, 1)
    late_conn = await connect(room, room.members[2], late)
    assert late_conn.subs[room.conv].last_seq == 1
    msgs += await store(pools, ids, room, 2)
    room.node.dispatch(Delivery(messages=msgs))
    assert early.writes == [b"".join(frames_of(codec.JSON, msgs))]
    assert late.writes == frames_of(codec.JSON, msgs[1:])


async def test_deliveries_published_back_to_back_arrive_complete_and_in_order(
    room: Room, pools: ShardPools, ids: IdGenerator, settings: Settings
) -> None:
    # Through Redis: ten deliveries published in one pipeline reach the node's pub/sub
    # reader together; whatever it joins, the socket gets seq 1..10 once each, in order.
    sock = Socket()
    await connect(room, room.members[1], sock)
    msgs = await store(pools, ids, room, 10)
    channel = RedisKeys(settings.redis_prefix).node_channel(room.node.id)
    publisher = aioredis.Redis.from_url(settings.redis_url)
    try:
        async with publisher.pipeline(transaction=False) as pipe:
            for m in msgs:
                pipe.publish(channel, encode_delivery(Delivery(messages=[m])))
            await pipe.execute()
    finally:
        await publisher.aclose()
    want = b"".join(frames_of(codec.JSON, msgs))
    while b"".join(sock.writes) != want:
        assert len(b"".join(sock.writes)) < len(want), "more than the ten frames written"
        sock.wrote.clear()
        await asyncio.wait_for(sock.wrote.wait(), 10)


async def test_a_conversation_left_without_subscribers_mid_dispatch_keeps_no_writers(
    room: Room, pools: ShardPools, ids: IdGenerator
) -> None:
    # A run that is not consecutive (here a redelivered message after the two) goes out
    # message by message; its only subscriber is closed 4009 by the second, so the node
    # forgets the conversation. The third must not leave the conversation's writers
    # cached (an empty entry per such conversation, kept until someone subscribes again).
    slow = Socket()
    conn = await connect(room, room.members[1], slow, max_frames=1)
    slow.paused = True
    m1, m2 = await store(pools, ids, room, 2)
    room.node.dispatch(Delivery(messages=[m1, m2, m1]))
    assert slow.writes == frames_of(codec.JSON, [m1])
    assert conn.close_code == CloseCode.SLOW_CONSUMER
    assert room.conv not in room.node.conv_subs
    assert room.conv not in room.node._writers
