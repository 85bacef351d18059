"""gateway.transport over a real socket: the upgrade, RFC 6455 framing, the close handshake
and heartbeats, spoken byte by byte by a raw client (no WebSocket library in between)."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import jwt
import orjson
import pytest
import redis.asyncio as aioredis

from core.settings import Settings
from fanout.envelope import Delivery, encode_delivery
from fanout.sequencer import sequence
from gateway.transport import CLOSE_TIMEOUT_S
from storage import conversations, messages
from storage.ids import IdGenerator, now_ms, shard_of_id
from storage.models import NewMessage
from storage.pools import ShardPools
from storage.redis_keys import RedisKeys
from tests.faults import OwnRedis
from tests.integration.helpers import metric, rss_kib, uid
from tests.stack import Proc, Stack

KEY = base64.b64encode(os.urandom(16)).decode()


@pytest.fixture(scope="module")
def stack(settings: Settings) -> Iterator[Stack]:
    # A short heartbeat so a silent client is closed within seconds.
    s = Stack(settings, extra_env={"AGORA_HEARTBEAT_MS": "1000"})
    yield s
    s.stop_all()


LOG_START: dict[str, int] = {}


@pytest.fixture(scope="module")
def g(stack: Stack) -> Proc:
    proc = stack.gateway("transport-g")
    LOG_START[proc.name] = len(proc.log_text())  # the log file is appended to across runs
    return proc


def frame(op: int, payload: bytes, fin: bool = True, mask: bool = True) -> bytes:
    first = (0x80 if fin else 0) | op
    n = len(payload)
    length = (
        bytes((n | (0x80 if mask else 0),))
        if n < 126
        else bytes((126 | 0x80,)) + n.to_bytes(2, "big")
    )
    if not mask:
        return bytes((first,)) + length + payload
    key = os.urandom(4)
    return bytes((first,)) + length + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def request(token: str | None, path: str = "/v1/ws", extra: str = "", method: str = "GET") -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (
        f"{method} {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{auth}{extra}\r\n"
    ).encode()


class Raw:
    """A raw client: writes bytes, reads the response head and then server frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.pending: list[tuple[int, bytes]] = []
        self.buf = b""

    @classmethod
    async def open(cls, g: Proc, raw_request: bytes) -> tuple[Raw, str]:
        reader, writer = await asyncio.open_connection("127.0.0.1", g.port)
        writer.write(raw_request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        return cls(reader, writer), head.decode("latin-1")

    async def next_frame(self, timeout: float = 10) -> tuple[int, bytes]:
        """(opcode, payload) of the next server frame; (-1, b"") once the server closed TCP."""
        while True:
            if len(self.buf) >= 2:
                n = self.buf[1] & 0x7F
                head = 2
                if n == 126:
                    n, head = int.from_bytes(self.buf[2:4], "big"), 4
                elif n == 127:
                    n, head = int.from_bytes(self.buf[2:10], "big"), 10
                assert not self.buf[1] & 0x80, "server frames are never masked"
                if len(self.buf) >= head + n:
                    op, payload = self.buf[0] & 0x0F, self.buf[head : head + n]
                    self.buf = self.buf[head + n :]
                    return op, payload
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
            if not data:
                return -1, b""
            self.buf += data

    async def next_json(self) -> dict[str, Any]:
        while True:
            op, payload = await self.next_frame()
            if op == 1:
                out: dict[str, Any] = orjson.loads(payload)
                return out
            assert op in (9, 10), (op, payload)  # pings may come between

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def close(self) -> None:
        self.writer.close()


async def test_upgrades_that_cannot_be_accepted_get_an_http_status(stack: Stack, g: Proc) -> None:
    token = stack.token(uid("t"))
    cases = [
        (request(token, path="/v1/nope"), "404"),
        (request(token, method="POST"), "405"),
        (request(token).replace(b"Version: 13", b"Version: 8"), "426"),
        (request(token).replace(KEY.encode(), b"c2hvcnQ="), "400"),
        (request(token, extra="X-Pad: " + "x" * 70_000 + "\r\n"), "400"),
        (request(token, path="http://h"), "404"),  # absolute form without a path
        (request(token, path="h:80", method="CONNECT"), "400"),
    ]
    for raw, status in cases:
        _, head = await Raw.open(g, raw)
        assert head.split(" ")[1] == status, (raw[:40], head)
        if status == "426":
            assert "Sec-WebSocket-Version: 13" in head


async def test_accepted_connection_speaks_rfc6455(stack: Stack, g: Proc) -> None:
    user = uid("raw")
    # A request sent in the same packet as the upgrade is kept and answered after hello.
    early = frame(1, b'{"t":"ping","rid":1}')
    client, head = await Raw.open(g, request(stack.token(user)) + early)
    assert head.startswith("HTTP/1.1 101 ")
    assert "Sec-WebSocket-Accept: " in head
    hello = await client.next_json()
    assert hello["t"] == "hello" and hello["user"] == user
    assert await client.next_json() == {"t": "pong", "rid": 1}
    # A WebSocket ping gets its payload back in a pong.
    client.send(frame(9, b"hb-1"))
    assert await client.next_frame() in ((10, b"hb-1"), (9, b""))
    # A request in three fragments, a ping between two of them.
    body = b'{"t":"ping","rid":2}'
    client.send(frame(1, body[:5], fin=False) + frame(9, b"") + frame(0, body[5:9], fin=False))
    client.send(frame(0, body[9:]))
    assert await client.next_json() == {"t": "pong", "rid": 2}
    # The client closes: the server answers with the same code and closes TCP.
    client.send(frame(8, (1000).to_bytes(2, "big") + b"bye"))
    while True:
        op, payload = await client.next_frame()
        if op == 8:
            assert payload[:2] == (1000).to_bytes(2, "big")
            break
        assert op in (9, 10)
    assert (await client.next_frame())[0] == -1  # then TCP closed by the server
    client.close()


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        (frame(1, b'{"t":"ping","rid":1}', mask=False), 1002),  # unmasked
        (frame(1, b"\xff\xfe"), 1007),  # text that is not UTF-8
        (frame(3, b"x"), 1002),  # reserved opcode
        (frame(0, b"x"), 1002),  # continuation of nothing
    ],
)
async def test_protocol_violations_close_with_their_code(
    stack: Stack, g: Proc, bad: bytes, code: int
) -> None:
    client, _ = await Raw.open(g, request(stack.token(uid("bad"))))
    assert (await client.next_json())["t"] == "hello"
    client.send(bad)
    while True:
        op, payload = await client.next_frame()
        if op == 8:
            assert int.from_bytes(payload[:2], "big") == code
            break
        assert op in (9, 10)
    assert (await client.next_frame())[0] == -1
    client.close()


