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

A route key holding something other than a set (written by hand or by a bug: SADD and
SMEMBERS on it fail with WRONGTYPE) costs that key alone: a node's writes replace it with
a set holding the node (`_REPAIR`; such a key held no node's registration anyway, and
only a set can be written back), and lookups take it for a set without nodes. Its failure
once failed every conversation and user of the same route batch, registration or fan-out
lookup, for as long as the key stayed bad.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Iterable
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from fanout.envelope import DELIVERY_HEAD, Delivery, encode_delivery, message_rows
from storage.models import Message
from storage.redis_keys import RedisKeys
from storage.redisline import RedisLine

log = logging.getLogger("agora.routing")
_LIVENESS_CACHE_S = 1.0
ROUTE_TTL_S = 3600
ROUTE_REFRESH_S = ROUTE_TTL_S / 4
_REFRESH_CHUNK = 2000

# KEYS[1]: a route key found holding something else than a set; ARGV: the node, the TTL.
# Replaced by a set of the node, unless another node's repair made it a set already (then
# it is kept: the check and the write are one step, so no node's entry is deleted).
_REPAIR = """
if redis.call('TYPE', KEYS[1]).ok ~= 'set' then redis.call('DEL', KEYS[1]) end
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 0
"""

# A worker batch's route lookup, liveness check, prune and per-node PUBLISH in one round
# trip (a single Redis; a cluster keeps `nodes_for` + `publish`). Run after the batch's
# commit, so a node that registered a route before it runs gets the messages. The same
# decisions as `_live_nodes` and `_prune`, made fresh for every batch (no cache to go
# stale: a node found dead and registered again within the cache's second is not pruned
# again): a node whose lease is gone but that still listens on its channel is alive; one
# that does neither is removed from the route sets it was found in; a route key that is not
# a set holds no node, as in `nodes_for`. Each live node gets
# one delivery, `encode_delivery(Delivery(messages=...))` byte for byte: the head of that
# map, an array header for its count of rows, and the rows of its conversations in the
# batch's order (each conversation's rows come encoded, one after another).
# KEYS: the route set of each conversation. ARGV: lease key prefix, channel prefix, the
# delivery's head, then per conversation its rows, then per conversation their count.
_PUBLISH_BATCH = """
local lease_prefix, chan_prefix, head = ARGV[1], ARGV[2], ARGV[3]
local n = #KEYS
local alive, parts, counts, order = {}, {}, {}, {}
for i = 1, n do
  local dead = {}
  local members = redis.pcall('SMEMBERS', KEYS[i])
  if members.err then
    -- A key that is not a set (module docstring) holds no node; any other error fails.
    if string.sub(members.err, 1, 9) ~= 'WRONGTYPE' then
      return redis.error_reply(members.err)
    end
    members = {}
  end
  for _, node in ipairs(members) do
    local live = alive[node]
    if live == nil then
      live = redis.call('EXISTS', lease_prefix .. node) == 1
      if not live then
        local found = redis.call('PUBSUB', 'NUMSUB', chan_prefix .. node)
        live = tonumber(found[2]) > 0
      end
      alive[node] = live
    end
    if live then
      if parts[node] == nil then
        parts[node] = {}
        counts[node] = 0
        order[#order + 1] = node
      end
      local p = parts[node]
      p[#p + 1] = ARGV[3 + i]
      counts[node] = counts[node] + tonumber(ARGV[3 + n + i])
    else
      dead[#dead + 1] = node
    end
  end
  if #dead > 0 then
    redis.call('SREM', KEYS[i], unpack(dead))
  end
end
for _, node in ipairs(order) do
  local c = counts[node]
  local header
  if c < 16 then
    header = string.char(0x90 + c)
  elseif c < 65536 then
    header = string.char(0xdc, math.floor(c / 256), c % 256)
  else
    header = string.char(0xdd, math.floor(c / 16777216) % 256, math.floor(c / 65536) % 256,
                         math.floor(c / 256) % 256, c % 256)
  end
  redis.call('PUBLISH', chan_prefix .. node, head .. header .. table.concat(parts[node]))
end
return #order
"""


