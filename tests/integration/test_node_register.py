"""A node's registration that fails part way is done again until it succeeds.

Registering everything (gateway.node._register_all: after the lease was found gone, or the
pub/sub connection came back) sets the lease, then writes the node's route
sets. When the route writes failed after the lease was set (here Redis refuses SADD; a
connection lost or a timeout part way does the same), the next renewals found the lease
and succeeded, so the routes were never written again: publishers found no route to this
node and its subscribers got nothing live (the periodic refresh only pushes back the
expiry of sets that exist, and does not put the node back into them). Real Redis of the
test's own and a node as gateway.app composes it; the connection's link is a recording
socket."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis

import gateway.node
from core.settings import Settings
from gateway.connection import Connection
from gateway.node import Node
from gateway.protocol.codec import JsonCodec
from storage.pools import ShardPools
from storage.redis_keys import RedisKeys
from tests.faults import OwnRedis
from tests.integration.helpers import running_node, uid
from tests.integration.test_node_lease import LEASE_S, Socket, until

pytestmark = pytest.mark.engines


@pytest.fixture
async def admin(own_redis: OwnRedis) -> AsyncIterator[aioredis.Redis]:
    """A client of a user of its own, whom the test's ACL changes leave every command."""
    default = aioredis.Redis.from_url(own_redis.url)
    await default.execute_command("ACL", "SETUSER", "admin", "on", "nopass", "~*", "&*", "+@all")
    await default.aclose()
    client = aioredis.Redis.from_url(own_redis.url, username="admin", password="")
    yield client
    await client.aclose()


async def test_a_registration_that_failed_after_setting_the_lease_is_done_again(
    settings: Settings, pools: ShardPools, own_redis: OwnRedis, admin: aioredis.Redis
) -> None:
    s = dataclasses.replace(settings, redis_url=own_redis.url, route_lease_s=LEASE_S)
    keys = RedisKeys(s.redis_prefix)
    user = uid("reg")
    route = keys.user_routes(user)
    async with running_node(s, pools, "reg-node") as node:
        await node.attach(Connection(Socket(), JsonCodec(), user, 100, 1 << 20))
        assert await admin.sismember(route, node.id)
        # Redis loses everything (a restart, a failover to an empty replica); another
        # node registers the user again at once, so the set exists without this node.
        # The node's own client may no longer SADD: its registration sets the lease, and
        # its route writes fail.
        await admin.execute_command("ACL", "SETUSER", "default", "-sadd")
        await admin.flushall()
        await admin.sadd(route, "other-node")
        losses, failures = node.lease_losses, node.lease_failures
        await until(lambda: node.lease_losses > losses, LEASE_S * 3, "the lease found gone")
        await until(lambda: node.lease_failures > failures, LEASE_S * 3, "registering failing")
        assert await admin.exists(keys.node_lease(node.id))  # set by the failed registration
        assert not await admin.sismember(route, node.id)
        await admin.execute_command("ACL", "SETUSER", "default", "+sadd")
        # Redis takes every write again: the registration must be done again, in full.
        # Before, the renewals held the lease and nothing registered the user again.
        renewals = node.lease_renewals
        for _ in range(100):
            if await admin.sismember(route, node.id):
                break
            await asyncio.sleep(LEASE_S * 3 / 100)
        assert await admin.sismember(route, node.id), (
            f"not registered again ({node.lease_renewals - renewals} renewals since)"
        )
        assert await admin.smembers(route) == {b"other-node", node.id.encode()}


async def _sadd_calls(admin: aioredis.Redis) -> int:
    """SADDs Redis was sent since the last CONFIG RESETSTAT (refused ones included)."""
    stats = await admin.info("commandstats")
    sadd = stats.get("cmdstat_sadd", {})
    return int(sadd.get("calls", 0)) + int(sadd.get("rejected_calls", 0))


async def _registrations_over(node: Node, admin: aioredis.Redis) -> None:
    """Wait until neither the listener nor the lease loop is registering: the listener
    reads its channel only after the registration of its reconnect, and the lease loop
    renews only when it does not register."""
    heard = asyncio.Event()
    node._on_delivery = lambda _data: heard.set()  # type: ignore[method-assign]
    channel = node.keys.node_channel(node.id)
    async with asyncio.timeout(30):
        while not heard.is_set():
            await admin.publish(channel, b"marker")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(heard.wait(), 0.1)
    renewals = node.lease_renewals
    await until(lambda: node.lease_renewals >= renewals + 2, LEASE_S * 3, "renewals")