async def test_bad_token_is_accepted_then_closed_4001(stack: Stack, g: Proc) -> None:
    client, head = await Raw.open(g, request("not-a-token"))
    assert head.startswith("HTTP/1.1 101 ")
    op, payload = await client.next_frame()
    assert op == 8 and int.from_bytes(payload[:2], "big") == 4001
    client.send(frame(8, payload[:2]))  # the answer: then the server closes TCP
    assert (await client.next_frame())[0] == -1
    client.close()


async def test_a_token_whose_exp_broke_the_upgrade_is_closed_4001_and_the_node_goes_on(
    stack: Stack, g: Proc, settings: Settings
) -> None:
    # Signed with the real secret, so verification passes up to `exp`: 10^400 raised
    # OverflowError in the token check and 10^20 in the hello frame's encoding (after the
    # 101), inside the upgrade's task; the client then waited forever with nothing sent.
    for exp, binary in ((10**400, False), (10**20, False), (10**20, True)):
        tok = jwt.encode({"sub": uid("exp"), "exp": exp}, settings.jwt_secret, "HS256")
        proto = "Sec-WebSocket-Protocol: chat.v1.msgpack\r\n" if binary else ""
        client, head = await Raw.open(g, request(tok, extra=proto))
        assert head.startswith("HTTP/1.1 101 "), head
        op, payload = await client.next_frame()
        assert op == 8 and int.from_bytes(payload[:2], "big") == 4001, (exp, op, payload)
        assert payload[2:] == b"token exp is out of range"
        client.send(frame(8, payload[:2]))
        assert (await client.next_frame())[0] == -1
        client.close()
    # The node goes on: a good token opens a session that answers.
    client, head = await Raw.open(g, request(stack.token(uid("ok"))))
    assert (await client.next_json())["t"] == "hello"
    client.send(frame(1, b'{"t":"ping","rid":7}'))
    assert await client.next_json() == {"t": "pong", "rid": 7}
    client.close()


