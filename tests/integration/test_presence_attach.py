"""A user's presence goes online once they have a connection whose registration succeeded,
whichever of their connections that is.

Node.attach announced presence only for the connection that found no other of its user on
the node ("first"), decided before registering the user's route. When that connection's
registration failed (Redis refused the route update: the connection is closed with 1013)
after a second connection of the user had attached, the second one was not "first" and
its registration succeeded later: the user stayed connected and never went online. The
second connect has to come in between the failure and the first's handling of it (one
turn of the loop: a storm of connects while Redis errs); the test puts it there with a
handler of the failure's log line, which runs where the failure is decided. Real Redis
of the test's own (ACL: SADD refused for the node's user) and PostgreSQL; the
connections' links are recording sockets."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis

from core.errors import Unavailable
from core.settings import Settings
from gateway.batches import Backoff
from gateway.connection import Connection
from gateway.node import Node
from gateway.protocol.codec import JsonCodec
from gateway.protocol.frames import CloseCode
from storage.pools import ShardPools
from storage.redis_keys import RedisKeys
from tests.faults import OwnRedis
from tests.integration.helpers import running_node, uid
from tests.integration.test_node_lease import Socket
from tests.integration.test_node_register import admin

pytestmark = pytest.mark.engines
__all__ = ["admin"]  # the fixture


class OnFailure(logging.Handler):
    """Calls `then` when RouteSync logs a failed route update (synchronously: before the
    waiters of the failed update are woken)."""

    def __init__(self, then: Callable[[], object]) -> None:
        super().__init__()
        self.then = then
        self.fired = False

    def emit(self, record: logging.LogRecord) -> None:
        if "route update failed" in record.getMessage() and not self.fired:
            self.fired = True
            self.then()


@pytest.fixture
async def node(settings: Settings, pools: ShardPools, own_redis: OwnRedis) -> AsyncIterator[Node]:
    s = dataclasses.replace(settings, redis_url=own_redis.url)
    async with running_node(s, pools, "pa-node") as node:
        yield node


async def test_a_second_connection_goes_online_when_the_first_ones_registration_failed(
    node: Node, admin: aioredis.Redis
) -> None:
    user = uid("pa")
    presence = RedisKeys(node.settings.redis_prefix).presence(user)
    node.sync.backoff = Backoff(0.5, 0.5)  # time for the test to let Redis write again
    first = Connection(Socket(), JsonCodec(), user, 100, 1 << 20)
    second = Connection(Socket(), JsonCodec(), user, 100, 1 << 20)
    first.on_close(node.detach)  # as gateway.ws wires it
    second.on_close(node.detach)
    loop = asyncio.get_running_loop()
    attaching: list[asyncio.Task[None]] = []
    hook = OnFailure(lambda: attaching.append(loop.create_task(node.attach(second))))
    log = logging.getLogger("agora.gateway")
    log.addHandler(hook)
    try:
        await admin.execute_command("ACL", "SETUSER", "default", "-sadd")
        with pytest.raises(Unavailable):
            await asyncio.wait_for(node.attach(first), 10)
        assert hook.fired and len(attaching) == 1
        first.close(CloseCode.TRY_AGAIN_LATER, "routing unavailable")  # as gateway.ws does
        await admin.execute_command("ACL", "SETUSER", "default", "+sadd")
        await asyncio.wait_for(attaching[0], 10)  # the second one's registration succeeded
    finally:
        log.removeHandler(hook)
        await admin.execute_command("ACL", "SETUSER", "default", "+sadd")
    assert node.user_conns.get(user) == {second}
    await asyncio.wait_for(node.presence.changes.idle(), 10)
    assert await admin.hget(presence, "on") == b"1", "connected, and never online"