async def test_a_registration_retried_while_redis_refuses_the_lease_sends_no_routes(
    settings: Settings, pools: ShardPools, own_redis: OwnRedis, admin: aioredis.Redis
) -> None:
    # Once a registration failed, every turn of the lease loop registers everything again
    # (every 0.1 s at first, then at most every third of the lease) until one succeeds.
    # While Redis refuses the lease itself (here an ACL; out of memory, or a read-only
    # replica after a failover, the same), each such try sent every route of the node
    # again, all refused: 2 commands per local conversation and user (a node of 20,000
    # sessions: ~80,000 commands and ~1 s of its CPU a try) where a renewal is one.
    s = dataclasses.replace(settings, redis_url=own_redis.url, route_lease_s=LEASE_S)
    keys = RedisKeys(s.redis_prefix)
    users = [uid(f"reg{i}") for i in range(200)]
    async with running_node(s, pools, "reg-node") as node:
        for user in users:
            await node.attach(Connection(Socket(), JsonCodec(), user, 100, 1 << 20))
        # A registration fails part way (its route writes refused), so the loop retries
        # it; then Redis refuses the lease too.
        await admin.execute_command("ACL", "SETUSER", "default", "-sadd")
        await admin.delete(keys.node_lease(node.id))
        failures = node.lease_failures
        await until(lambda: node.lease_failures > failures, LEASE_S * 3, "registering failing")
        await admin.execute_command("ACL", "SETUSER", "default", "-set")
        failures = node.lease_failures
        await until(lambda: node.lease_failures > failures, LEASE_S * 3, "one more failure")
        await admin.config_resetstat()
        failures = node.lease_failures
        await until(lambda: node.lease_failures >= failures + 3, LEASE_S * 6, "3 more tries")
        tries = node.lease_failures - failures
        sent = await _sadd_calls(admin)
        # Presence's retried scripts add to the node's presence set (a SADD or two); a
        # try that sends the routes is len(users) SADDs.
        assert sent < len(users), f"{sent} SADDs sent in {tries} tries refused at the lease"
        # Redis takes writes again: the next try registers every route.
        await admin.execute_command("ACL", "SETUSER", "default", "+set", "+sadd")
        for _ in range(100):
            if all([await admin.sismember(keys.user_routes(u), node.id) for u in users]):
                break
            await asyncio.sleep(LEASE_S * 3 / 100)
        for user in users:
            assert await admin.sismember(keys.user_routes(user), node.id)


class SlowUplink:
    """A TCP proxy in front of Redis (in the test's loop) passing what clients send at
    `rate` bytes a second (a slow link, or a Redis reading slowly); replies unthrottled."""

    def __init__(self, upstream: str, rate: float) -> None:
        u = urlsplit(upstream)
        self.host, self.port, self.rate = u.hostname or "127.0.0.1", u.port or 6379, rate
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/0"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def _serve(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection(self.host, self.port)

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter, slow: bool) -> None:
            try:
                while data := await r.read(16384):
                    if slow:
                        await asyncio.sleep(len(data) / self.rate)
                    w.write(data)
                    await w.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                w.close()

        for task in (
            asyncio.create_task(pump(cr, sw, True)),
            asyncio.create_task(pump(sr, cw, False)),
        ):
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.tasks):
            task.cancel()

    async def __aenter__(self) -> SlowUplink:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.stop()


@contextlib.asynccontextmanager
async def _on_slow_link(
    s: Settings, pools: ShardPools, own_redis: OwnRedis, users: list[str], rate: float, name: str
) -> AsyncIterator[Node]:
    """A node serving a session of each of `users`, its lease's client (registrations,
    refreshes) on a link that passes `rate` bytes a second."""
    async with (
        SlowUplink(own_redis.url, rate) as uplink,
        running_node(s, pools, name, lease_url=uplink.url) as node,
    ):
        await asyncio.gather(
            *(node.attach(Connection(Socket(), JsonCodec(), u, 100, 1 << 20)) for u in users)
        )
        yield node