async def _close_code(client: Raw) -> int:
    while True:
        op, payload = await client.next_frame()
        if op == 8:
            return int.from_bytes(payload[:2], "big")
        assert op in (9, 10), (op, payload)


async def test_what_a_peer_sends_around_a_close_gets_the_answer_rfc6455_asks_for(
    stack: Stack, g: Proc
) -> None:
    # A close frame whose payload is one byte (no room for a code) is a protocol error.
    client, _ = await Raw.open(g, request(stack.token(uid("c1"))))
    assert (await client.next_json())["t"] == "hello"
    client.send(frame(8, b"\x03"))
    assert await _close_code(client) == 1002
    assert (await client.next_frame())[0] == -1
    client.close()
    # A whole request, then a broken frame, in one packet: the request is taken (its
    # answer may lose the race with the close), then the connection closes 1002; what the
    # peer sends after that is not parsed.
    client, _ = await Raw.open(g, request(stack.token(uid("c2"))))
    assert (await client.next_json())["t"] == "hello"
    client.send(frame(1, b'{"t":"ping","rid":5}') + frame(1, b"x", mask=False))
    while (reply := await client.next_frame())[0] != 8:
        assert reply[0] in (1, 9, 10) and (reply[0] != 1 or b'"pong"' in reply[1]), reply
    assert int.from_bytes(reply[1][:2], "big") == 1002
    client.send(frame(1, b'{"t":"ping","rid":6}'))
    assert (await client.next_frame())[0] == -1  # no pong: closed
    client.close()
    # Refused (4001) with a broken frame and a ping already behind the upgrade: the close
    # frame is the answer; the rest is read only to find the peer's close in it.
    client, head = await Raw.open(g, request("not-a-token") + frame(9, b"p") + frame(0, b"x"))
    assert head.startswith("HTTP/1.1 101 ")
    assert await _close_code(client) == 4001
    assert (await client.next_frame())[0] == -1
    client.close()
    # Refused (4001); the peer pings before it answers our close: no pong, and its close
    # is not answered again (ours was the close handshake's first half).
    client, _ = await Raw.open(g, request("not-a-token"))
    assert await _close_code(client) == 4001
    client.send(frame(9, b"late") + frame(8, (1000).to_bytes(2, "big")))
    assert (await client.next_frame())[0] == -1
    client.close()


async def test_an_upgrade_to_another_protocol_is_served_as_plain_http(g: Proc) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", g.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200 "), head
    writer.close()


async def test_a_malformed_delivery_is_dropped_and_the_node_goes_on_delivering(
    stack: Stack, g: Proc, settings: Settings, redis_client: aioredis.Redis
) -> None:
    g.expect_log(r"bad delivery dropped")  # on purpose, below
    user = uid("d")
    client, _ = await Raw.open(g, request(stack.token(user)))
    hello = await client.next_json()
    channel = RedisKeys(settings.redis_prefix).node_channel(hello["node"])
    # What a broken or foreign publisher could put on the node's channel.
    for garbage in (b"\xc1", b"\x93\x01\x02\x03", b"not msgpack at all"):
        assert await redis_client.publish(channel, garbage) == 1
    frame_for_user = {"t": "notify", "n": {"id": "1", "kind": "dm"}}
    good = encode_delivery(Delivery(user_frames=[(user, frame_for_user)]))
    assert await redis_client.publish(channel, good) == 1
    assert await client.next_json() == frame_for_user  # the listener is still there
    assert g.log_text().count("bad delivery dropped") >= 3
    client.close()


async def test_an_upgrade_whose_routing_registration_redis_refuses_is_closed_1013(
    settings: Settings,
) -> None:
    # The gateway's own Redis, made to refuse every write (maxmemory 1 byte, noeviction:
    # "OOM command not allowed") while a client connects: registering the session's user
    # raises inside the upgrade. The client gets hello, then 1013; the node goes on.
    redis = OwnRedis()
    redis.start()
    s = Stack(settings, extra_env={"AGORA_REDIS_URL": redis.url})
    admin = aioredis.Redis.from_url(redis.url)
    try:
        node = s.gateway("transport-oom")
        await admin.config_set("maxmemory-policy", "noeviction")
        await admin.config_set("maxmemory", "1")
        try:
            client, head = await Raw.open(node, request(s.token(uid("oom"))))
            assert head.startswith("HTTP/1.1 101 ")
            assert (await client.next_json())["t"] == "hello"
            op, payload = await client.next_frame()
            assert op == 8 and payload == (1013).to_bytes(2, "big") + b"routing unavailable"
            client.send(frame(8, payload[:2]))
            assert (await client.next_frame())[0] == -1
            client.close()
        finally:
            await admin.config_set("maxmemory", "0")
        assert "routing registration failed" in node.log_text()
        # Redis takes writes again: the next session opens and answers.
        client, _ = await Raw.open(node, request(s.token(uid("ok"))))
        assert (await client.next_json())["t"] == "hello"
        client.send(frame(1, b'{"t":"ping","rid":1}'))
        assert await client.next_json() == {"t": "pong", "rid": 1}
        client.close()
    finally:
        await admin.aclose()
        s.stop_all()
        redis.kill()


