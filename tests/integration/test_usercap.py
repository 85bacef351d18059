"""The per-user session count (gateway/usercap.py) when its Redis hash was damaged between a
session's connect and its disconnect: the node's field removed (another node dropped it as
dead after this node's lease lapsed), the whole hash gone (Redis restarted empty), or a hash
without a TTL. The decrement must not make the count negative (which let the user past the
cap for as long as the gateway ran) nor leave a key without a TTL, and the cap must still
admit and refuse the right sessions afterwards. A real gateway and Redis."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis

from agora_client import AgoraClient
from core.settings import Settings
from gateway.usercap import _RELEASE
from storage.redis_keys import RedisKeys
from tests.integration.helpers import uid
from tests.stack import Proc, Stack

pytestmark = pytest.mark.engines
USER_CAP = 3


@pytest.fixture(scope="module")
def stack(settings: Settings) -> Iterator[Stack]:
    s = Stack(settings, extra_env={"AGORA_MAX_CONNECTIONS_PER_USER": str(USER_CAP)})
    try:
        s.gateway("ucap-g1")
        yield s
    finally:
        s.stop_all()


class Commands:
    """Every command Redis runs (MONITOR, on a connection of its own), from now on."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.changed = asyncio.Event()

    async def watch(self, r: aioredis.Redis, started: asyncio.Event) -> None:
        async with r.monitor() as m:
            started.set()
            while True:
                self.seen.append((await m.next_command())["command"])
                self.changed.set()

    async def until(self, check: Any, seconds: float, what: str) -> None:
        try:
            async with asyncio.timeout(seconds):
                while not any(check(c) for c in self.seen):
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            pytest.fail(f"{what} not seen in {seconds} s")


@contextlib.asynccontextmanager
async def monitored(settings: Settings) -> AsyncIterator[Commands]:
    r = aioredis.Redis.from_url(settings.redis_url)
    commands, started = Commands(), asyncio.Event()
    task = asyncio.create_task(commands.watch(r, started))
    try:
        await asyncio.wait_for(started.wait(), 5)
        yield commands
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        await r.aclose()


async def counted(stack: Stack, gw: Proc, user: str) -> AgoraClient:
    """A session of `user`, counted: a request is answered only once it is admitted."""
    c = await AgoraClient.connect(gw.ws_url, stack.token(user))
    assert (await c.ping())["t"] == "pong"
    return c


async def cap_holds_exactly(stack: Stack, gw: Proc, user: str) -> None:
    """`user` (holding no session) gets USER_CAP sessions and the next one is refused
    4008: nothing of earlier sessions is still counted, and nothing was under-counted."""
    held = [await counted(stack, gw, user) for _ in range(USER_CAP)]
    extra = await AgoraClient.connect(gw.ws_url, stack.token(user))
    await asyncio.wait_for(extra.closed.wait(), 5)
    assert extra.close_code == 4008, f"session {USER_CAP + 1} admitted: {extra.close_code}"
    for c in held:
        await c.close()


@pytest.mark.parametrize("damage", ["field", "hash", "restart", "ttl"])
async def test_a_decrement_of_a_damaged_count_never_goes_below_zero(
    stack: Stack, g1: Proc, settings: Settings, redis_client: Any, damage: str
) -> None:
    """field: the node's field removed; hash: the user's hash gone; restart: FLUSHDB and
    SCRIPT FLUSH (as after Redis restarted empty); ttl: the hash's TTL gone. Then sessions
    end: the count ends at the sessions still counted (0 when the field was lost: none of
    them is counted any more), never below, the key has a TTL, and the cap admits and
    refuses as before."""
    r: aioredis.Redis = redis_client
    keys = RedisKeys(settings.redis_prefix, settings.redis_cluster)
    user = uid(f"ucap-{damage}")
    key = keys.user_sessions(user)
    sessions = [await counted(stack, g1, user) for _ in range(2)]
    mine = f"{sessions[0].hello['node']}|"
    fields = {f.decode(): int(v) for f, v in (await r.hgetall(key)).items()}
    assert [v for f, v in fields.items() if f.startswith(mine)] == [2]
    if damage == "field":
        await r.hdel(key, *[f for f in fields if f.startswith(mine)])
    elif damage == "hash":
        await r.delete(key)
    elif damage == "restart":  # as Redis restarted empty: every key and script gone
        await r.flushdb()
        await r.script_flush()
    else:
        assert await r.persist(key)
    ending = sessions if damage != "ttl" else sessions[:1]
    left = 2 - len(ending) if damage == "ttl" else 0
    async with monitored(settings) as commands:
        for c in ending:
            await c.close()
        # The gateway's decrement (whatever command carries it) has reached Redis.
        await commands.until(
            lambda cmd: key in cmd and "HGETALL" not in cmd and "MONITOR" not in cmd,
            10,
            "the decrement",
        )
    after = {f.decode(): int(v) for f, v in (await r.hgetall(key)).items()}
    print(f"{damage}: {fields} -> {after}, TTL {await r.ttl(key)}")
    assert all(v >= 0 for v in after.values()), after
    assert sum(after.values()) == left
    if after:
        assert await r.ttl(key) > 0, "a session hash without a TTL"
    else:
        assert not await r.exists(key)

    # The cap still holds: USER_CAP sessions in all, the next one refused.
    held = sessions[len(ending) :]
    held += [await counted(stack, g1, user) for _ in range(USER_CAP - len(held))]
    extra = await AgoraClient.connect(g1.ws_url, stack.token(user))
    await asyncio.wait_for(extra.closed.wait(), 5)
    assert extra.close_code == 4008, f"session {USER_CAP + 1} admitted: {extra.close_code}"
    assert await r.ttl(key) > 0
    for c in held:
        await c.close()