async def test_a_registration_longer_than_a_lease_in_all_but_not_in_any_part_succeeds(
    settings: Settings, pools: ShardPools, own_redis: OwnRedis, admin: aioredis.Redis
) -> None:
    # A registration is bounded so that a Redis cut off by the network does not hang it.
    # Bounded as a whole by the lease, one whose commands take longer than a lease to go
    # out (a node of many sessions, its own CPU busy: ~2 s for 20,000 of them here, or a
    # slow link as here) timed out on every try, each a full registration again, and the
    # node was never registered (before e853e4c it had no bound and finished once). Its
    # parts (2,000 keys) are bounded instead: each is far inside a lease.
    s = dataclasses.replace(settings, redis_url=own_redis.url, route_lease_s=LEASE_S)
    n = 8000  # ~155 bytes of route commands each: ~1.2 MB, ~4 s at the link's rate
    keys = RedisKeys(s.redis_prefix)
    users = [uid(f"big{i}") for i in range(n)]
    # A part of 2,000 keys: ~1 s at the link's rate.
    async with _on_slow_link(s, pools, own_redis, users, 300_000, "reg-node") as node:
        await admin.delete(keys.node_lease(node.id), *[keys.user_routes(u) for u in users])
        losses = node.lease_losses
        await until(lambda: node.lease_losses > losses, LEASE_S * 3, "the lease found gone")
        async with asyncio.timeout(30):
            while True:
                found = await admin.exists(*[keys.user_routes(u) for u in users])
                if found == n:
                    break
                await asyncio.sleep(0.2)
        # And registered for good: a registration longer than the lease set at its start
        # must keep that lease, or the next renewal finds it gone and registers again
        # (forever, each as long), while publishers take the node for dead meanwhile.
        losses = node.lease_losses
        renewals = node.lease_renewals
        await until(lambda: node.lease_renewals >= renewals + 4, LEASE_S * 4, "renewals")
        assert node.lease_losses == losses, "the lease lapsed during the registration"


