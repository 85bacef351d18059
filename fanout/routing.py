"""Who listens where: gateway nodes register their conversations and users in Redis.

A node holds a lease key (`node_lease`) that it renews; its entries in the per-conversation
and per-user route sets stay until a publisher notices the lease is gone and prunes them.
When the renewal finds the lease missing (it lapsed, or Redis restarted empty), the node
registers everything again. Publishers send one frame per (node, batch), never one per
recipient.

Every route set also expires (ROUTE_TTL_S) unless a live node refreshes it: a node that
dies leaves entries only in sets nobody publishes to, and those go with the TTL instead of
staying forever. Each live node refreshes its own sets every ROUTE_REFRESH_S, far inside
the TTL; a node cut off from Redis longer than its lease registers everything again.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from fanout.envelope import Delivery, encode_delivery
from storage.redis_keys import RedisKeys
from storage.redisline import RedisLine

_LIVENESS_CACHE_S = 1.0
ROUTE_TTL_S = 3600
ROUTE_REFRESH_S = ROUTE_TTL_S / 4
_REFRESH_CHUNK = 2000


class Routes:
    def __init__(
        self, redis: aioredis.Redis, keys: RedisKeys, line: RedisLine | None = None
    ) -> None:
        """`line` (a single Redis only): the pipelined connection `update` goes over
        instead of redis-py's pool (storage/redisline.py: a third of the client CPU per
        command; a gateway's route updates are one write per batch of connects)."""
        self.redis = redis
        self.keys = keys
        self.line = line if not keys.cluster else None
        self._alive: dict[str, tuple[bool, float]] = {}

    # -- the gateway side ------------------------------------------------------------------
    async def register(
        self, node: str, lease_s: int, convs: Iterable[int], users: Iterable[str]
    ) -> None:
        """(Re)register a node and everything it serves, in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.keys.node_lease(node), b"1", ex=lease_s)
        for conv in convs:
            _add(pipe, self.keys.conv_routes(conv), node)
        for user in users:
            _add(pipe, self.keys.user_routes(user), node)
        await pipe.execute()

    async def renew(self, node: str, lease_s: int) -> bool:
        """Extend the lease; False when it was gone (the caller must register again)."""
        ok = await self.redis.set(self.keys.node_lease(node), b"1", ex=lease_s, xx=True)
        return bool(ok)

    async def update(
        self,
        node: str,
        add_convs: Iterable[int] = (),
        drop_convs: Iterable[int] = (),
        add_users: Iterable[str] = (),
        drop_users: Iterable[str] = (),
    ) -> None:
        line = self.line
        if line is not None:
            # The same commands as below, written at once on the line (storage/redisline.py).
            commands: list[tuple[Any, ...]] = []
            for conv in add_convs:
                key = self.keys.conv_routes(conv)
                commands += [("SADD", key, node), ("EXPIRE", key, ROUTE_TTL_S)]
            for user in add_users:
                key = self.keys.user_routes(user)
                commands += [("SADD", key, node), ("EXPIRE", key, ROUTE_TTL_S)]
            commands += [("SREM", self.keys.conv_routes(c), node) for c in drop_convs]
            commands += [("SREM", self.keys.user_routes(u), node) for u in drop_users]
            if commands:
                await line.pipeline(commands)
            return
        pipe = self.redis.pipeline(transaction=False)
        n = 0
        for conv in add_convs:
            _add(pipe, self.keys.conv_routes(conv), node)
            n += 1
        for conv in drop_convs:
            pipe.srem(self.keys.conv_routes(conv), node)
            n += 1
        for user in add_users:
            _add(pipe, self.keys.user_routes(user), node)
            n += 1
        for user in drop_users:
            pipe.srem(self.keys.user_routes(user), node)
            n += 1
        if n:
            await pipe.execute()

    async def refresh(self, node: str, convs: Iterable[int], users: Iterable[str]) -> int:
        """Push back the expiry of every route set the node is in (pipelined in chunks);
        a set found gone is made again. Returns how many were gone."""
        keys = [self.keys.conv_routes(c) for c in convs]
        keys += [self.keys.user_routes(u) for u in users]
        gone = 0
        for i in range(0, len(keys), _REFRESH_CHUNK):
            chunk = keys[i : i + _REFRESH_CHUNK]
            pipe = self.redis.pipeline(transaction=False)
            for key in chunk:
                pipe.expire(key, ROUTE_TTL_S)
            found = await pipe.execute()
            missing = [k for k, ok in zip(chunk, found, strict=True) if not ok]
            if missing:
                gone += len(missing)
                pipe = self.redis.pipeline(transaction=False)
                for key in missing:
                    _add(pipe, key, node)
                await pipe.execute()
        return gone

    async def leave(self, node: str, convs: Iterable[int], users: Iterable[str]) -> None:
        """A clean shutdown: drop the lease and every registration."""
        await self.update(node, drop_convs=convs, drop_users=users)
        await self.redis.delete(self.keys.node_lease(node))

    # -- the publisher side ----------------------------------------------------------------
    async def live_nodes(self, nodes: set[str]) -> set[str]:
        """Which of `nodes` are alive (lease held, or still listening); cached a second."""
        return await self._live_nodes(nodes) if nodes else set()

    async def _live_nodes(self, nodes: set[str]) -> set[str]:
        now = time.monotonic()
        unknown = [n for n in nodes if self._alive.get(n, (False, 0.0))[1] < now]
        if unknown:
            flags = await self._get_many([self.keys.node_lease(n) for n in unknown])
            lapsed = [n for n, flag in zip(unknown, flags, strict=True) if flag is None]
            listening: set[str] = set()
            if lapsed:
                # A lease can lapse because an overloaded node renewed it late, not only
                # because the node died. A node still subscribed to its channel is alive
                # (Redis drops the subscription with the connection), so it keeps its
                # routes and gets its messages; it renews (or re-registers) when it can.
                by_channel = {self.keys.node_channel(n): n for n in lapsed}
                counts = await self._numsub(list(by_channel))
                listening = {
                    by_channel[ch.decode() if isinstance(ch, bytes) else ch]
                    for ch, count in counts
                    if count
                }
            for n in unknown:
                alive = n not in lapsed or n in listening
                self._alive[n] = (alive, now + _LIVENESS_CACHE_S)
        return {n for n in nodes if self._alive[n][0]}

    async def _get_many(self, keys: list[str]) -> list[Any]:
        if not self.keys.cluster:
            return list(await self.redis.mget(keys))
        # Leases of different nodes live in different slots: no MGET across them.
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            pipe.get(key)
        return list(await pipe.execute())

    async def _numsub(self, channels: list[str]) -> list[tuple[Any, int]]:
        if not self.keys.cluster:
            return list(await self.redis.pubsub_numsub(*channels))
        # A sharded channel's subscribers are known to its slot's shard only.
        cluster = cast(RedisCluster, self.redis)
        out: list[tuple[Any, int]] = []
        for channel in channels:
            node = cluster.get_node_from_key(channel)
            found = await cluster.execute_command("PUBSUB SHARDNUMSUB", channel, target_nodes=node)
            out.extend(found)
        return out

    async def nodes_for(
        self, convs: Iterable[int] = (), users: Iterable[str] = ()
    ) -> tuple[dict[int, set[str]], dict[str, set[str]]]:
        """Live nodes per conversation and per user (one round trip, plus one for liveness)."""
        conv_list = list(convs)
        user_list = list(users)
        if not conv_list and not user_list:
            return {}, {}
        pipe = self.redis.pipeline(transaction=False)
        for conv in conv_list:
            pipe.smembers(self.keys.conv_routes(conv))
        for user in user_list:
            pipe.smembers(self.keys.user_routes(user))
        raw: list[Any] = await pipe.execute()
        sets = [{m.decode() if isinstance(m, bytes) else m for m in r} for r in raw]
        every = set().union(*sets) if sets else set()
        live = await self._live_nodes(every)
        dead = every - live
        if dead:
            await self._prune(conv_list, user_list, sets, dead)
        by_conv = {c: s & live for c, s in zip(conv_list, sets[: len(conv_list)], strict=True)}
        by_user = {u: s & live for u, s in zip(user_list, sets[len(conv_list) :], strict=True)}
        return by_conv, by_user

    async def _prune(
        self, convs: list[int], users: list[str], sets: list[set[str]], dead: set[str]
    ) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for conv, s in zip(convs, sets[: len(convs)], strict=True):
            gone = s & dead
            if gone:
                pipe.srem(self.keys.conv_routes(conv), *gone)
        for user, s in zip(users, sets[len(convs) :], strict=True):
            gone = s & dead
            if gone:
                pipe.srem(self.keys.user_routes(user), *gone)
        await pipe.execute()

    async def publish(self, deliveries: dict[str, Delivery]) -> None:
        """One PUBLISH (SPUBLISH on a cluster) per node, all in one round trip."""
        if not deliveries:
            return
        pipe = self.redis.pipeline(transaction=False)
        for node, delivery in deliveries.items():
            channel = self.keys.node_channel(node)
            if self.keys.cluster:
                pipe.spublish(channel, encode_delivery(delivery))
            else:
                pipe.publish(channel, encode_delivery(delivery))
        await pipe.execute()


def _add(pipe: Any, key: str, node: str) -> None:
    pipe.sadd(key, node)
    pipe.expire(key, ROUTE_TTL_S)