class ReplyLosingProxy:
    """A TCP proxy in front of Redis (on a thread of its own: the stack's start blocks the
    test's loop) that loses the replies of the first connection to send a decrement
    (`HINCRBY` or `EVALSHA`) of `key`: Redis applies it, the sender times out and retries.
    With `hold` given, that connection's replies are held until `hold` is set instead of
    lost; `seen` is set once the command went through."""

    def __init__(self, upstream: str, hold: threading.Event | None = None) -> None:
        self.hold = hold
        self.seen = threading.Event()
        u = urlsplit(upstream)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 6379
        self.key = b""
        self.lost = 0  # connections whose replies were lost
        self.loop = asyncio.new_event_loop()
        self.listen_port = 0
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        assert ready.wait(5)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", 0))
        self.listen_port = server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()
        server.close()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    async def _client(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection(self.host, self.port)
        losing = [False]

        async def up() -> None:
            while data := await cr.read(65536):
                # One read: a command of a few hundred bytes arrives whole on loopback.
                if (
                    self.key
                    and not self.lost
                    and self.key in data
                    and (b"EVALSHA" in data.upper() or b"HINCRBY" in data.upper())
                ):
                    losing[0] = True
                    self.lost += 1
                    self.seen.set()
                sw.write(data)
                await sw.drain()

        async def down() -> None:
            while data := await sr.read(65536):
                if losing[0] and self.hold is not None:
                    await asyncio.get_running_loop().run_in_executor(None, self.hold.wait)
                if not losing[0] or self.hold is not None:
                    cw.write(data)
                    await cw.drain()

        with contextlib.suppress(Exception):
            await asyncio.wait(
                [asyncio.ensure_future(up()), asyncio.ensure_future(down())],
                return_when=asyncio.FIRST_COMPLETED,
            )
        for w in (cw, sw):
            w.close()


async def test_a_decrement_applied_twice_after_a_lost_reply_never_goes_below_zero(
    settings: Settings, redis_client: Any
) -> None:
    """Redis applies a batch of decrements but the reply is lost: the gateway times out
    and sends it again, so it is applied twice. The count ends at 0, not below, and the
    cap still refuses session USER_CAP + 1."""
    r: aioredis.Redis = redis_client
    await r.script_load(_RELEASE)  # as after any earlier decrement: no NOSCRIPT round
    proxy = ReplyLosingProxy(settings.redis_url)
    u = urlsplit(settings.redis_url)
    via_proxy = f"redis://127.0.0.1:{proxy.listen_port}{u.path}"
    s = Stack(
        settings,
        extra_env={
            "AGORA_MAX_CONNECTIONS_PER_USER": str(USER_CAP),
            "AGORA_REDIS_URL": via_proxy,
            "AGORA_REDIS_TIMEOUT_S": "3",  # the least allowed
        },
    )
    try:
        gw = s.gateway("ucap-lost-reply")
        keys = RedisKeys(settings.redis_prefix, settings.redis_cluster)
        user = uid("ucap-lost")
        key = keys.user_sessions(user)
        sessions = [await counted(s, gw, user) for _ in range(2)]
        proxy.key = key.encode()
        async with monitored(settings) as commands:
            for c in sessions:
                await c.close()

            def decrements() -> int:
                return sum(
                    1 for c in commands.seen if key in c and c.startswith(("EVALSHA", "HINCRBY"))
                )

            # The first one (its reply lost), then the retry (answered).
            await commands.until(lambda _: decrements() >= 2, 15, "the decrement and its retry")
        assert proxy.lost == 1
        after = {f.decode(): int(v) for f, v in (await r.hgetall(key)).items()}
        print(f"after a lost reply: {after}, {decrements()} decrement calls")
        assert all(v >= 0 for v in after.values()), after
        assert sum(after.values()) == 0

        await cap_holds_exactly(s, gw, user)
    finally:
        s.stop_all()
        proxy.stop()


async def test_a_count_whose_reply_was_lost_is_released_when_its_session_ends(
    settings: Settings, redis_client: Any
) -> None:
    """Redis applies a connect's count (HINCRBY) but the reply is lost: the gateway times
    out, admits the session (a count that failed refuses nobody) and, before, attached no
    release to it, so the user stayed counted one session too many for as long as the
    gateway ran (refused at USER_CAP - 1 real sessions). The count's outcome is unknown:
    it is released like any counted session (at worst, had Redis not applied it, an
    under-count, floored at 0)."""
    r: aioredis.Redis = redis_client
    proxy = ReplyLosingProxy(settings.redis_url)
    u = urlsplit(settings.redis_url)
    s = Stack(
        settings,
        extra_env={
            "AGORA_MAX_CONNECTIONS_PER_USER": str(USER_CAP),
            "AGORA_REDIS_URL": f"redis://127.0.0.1:{proxy.listen_port}{u.path}",
            "AGORA_REDIS_TIMEOUT_S": "3",  # the least allowed
        },
    )
    try:
        gw = s.gateway("ucap-lost-count")
        keys = RedisKeys(settings.redis_prefix, settings.redis_cluster)
        user = uid("ucap-lcount")
        key = keys.user_sessions(user)
        proxy.key = key.encode()
        first = await counted(s, gw, user)  # admitted after the count timed out
        assert proxy.lost == 1
        assert sum(int(v) for v in (await r.hgetall(key)).values()) == 1  # Redis applied it
        async with monitored(settings) as commands:
            await first.close()
            await commands.until(
                lambda c: key in c and c.startswith("EVALSHA"), 15, "the session's release"
            )
        assert not await r.exists(key)  # back to nothing
        await cap_holds_exactly(s, gw, user)
    finally:
        s.stop_all()
        proxy.stop()


async def test_a_session_that_ends_while_it_is_counted_is_released(
    settings: Settings, redis_client: Any
) -> None:
    """The peer leaves while its session's count is in flight (a client giving up on a
    slow connect): the count succeeds and the session is admitted, but its release was
    attached to a connection already closed, whose close callbacks had run: it never ran,
    and the user stayed counted one session too many for as long as the gateway ran.
    The count's replies are held by the proxy until the gateway has seen the peer leave
    (its route of the user is dropped)."""
    r: aioredis.Redis = redis_client
    hold = threading.Event()
    proxy = ReplyLosingProxy(settings.redis_url, hold=hold)
    u = urlsplit(settings.redis_url)
    s = Stack(
        settings,
        extra_env={
            "AGORA_MAX_CONNECTIONS_PER_USER": str(USER_CAP),
            "AGORA_REDIS_URL": f"redis://127.0.0.1:{proxy.listen_port}{u.path}",
        },
    )
    try:
        gw = s.gateway("ucap-gone-counting")
        keys = RedisKeys(settings.redis_prefix, settings.redis_cluster)
        user = uid("ucap-gone")
        key, route = keys.user_sessions(user), keys.user_routes(user)
        proxy.key = key.encode()
        ws = urlsplit(gw.ws_url)
        _reader, writer = await asyncio.open_connection(ws.hostname, ws.port)
        writer.write(
            (
                f"GET {ws.path or '/'}?token={s.token(user)} HTTP/1.1\r\n"
                f"Host: {ws.netloc}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        await writer.drain()
        loop = asyncio.get_running_loop()
        async with monitored(settings) as commands:
            try:
                # Registered (its route is in) and counted (the count went to Redis).
                assert await loop.run_in_executor(None, proxy.seen.wait, 10)
                assert await r.exists(route)
                writer.close()  # the peer leaves while the count's reply is held
                async with asyncio.timeout(10):
                    while await r.exists(route):  # the gateway saw it go: route dropped
                        await asyncio.sleep(0.02)
                assert sum(int(v) for v in (await r.hgetall(key)).values()) == 1  # counted
            finally:
                hold.set()
            await commands.until(
                lambda c: key in c and c.startswith("EVALSHA"), 10, "the session's release"
            )
        assert not await r.exists(key)
    finally:
        hold.set()
        s.stop_all()
        proxy.stop()