async def test_a_message_missing_from_pub_sub_is_filled_from_storage_in_order(
    stack: Stack,
    g: Proc,
    settings: Settings,
    redis_client: aioredis.Redis,
    pools: ShardPools,
    ids: IdGenerator,
) -> None:
    a, b = uid("fa"), uid("fb")
    conv = (await conversations.create_group(pools, ids, a, [b], "gap")).id
    client, _ = await Raw.open(g, request(stack.token(a)))
    hello = await client.next_json()
    client.send(frame(1, b'{"t":"sub","conv":"%d","rid":1}' % conv))
    assert (await client.next_json())["t"] == "subbed"
    # Two messages stored, only the second published (the first's publish was lost):
    # the node sees seq 2 after 0 and reads seq 1 from storage before it.
    stored = (
        await sequence(
            pools,
            [
                NewMessage(
                    conv, ids.next_id(shard_of_id(conv)), a, f"g{i}", f"m{i}", now_ms(), "text"
                )
                for i in (1, 2)
            ],
        )
    ).stored
    channel = RedisKeys(settings.redis_prefix).node_channel(hello["node"])
    await redis_client.publish(channel, encode_delivery(Delivery(messages=[stored[1]])))
    assert [(await client.next_json())["seq"] for _ in range(2)] == [1, 2]
    # A jump that storage cannot fill either (seq 5, storage ends at 2) is accepted
    # rather than waited on forever.
    ghost = replace(stored[1], seq=5, id=ids.next_id(shard_of_id(conv)), cid="ghost")
    await redis_client.publish(channel, encode_delivery(Delivery(messages=[ghost])))
    got = await client.next_json()
    assert (got["t"], got["seq"]) == ("msg", 5), got
    client.close()


async def test_a_comment_sent_to_a_conversation_that_is_not_a_thread_is_refused(
    stack: Stack, g: Proc, pools: ShardPools, ids: IdGenerator
) -> None:
    a, b = uid("ca"), uid("cb")
    conv = (await conversations.create_group(pools, ids, a, [b], "not a thread")).id
    client, _ = await Raw.open(g, request(stack.token(a)))
    assert (await client.next_json())["t"] == "hello"
    send = b'{"t":"send","conv":"%d","cid":"c1","body":"x","kind":"comment","rid":3}' % conv
    client.send(frame(1, send))
    assert await client.next_json() == {
        "t": "err",
        "code": "bad_request",
        "msg": "comments belong to a post's thread",
        "rid": 3,
    }
    client.close()


async def test_silent_client_is_closed_after_two_heartbeats_an_answering_one_is_not(
    stack: Stack, g: Proc
) -> None:
    silent, _ = await Raw.open(g, request(stack.token(uid("silent"))))
    alive, _ = await Raw.open(g, request(stack.token(uid("alive"))))
    assert (await silent.next_json())["t"] == "hello"
    assert (await alive.next_json())["t"] == "hello"

    async def answer_pings() -> int:
        pings = 0
        while True:
            op, payload = await alive.next_frame()
            if op == 9:
                pings += 1
                alive.send(frame(10, payload))
            if op in (8, -1):
                raise AssertionError("the answering client was closed")
            if pings >= 5:
                return pings

    answering = asyncio.create_task(answer_pings())
    pings = 0
    loop = asyncio.get_running_loop()
    start = loop.time()
    while True:  # never answers: pinged, then closed with 1011
        op, payload = await silent.next_frame(timeout=15)
        if op == 9:
            pings += 1
            continue
        assert op == 8, op
        assert int.from_bytes(payload[:2], "big") == 1011
        break
    elapsed = loop.time() - start
    assert pings >= 2 and elapsed >= 1.5, (pings, elapsed)
    assert await asyncio.wait_for(answering, 15) >= 5  # five intervals later, still open
    silent.close()
    alive.close()


