"""The per-user session count (gateway/usercap.py) when its Redis hash was damaged between a
session's connect and its disconnect: the node's field removed (another node dropped it as
dead after this node's lease lapsed), the whole hash gone (Redis restarted empty), or a hash
without a TTL. The decrement must not make the count negative (which let the user past the
cap for as long as the gateway ran) nor leave a key without a TTL, and the cap must still
admit and refuse the right sessions afterwards. A real gateway and Redis."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from agora_client import AgoraClient
from core.settings import Settings
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


@pytest.mark.parametrize("damage", ["field", "hash", "ttl"])
async def test_a_decrement_of_a_damaged_count_never_goes_below_zero(
    stack: Stack, g1: Proc, settings: Settings, redis_client: Any, damage: str
) -> None:
    """field: the node's field removed; hash: the user's hash gone (as after Redis
    restarted empty); ttl: the hash's TTL gone. Then sessions end: the count ends at the
    sessions still counted (0 when the field was lost: none of them is counted any more),
    never below, the key has a TTL, and the cap admits and refuses as before."""
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