async def test_a_route_refresh_longer_than_a_lease_in_all_but_not_in_any_part_succeeds(
    settings: Settings,
    pools: ShardPools,
    own_redis: OwnRedis,
    admin: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The periodic refresh (every ROUTE_REFRESH_S: pushing back the expiry of every route
    # set the node is in) was bounded as a whole by the lease too: on a node whose
    # refresh takes longer (many sessions, a busy CPU; here a slow link) it timed out on
    # every try, so the route sets expired an hour later and the node's subscribers got
    # nothing live (the parts a timed-out try had sent may still land, each try from the
    # start: its whole cost again). Bounded per part, as registering is.
    monkeypatch.setattr(gateway.node, "ROUTE_REFRESH_S", 1.0)  # due at once, not in 15 min
    s = dataclasses.replace(settings, redis_url=own_redis.url, route_lease_s=LEASE_S)
    n = 12000  # ~70 bytes of EXPIRE each: ~0.85 MB, ~2.8 s at the link's rate
    users = [uid(f"ref{i}") for i in range(n)]
    # A part of 2,000 keys: ~0.5 s at the link's rate.
    async with _on_slow_link(s, pools, own_redis, users, 300_000, "ref-node") as node:
        # Refreshes come due at once and then every second: each must end, not time out
        # (a timed-out one is a lease failure, tried again 0.1 s later, from the start).
        # Once the attaches are done (they starve this loop, the link's too), a turn to
        # settle; then a refresh also keeps the lease (no renewal runs meanwhile).
        settled = node.lease_renewals
        await until(lambda: node.lease_renewals >= settled + 2, 30, "settled")
        failures, renewals = node.lease_failures, node.lease_renewals
        losses = node.lease_losses
        await until(lambda: node.lease_renewals >= renewals + 4, 30, "renewals")
        assert node.lease_failures == failures, (
            f"{node.lease_failures - failures} refreshes timed out"
        )
        assert node.lease_losses == losses, "the lease lapsed during a refresh"


@contextlib.asynccontextmanager
async def _serving(
    settings: Settings, pools: ShardPools, own_redis: OwnRedis, admin: aioredis.Redis, n: int
) -> AsyncIterator[tuple[Node, list[str]]]:
    """A node serving `n` users (and their route keys), its lease's client on a slow link
    (a registration ~1 s: a turn of the lease loop), every write of their connects out
    and Redis's command counts reset."""
    s = dataclasses.replace(settings, redis_url=own_redis.url, route_lease_s=LEASE_S)
    keys = RedisKeys(s.redis_prefix)
    users = [uid(f"once{i}") for i in range(n)]
    # ~155 bytes of route commands each.
    async with _on_slow_link(s, pools, own_redis, users, 150_000, "once-node") as node:
        await asyncio.wait_for(node.presence.changes.idle(), 10)  # their SADDs out too
        await admin.config_resetstat()
        yield node, [keys.user_routes(u) for u in users]


async def test_a_registration_after_a_pubsub_reconnect_runs_alone(
    settings: Settings, pools: ShardPools, own_redis: OwnRedis, admin: aioredis.Redis
) -> None:
    # The pub/sub connection came back: the listener registers everything (what Redis
    # held may be gone). The lease loop, waking while that ran, found a registration due
    # and ran a second one at once: every route written twice (a node of 20,000 users,
    # 20,000 SADDs and their EXPIREs more). One registration at a time.
    n = 1000
    async with _serving(settings, pools, own_redis, admin, n) as (node, routes):
        await admin.delete(*routes)  # written again: the registration is seen to happen
        await admin.client_kill_filter(_type="pubsub")
        await _registrations_over(node, admin)
        assert await admin.exists(*routes) == n
        sent = await _sadd_calls(admin)
        assert n <= sent < 2 * n, f"{sent} SADDs: {n} users registered more than once"


async def test_a_pubsub_reconnect_after_the_lease_loop_began_registering_adds_none(
    settings: Settings,
    pools: ShardPools,
    own_redis: OwnRedis,
    admin: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Redis lost everything (a restart): the lease loop finds its lease gone and registers
    # everything; the listener, whose connection was lost with it, subscribes again after
    # that began and registered everything once more. A registration begun after the
    # loss was seen covers it: the listener waits for that one and writes nothing.
    # The loss is seen first, then the lease goes: deleted first, a renewal between the
    # two began a registration before the loss was seen, which rightly does not cover it
    # (test_a_pubsub_loss_seen_after_a_registration_began_registers_again).
    monkeypatch.setattr(gateway.node, "PUBSUB_RETRY_S", 2.0)  # after the lease loop's turn
    n = 1000
    async with _serving(settings, pools, own_redis, admin, n) as (node, routes):
        seen = node.pubsub_losses
        await admin.client_kill_filter(_type="pubsub")
        await until(lambda: node.pubsub_losses > seen, LEASE_S, "the pub/sub loss seen")
        losses = node.lease_losses
        await admin.delete(node.keys.node_lease(node.id), *routes)
        await until(lambda: node.lease_losses > losses, LEASE_S * 3, "the lease found gone")
        await _registrations_over(node, admin)
        assert await admin.exists(*routes) == n
        sent = await _sadd_calls(admin)
        assert n <= sent < 2 * n, f"{sent} SADDs: {n} users registered more than once"


async def test_a_pubsub_loss_seen_after_a_registration_began_registers_again(
    settings: Settings, pools: ShardPools, own_redis: OwnRedis, admin: aioredis.Redis
) -> None:
    # The other side of running one at a time: the pub/sub connection lost while the lease
    # loop's registration runs (Redis may have lost what that one wrote before) is not
    # covered by it: the listener registers again once it has ended.
    n = 1000
    async with _serving(settings, pools, own_redis, admin, n) as (node, routes):
        await admin.delete(node.keys.node_lease(node.id), *routes)
        losses = node.lease_losses
        await until(lambda: node.lease_losses > losses, LEASE_S * 3, "the lease found gone")
        await admin.client_kill_filter(_type="pubsub")  # the registration is under way
        await _registrations_over(node, admin)
        assert await admin.exists(*routes) == n
        sent = await _sadd_calls(admin)
        assert sent >= 2 * n, f"{sent} SADDs: {n} users not registered after the loss"