async def test_a_client_that_pings_and_never_reads_cannot_grow_the_gateways_memory(
    stack: Stack, g: Proc
) -> None:
    client, _ = await Raw.open(g, request(stack.token(uid("pinger"))))
    assert (await client.next_json())["t"] == "hello"
    before = rss_kib(g.popen.pid)
    ping = frame(9, b"p" * 125)  # every pong would carry these 125 bytes back
    for _ in range(100):
        client.send(ping * 1000)  # 100,000 pings, 13 MB of pongs if all were answered
        await client.writer.drain()
    await asyncio.sleep(1)
    grown = rss_kib(g.popen.pid) - before
    print(f"pinger: gateway RSS grew {grown} KiB")
    assert grown < 6 * 1024, grown  # the pongs stop once the socket's buffer is full
    client.close()


async def test_data_before_the_session_opens_waits_for_it(stack: Stack, g: Proc) -> None:
    # 600 KB of requests right behind the upgrade: more than the gateway keeps before the
    # session opens, so it stops reading until then (TCP pushes back on us), then parses
    # them all. Every one is answered, in order: 256 may wait to be handled, the rest are
    # refused at once (rate_limited), as for any pipelining client.
    n = 20_000
    pings = b"".join(frame(1, b'{"t":"ping","rid":%d}' % i) for i in range(n))
    assert len(pings) > 2 * 256 * 1024
    client, head = await Raw.open(g, request(stack.token(uid("early"))) + pings)
    assert head.startswith("HTTP/1.1 101 ")
    assert (await client.next_json())["t"] == "hello"
    answered: list[int] = []
    refused: list[int] = []
    while len(answered) + len(refused) < n:
        reply = await client.next_json()
        if reply["t"] == "pong":
            answered.append(reply["rid"])
        else:
            assert reply["t"] == "err" and reply["code"] == "rate_limited", reply
            # The in-flight limit's answer (the frame-rate limit is set far above 20,000).
            assert reply["retry_after_ms"] == 100, reply
            refused.append(reply["rid"])
    print(f"{n} early pings: {len(answered)} answered, {len(refused)} refused")
    # ~10,000 of them arrive in one read once the session opens: past the 256 in flight.
    assert answered == sorted(answered) and len(answered) >= 256 and refused
    assert sorted(answered + refused) == list(range(n))
    client.send(frame(8, (1000).to_bytes(2, "big")))
    while (op := (await client.next_frame())[0]) != -1:
        assert op in (8, 9, 10), op
    client.close()


async def test_a_half_closed_peer_ends_its_session_at_once(stack: Stack, g: Proc) -> None:
    # The client shuts down its sending half (FIN) and says nothing more: the session ends
    # and the server closes TCP promptly, not at the close timeout.
    client, _ = await Raw.open(g, request(stack.token(uid("half"))))
    assert (await client.next_json())["t"] == "hello"
    opened = await metric(g, "agora_connections")
    client.writer.write_eof()
    loop = asyncio.get_running_loop()
    started = loop.time()
    while (op := (await client.next_frame(timeout=CLOSE_TIMEOUT_S))[0]) != -1:
        assert op in (9, 10), op
    closed_in = loop.time() - started
    print(f"half-closed peer: TCP closed by the server after {closed_in:.2f}s")
    assert closed_in < CLOSE_TIMEOUT_S / 2
    deadline = loop.time() + 10
    while await metric(g, "agora_connections") > opened - 1:
        assert loop.time() < deadline, "the half-closed connection is still counted"
        await asyncio.sleep(0.05)
    client.close()


async def test_a_peer_that_never_answers_our_close_is_cut_off_after_the_close_timeout(
    stack: Stack, g: Proc
) -> None:
    # Silent: no pong, so after two heartbeats the server sends its close frame (1011)
    # and waits for ours, which never comes; then it drops the socket.
    client, _ = await Raw.open(g, request(stack.token(uid("mute"))))
    assert (await client.next_json())["t"] == "hello"
    while (frame_ := await client.next_frame(timeout=15))[0] != 8:
        assert frame_[0] == 9, frame_
    assert int.from_bytes(frame_[1][:2], "big") == 1011
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        data = await asyncio.wait_for(client.reader.read(65536), CLOSE_TIMEOUT_S + 20)
    except ConnectionResetError:
        data = b""
    cut_after = loop.time() - started
    print(f"unanswered close: connection dropped after {cut_after:.1f}s")
    assert data == b""  # nothing after the close frame, then the end of the connection
    assert cut_after >= CLOSE_TIMEOUT_S - 1  # it waited for the peer's answer first
    client.close()