class Routes:
    def __init__(
        self, redis: aioredis.Redis, keys: RedisKeys, line: RedisLine | None = None
    ) -> None:
        """`line` (a single Redis only): the pipelined connection `update` and
        `publish_messages` go over instead of redis-py's pool (storage/redisline.py: a third
        of the client CPU per command; a gateway's route updates are one write per batch of
        connects, a fan-out worker's publish one script call per batch)."""
        self.redis = redis
        self.keys = keys
        self.line = line if not keys.cluster else None
        self._alive: dict[str, tuple[bool, float]] = {}
        self._repair = redis.register_script(_REPAIR)
        self.repaired = 0  # route keys found not to be sets and replaced
        self._publish_batch = None if keys.cluster else redis.register_script(_PUBLISH_BATCH)
        self._publish_sha = None if self.line is None else self.line.script(_PUBLISH_BATCH)

    # -- the gateway side ------------------------------------------------------------------
    async def register(
        self,
        node: str,
        lease_s: int,
        convs: Iterable[int],
        users: Iterable[str],
        timeout_s: float | None = None,
    ) -> None:
        """(Re)register a node and everything it serves: the lease, then the routes in
        pipelines of `_REFRESH_CHUNK` keys. The lease goes alone first: a Redis that
        refuses it (out of memory, read-only, an ACL) or does not answer is not sent every
        route too, only to refuse them all (a node retries a failed registration every few
        seconds: 2 commands per local conversation and user each time, where this is one).
        `timeout_s` bounds each round trip, not the whole: a registration's time grows with
        the node's sessions (~2 s of the gateway's CPU for 20,000 here, bench/RESULTS.md),
        and one bounded as a whole by a short lease timed out on every try, forever."""
        await _bounded(self.redis.set(self.keys.node_lease(node), b"1", ex=lease_s), timeout_s)
        keys = [self.keys.conv_routes(c) for c in convs]
        keys += [self.keys.user_routes(u) for u in users]
        for i in range(0, len(keys), _REFRESH_CHUNK):
            chunk = keys[i : i + _REFRESH_CHUNK]
            await _bounded(self._register_chunk(node, lease_s, chunk), timeout_s)

    async def _register_chunk(self, node: str, lease_s: int, keys: list[str]) -> None:
        """One part of a registration, the lease set again first: a registration that
        takes longer than the lease (many sessions) keeps it; lapsed, the node's next
        renewal would find it gone and register everything again, every time."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.keys.node_lease(node), b"1", ex=lease_s)
        for key in keys:
            _add(pipe, key, node)
        replies = await pipe.execute(raise_on_error=False)
        if isinstance(replies[0], Exception):
            raise replies[0]
        await self._settle(node, keys, replies[1:], [])

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
        adds = [self.keys.conv_routes(c) for c in add_convs]
        adds += [self.keys.user_routes(u) for u in add_users]
        drops = [self.keys.conv_routes(c) for c in drop_convs]
        drops += [self.keys.user_routes(u) for u in drop_users]
        if not adds and not drops:
            return
        # Each command's error in its place (a bad key is that key's problem, `_settle`).
        if line is not None:
            # The same commands as below, written at once on the line (storage/redisline.py).
            commands: list[tuple[Any, ...]] = []
            for key in adds:
                commands += [("SADD", key, node), ("EXPIRE", key, ROUTE_TTL_S)]
            commands += [("SREM", key, node) for key in drops]
            replies = await line.pipeline(commands, raise_on_error=False)
        else:
            pipe = self.redis.pipeline(transaction=False)
            for key in adds:
                _add(pipe, key, node)
            for key in drops:
                pipe.srem(key, node)
            replies = await pipe.execute(raise_on_error=False)
        n = 2 * len(adds)
        await self._settle(node, adds, replies[:n], replies[n:])

    async def _settle(
        self, node: str, adds: list[str], add_replies: list[Any], drop_replies: list[Any]
    ) -> None:
        """After a route batch sent with its errors in place (`add_replies`: SADD's and
        EXPIRE's of each key added): a key that is not a set is repaired where the node
        was added (`_REPAIR`), and left as it is where it was dropped (no set there: the
        node is in none); any other error (Redis out of memory, read-only, a permission)
        raises, the batch failed."""
        for reply in (*add_replies, *drop_replies):
            if isinstance(reply, Exception) and not _wrong_type(reply):
                raise reply
        bad = [
            key
            for key, reply in zip(adds, add_replies[::2], strict=True)
            if isinstance(reply, Exception)
        ]
        for key in bad:  # rare: one script call each (on a cluster the keys' slots differ)
            await self._repair(keys=[key], args=[node, ROUTE_TTL_S])
            self.repaired += 1
            log.warning("route key %s was not a set; replaced by one holding %s", key, node)

    async def refresh(
        self,
        node: str,
        convs: Iterable[int],
        users: Iterable[str],
        timeout_s: float | None = None,
        lease_s: int | None = None,
    ) -> int:
        """Push back the expiry of every route set the node is in (pipelined in chunks);
        a set found gone is made again. Returns how many were gone. Only the sets' expiry:
        a set that exists without the node is not mended (registering is `register`'s).
        `timeout_s` bounds each chunk, not the whole (see `register`); with `lease_s`, each
        chunk renews the node's lease too (if it is still there: a lease found gone is
        the next renewal's to see), so that a refresh longer than the lease keeps it."""
        keys = [self.keys.conv_routes(c) for c in convs]
        keys += [self.keys.user_routes(u) for u in users]
        gone = 0
        for i in range(0, len(keys), _REFRESH_CHUNK):
            chunk = keys[i : i + _REFRESH_CHUNK]
            gone += await _bounded(self._refresh_chunk(node, chunk, lease_s), timeout_s)
        return gone

    async def _refresh_chunk(self, node: str, chunk: list[str], lease_s: int | None) -> int:
        pipe = self.redis.pipeline(transaction=False)
        if lease_s is not None:
            pipe.set(self.keys.node_lease(node), b"1", ex=lease_s, xx=True)
        for key in chunk:
            pipe.expire(key, ROUTE_TTL_S)
        found = await pipe.execute()
        if lease_s is not None:
            found = found[1:]
        missing = [k for k, ok in zip(chunk, found, strict=True) if not ok]
        if missing:
            pipe = self.redis.pipeline(transaction=False)
            for key in missing:
                _add(pipe, key, node)
            await pipe.execute()
        return len(missing)

    async def leave(self, node: str, convs: Iterable[int], users: Iterable[str]) -> None:
        """A clean shutdown: drop the lease and every registration."""
        await self.update(node, drop_convs=convs, drop_users=users)
        await self.redis.delete(self.keys.node_lease(node))

    # -- the publisher side ----------------------------------------------------------------
    async def live_nodes(self, nodes: set[str]) -> set[str]:
        """Which of `nodes` are alive (lease held, or still listening); an alive verdict is
        cached a second."""
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
            dead = {n for n in lapsed if n not in listening}
            for n in unknown:
                if n in dead:
                    # Not kept: its routes are pruned now, so it is only seen again once
                    # it registered again (alive: a cached "dead" would prune that too).
                    self._alive.pop(n, None)
                else:
                    self._alive[n] = (True, now + _LIVENESS_CACHE_S)
            return {n for n in nodes if n not in dead}
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
        raw: list[Any] = await pipe.execute(raise_on_error=False)
        for r in raw:
            if isinstance(r, Exception) and not _wrong_type(r):
                raise r
        # A key that is not a set (module docstring) holds no node.
        sets = [set() if isinstance(r, Exception) else {_text(m) for m in r} for r in raw]
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

    async def publish_messages(self, by_conv: dict[int, list[Message]]) -> int:
        """Each live node serving any of the conversations gets one delivery of their
        messages (per conversation in the order given, conversations in `by_conv`'s order);
        dead nodes are pruned from these conversations' route sets. Routes are read now:
        call it after the messages are stored. How many nodes were sent a delivery.

        On a single Redis one round trip (`_PUBLISH_BATCH`); on a cluster, whose route sets
        and channels live in different slots, `nodes_for` and then `publish`."""
        if not by_conv:
            return 0
        script = self._publish_batch
        if script is None:
            nodes, _ = await self.nodes_for(convs=by_conv)
            deliveries: dict[str, Delivery] = {}
            for conv, msgs in by_conv.items():
                for node in nodes.get(conv, ()):
                    deliveries.setdefault(node, Delivery()).messages.extend(msgs)
            await self.publish(deliveries)
            return len(deliveries)
        convs = list(by_conv)
        rows = [message_rows(by_conv[c]) for c in convs]
        args: list[Any] = [self.keys.node_lease(""), self.keys.node_channel(""), DELIVERY_HEAD]
        args += rows
        args += [len(by_conv[c]) for c in convs]
        keys = [self.keys.conv_routes(c) for c in convs]
        if self.line is not None and self._publish_sha is not None:
            # The same script, its errors as redis-py's (a RedisError, or an OSError).
            return int(await self.line.evalsha(self._publish_sha, keys, args))
        return int(await script(keys=keys, args=args))

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


async def _bounded(step: Awaitable[Any], timeout_s: float | None) -> Any:
    if timeout_s is None:
        return await step
    return await asyncio.wait_for(step, timeout_s)


def _wrong_type(exc: Exception) -> bool:
    return isinstance(exc, ResponseError) and str(exc).startswith("WRONGTYPE")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _add(pipe: Any, key: str, node: str) -> None:
    pipe.sadd(key, node)
    pipe.expire(key, ROUTE_TTL_S)