async def test_a_peer_that_answers_our_close_is_let_go_at_once(stack: Stack, g: Proc) -> None:
    # Silent, so the server closes (1011 after two heartbeats); the peer answers with its
    # close frame, which ends the handshake: the server closes TCP then, not after the
    # close timeout.
    client, _ = await Raw.open(g, request(stack.token(uid("answers"))))
    assert (await client.next_json())["t"] == "hello"
    assert await _close_code(client) == 1011
    loop = asyncio.get_running_loop()
    started = loop.time()
    client.send(frame(8, (1011).to_bytes(2, "big")))
    assert (await client.next_frame(timeout=CLOSE_TIMEOUT_S))[0] == -1
    closed_in = loop.time() - started
    print(f"answered close: connection closed after {closed_in:.2f}s")
    assert closed_in < CLOSE_TIMEOUT_S / 2
    client.close()


async def test_a_reader_that_catches_up_starts_its_slow_consumer_count_afresh(
    settings: Settings, pools: ShardPools, ids: IdGenerator
) -> None:
    # A client that reads in bursts: each `sub ... since` replays 1000 stored messages of
    # 3 KB while it is not reading, so the server's socket fills and it pauses writing;
    # ~970 frames wait each time, under AGORA_OUTBOUND_MAX_FRAMES (1500). Once the client
    # has read them all, the socket drains (resume_writing) and the count starts again:
    # three bursts are not added up into a 4009 (they would be by the second).
    s = Stack(
        settings,
        extra_env={
            "AGORA_OUTBOUND_MAX_FRAMES": "1500",
            "AGORA_SOCKET_SEND_BUFFER": "16384",
            "AGORA_HEARTBEAT_MS": "60000",  # a client that does not read is not silent here
        },
    )
    try:
        node = s.gateway("transport-bursts")
        user = uid("bursty")
        conv = await conversations.create_group(pools, ids, user, [], "bursts")
        shard = pools.for_id(conv.id)
        body = "b" * 3000
        batch = [
            NewMessage(conv.id, ids.next_id(0), user, f"c{i}", body, now_ms(), "text")
            for i in range(1000)
        ]
        async with pools.transaction(shard) as conn:
            stored, _, _ = await messages.append_batch(conn, batch)
        assert len(stored) == 1000
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # "not reading" felt at once
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", node.port or 0))
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(request(s.token(user)))
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        client = Raw(reader, writer)
        assert (await client.next_json())["t"] == "hello"
        for burst in range(3):
            out_before = await metric(node, "agora_frames_out_total")
            client.send(frame(1, b'{"t":"sub","conv":"%d","since":0,"rid":%d}' % (conv.id, burst)))
            # Until all of it is written to the paused socket (the subbed reply and 1000
            # messages), without reading.
            deadline = time.monotonic() + 30
            while await metric(node, "agora_frames_out_total") < out_before + 1001:
                assert time.monotonic() < deadline, "replay not written in 30 s (closed 4009?)"
                await asyncio.sleep(0.1)
            seqs: list[int] = []
            subbed = False
            while len(seqs) < 1000 or not subbed:
                reply = await client.next_json()
                assert reply["t"] in ("subbed", "msg"), reply  # not closed (no 4009)
                if reply["t"] == "msg":
                    seqs.append(reply["seq"])
                else:
                    subbed = True
            assert seqs == list(range(1, 1001)), burst
            client.send(frame(1, b'{"t":"unsub","conv":"%d","rid":%d}' % (conv.id, 100 + burst)))
            assert (await client.next_json())["t"] == "ok"
        assert await metric(node, "agora_ws_closes_total", code="4009") == 0
        client.close()
    finally:
        s.stop_all()


def test_the_gateway_logged_no_unhandled_error(g: Proc) -> None:
    # Last in the module: nothing above made an exception escape a protocol callback
    # (uvloop logs those as "Fatal error on transport") or a task.
    text = g.log_text()[LOG_START[g.name] :]
    assert "Traceback" not in text and "Fatal error" not in text, text[-3000:]
