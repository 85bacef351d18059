"""Presence: a user is online while they have a connection on any gateway, and offline
AGORA_PRESENCE_GRACE_S after their last one closed (a reconnect or a drain in between
changes nothing, so nothing flaps).

State lives in Redis, per user (`presence` hash: on, seen). Transitions are atomic:
- a node whose first connection of a user attached (after registering the user's route)
  sets `on`; only a real change (off -> on) is announced;
- a node whose last connection of a user closed waits the grace period, then, unless the
  user came back to it, sets `on = 0` only if no *other* live gateway has the user in its
  route set, checked in the same script: a reconnect to another node either registered
  first (then the user stays online) or comes after (then it announces online again);
- a gateway that dies runs no detach: every node heartbeats in `presence_nodes`; one node
  at a time (a Redis lock) sweeps the users of nodes whose heartbeat stopped, with the same
  script.

Announcing costs O(conversations the user is in), never O(members): one `presence` frame
per gateway that has subscribers of the user's direct conversations and groups of at most
AGORA_PRESENCE_MAX_MEMBERS members (`Delivery.presence`); each node hands it once to each
local connection subscribed to any of them. Bigger rooms ask `GET .../presence`.

Announcements of two gateways keep the order of the states they announce (a single Redis):
a gateway publishes a change only if it is still the user's state, checked and published
in one script (`_PUBLISH_IF_CURRENT`): a slow "offline" never follows another gateway's
"online" of a user who reconnected there.

A key of the wrong type (something SET a string at a user's presence hash or route set)
costs that user alone: coming online replaces a presence key that is not a hash; going
offline takes it for offline, and a route key that is not a set for one with no gateway
(fanout/routing.py). One such key once failed every batch it was in, retried for as long
as it stayed bad: nobody on that node went online or offline meanwhile.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from core.tasks import stop_tasks
from fanout.envelope import Delivery, encode_delivery
from gateway.batches import Batcher
from gateway.coalesce import Coalescer
from gateway.protocol import frames
from storage import conversations, presence
from storage.ids import now_ms
from storage.pools import ShardPools

log = logging.getLogger("agora.gateway")
PRESENCE_TTL_S = 30 * 24 * 3600  # last_seen is kept a month after the last change
COUNT_EVERY_S = 1.0  # presence_count: at most once a second per thread
COUNT_VALID_MS = 3000  # a gateway's count is trusted this long after it wrote it
MAX_KINDS = 100_000
PRESENCE_LINGER_S = 0.02  # a batch of presence changes waits this long for more
STOP_RECANCEL_S = 0.1  # how long `stop` waits for a cancelled task before cancelling again

# A user coming online, for many users in one call (a single Redis): per user, `on` and
# `seen` set in their presence hash (with its TTL) and the user added to this node's presence
# set (with its TTL); answers, per user in order, 1 when they were not online before.
# KEYS: the users' presence hashes, then this node's presence set; ARGV: now ms, ttl, node
# set ttl, then the users in KEYS' order. One command per batch of users coming online (a
# storm: a few) instead of one script call per user. A presence key that is not a hash
# (WRONGTYPE) is replaced, not the whole batch's failure (module docstring).
_ONLINE_MANY = """
local n = #KEYS - 1
local node_set, out = KEYS[#KEYS], {}
for i = 1, n do
  local was = redis.pcall('HGET', KEYS[i], 'on')
  if type(was) == 'table' and was.err then
    redis.call('DEL', KEYS[i])
    was = false
  end
  redis.call('HSET', KEYS[i], 'on', '1', 'seen', ARGV[1])
  redis.call('EXPIRE', KEYS[i], ARGV[2])
  redis.call('SADD', node_set, ARGV[3 + i])
  if was == '1' then out[i] = 0 else out[i] = 1 end
end
redis.call('EXPIRE', node_set, ARGV[3])
return out
"""

# KEYS: presence hash, the user's route set. ARGV: now ms, ttl, the node giving the user
# up, the lease key prefix. 1 when the user went offline now; 0 when another live gateway
# still has them (or they were offline already). Keys of the wrong type: a presence key
# that is not a hash is not online, a route key that is not a set holds no gateway.
_OFFLINE = """
if redis.pcall('HGET', KEYS[1], 'on') ~= '1' then return 0 end
local members = redis.pcall('SMEMBERS', KEYS[2])
if members.err then members = {} end
for _, node in ipairs(members) do
  if node ~= ARGV[3] and redis.call('EXISTS', ARGV[4] .. node) == 1 then return 0 end
end
redis.call('HSET', KEYS[1], 'on', '0', 'seen', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""


# Announcing (a single Redis): the frames are published only if every user's `on` is still
# the state announced, checked in the same script. A gateway whose announcement was slow
# (its rooms' read) no longer publishes "offline" after another gateway wrote the user
# online and announced it: that write came before this script (then "offline" is stale
# and dropped) or after it (then its "online" is published after this, on the same
# channels). KEYS: the users' presence hashes; ARGV: '1' or '0' per key, then channel and
# payload pairs. Returns the (1-based) indexes of the stale states; nothing is published
# unless there are none.
_PUBLISH_IF_CURRENT = """
local stale = {}
for i, key in ipairs(KEYS) do
  local on = redis.pcall('HGET', key, 'on')
  if type(on) ~= 'string' then on = '0' end
  if on ~= ARGV[i] then stale[#stale + 1] = i end
end
if #stale > 0 then return stale end
for j = #KEYS + 1, #ARGV, 2 do redis.call('PUBLISH', ARGV[j], ARGV[j + 1]) end
return stale
"""


# Redis Cluster: the presence hash, the node's set, the route set and the leases live in
# different slots, so no script may touch more than one. Online: the hash's script and the
# node-set commands go out together. Offline: the route set and the leases are read first,
# then this compare-and-set turns the hash offline only if its `seen` is still the one read
# (a gateway that took the user meanwhile rewrote it: then nothing changes).
# KEYS: presence hash. ARGV: now ms, ttl, the `seen` read before.
_OFFLINE_CAS = """
if redis.pcall('HGET', KEYS[1], 'on') ~= '1' then return 0 end
if redis.pcall('HGET', KEYS[1], 'seen') ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], 'on', '0', 'seen', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS: presence hash. ARGV: now ms, ttl. 1 when the user was not online before.
_ONLINE_HASH = """
local was = redis.pcall('HGET', KEYS[1], 'on')
if type(was) == 'table' and was.err then
  redis.call('DEL', KEYS[1])
  was = false
end
redis.call('HSET', KEYS[1], 'on', '1', 'seen', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[2])
if was == '1' then return 0 end
return 1
"""


class Presence:
    def __init__(self, node: Any, pools: ShardPools) -> None:
        self.node = node  # gateway.node.Node (not imported: node.py calls into this)
        self.pools = pools
        self.redis: aioredis.Redis = node.redis
        # The pipelined connection of the node's batched writes (None: redis-py's pool).
        self.line = node.routes.line
        self.keys = node.keys
        self.grace_s = float(node.settings.presence_grace_s)
        self.max_members = int(node.settings.presence_max_members)
        self.lease_s = int(node.settings.route_lease_s)
        self._offline = self.redis.register_script(_OFFLINE)
        self._online_hash = self.redis.register_script(_ONLINE_HASH)
        self._offline_cas = self.redis.register_script(_OFFLINE_CAS)
        # The users whose last local connection closed, and when their grace ends (in the
        # order they left, which is the order of their deadlines: the grace is one length).
        self._grace: dict[str, float] = {}
        self._grace_changed = asyncio.Event()
        # Users whose state to write to Redis, decided when the batch goes out (from the
        # node's connections then): online, offline, or nothing. One pipeline for many
        # users, so a mass connect or disconnect costs a few round trips, not one each.
        # Redis away for long: the changes wait (one per user) and are retried; if this
        # process ends first, the sweep of dead nodes gives its users up.
        # Each batch waits PRESENCE_LINGER_S for more: a batch costs a Redis call and a
        # PostgreSQL read per shard (the rooms of those coming online), and in a storm of
        # connects the batches without it were ~4 users each (bench/RESULTS.md, issue 14,
        # "Connects"). Nobody waits on these writes: `hello` does not.
        self.changes: Batcher[str, None] = Batcher(
            "presence changes", self._write, _keep, linger_s=PRESENCE_LINGER_S
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self.announced = 0  # presence transitions this node announced
        self._kinds: dict[int, str] = {}  # conversation kinds never change: cached
        # Users coming online together (a connection storm) share one read per shard.
        self.rooms: Coalescer[str, list[tuple[int, int]]] = Coalescer(
            functools.partial(presence.shared_many, pools)
        )
        # thread -> (the total its local subscribers last got, how many they were then)
        self._sent: dict[int, tuple[int, int]] = {}

    # -- hooks of gateway.node.Node ------------------------------------------------------
    def attached(self, user: str) -> None:
        """The first local connection of `user` (its route is registered already)."""
        self._grace.pop(user, None)  # back within the grace period: nothing changes
        self.changes.add(user, None)

    def detached(self, user: str) -> None:
        """The last local connection of `user` closed."""
        if user not in self._grace:
            self._grace[user] = time.monotonic() + self.grace_s
            self._grace_changed.set()

    # -- transitions -----------------------------------------------------------------------
    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _graces(self) -> None:
        """One timer for every user in their grace: those whose grace ended without a
        connection coming back go to `changes` (to be given up)."""
        while True:
            if not self._grace:
                self._grace_changed.clear()
                await self._grace_changed.wait()
                continue
            user, until = next(iter(self._grace.items()))
            wait = until - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            del self._grace[user]
            if not self.node.user_conns.get(user):
                self.changes.add(user, None)

    async def _write(self, batch: dict[str, None]) -> None:
        """Online the users with a local connection now; offline (unless another gateway
        has them) those without one whose grace is over; nothing for those in their grace
        (their timer brings them back). Retried as a whole on a Redis error: setting
        online, and the offline compare-and-set, are idempotent."""
        online = [u for u in batch if self.node.user_conns.get(u)]
        offline = [u for u in batch if not self.node.user_conns.get(u) and u not in self._grace]
        if not online and not offline:
            return
        seen = now_ms()
        if self.keys.cluster:
            # Scripts touch one slot each and cannot share a cluster pipeline: one by one.
            went_on = [u for u in online if await self._went_online_on_cluster(u)]
            went_off = [u for u in offline if await self._give_up_on_cluster(u, self.node.id, seen)]
            if offline:
                await self.redis.srem(self.keys.presence_node(self.node.id), *offline)
        else:
            node_set = self.keys.presence_node(self.node.id)
            flags: list[Any] = []
            if online:
                # One EVAL for every user coming online (a storm: one per batch); EVAL, not
                # EVALSHA: nothing to load again after a restart or SCRIPT FLUSH.
                keys = [self.keys.presence(user) for user in online]
                args = (*keys, node_set, seen, PRESENCE_TTL_S, self.lease_s * 3, *online)
                if self.line is not None:
                    flags = await self.line.execute("EVAL", _ONLINE_MANY, len(keys) + 1, *args)
                else:
                    flags = await self.redis.eval(_ONLINE_MANY, len(keys) + 1, *args)
            pipe = self.redis.pipeline(transaction=False)
            for user in offline:
                await self._offline(
                    keys=[self.keys.presence(user), self.keys.user_routes(user)],
                    args=[seen, PRESENCE_TTL_S, self.node.id, self.keys.node_lease("")],
                    client=pipe,
                )
            if offline:
                pipe.srem(node_set, *offline)
            replies = await pipe.execute() if offline else []
            went_on = [u for u, r in zip(online, flags, strict=True) if int(r)]
            went_off = [u for u, r in zip(offline, replies, strict=False) if int(r)]
        changed: list[tuple[str, bool, int | None]] = [(u, True, None) for u in went_on]
        changed += [(u, False, seen) for u in went_off]
        if not changed:
            return
        try:  # best effort, after the state is written (a retry would find no change)
            await self.announce_many(changed)
        except Exception as exc:
            log.warning("presence of %d users not announced: %s", len(changed), exc)

    async def _went_online_on_cluster(self, user: str) -> bool:
        node_set = self.keys.presence_node(self.node.id)
        changed, _, _ = await asyncio.gather(
            self._online_hash(keys=[self.keys.presence(user)], args=[now_ms(), PRESENCE_TTL_S]),
            self.redis.sadd(node_set, user),
            self.redis.expire(node_set, self.lease_s * 3),
        )
        return bool(int(changed))

    async def give_up(self, user: str, node: str) -> bool:
        """`node` no longer has `user`: offline unless another live gateway does."""
        seen = now_ms()
        if self.keys.cluster:
            changed = await self._give_up_on_cluster(user, node, seen)
        else:
            changed = await self._offline(
                keys=[self.keys.presence(user), self.keys.user_routes(user)],
                args=[seen, PRESENCE_TTL_S, node, self.keys.node_lease("")],
            )
        if int(changed):
            await self.announce(user, False, seen)
            return True
        return False

    async def _give_up_on_cluster(self, user: str, node: str, seen: int) -> int:
        """_OFFLINE in steps that each touch one slot (see _OFFLINE_CAS)."""
        state, members = await asyncio.gather(
            self.redis.hmget(self.keys.presence(user), ["on", "seen"]),
            self.redis.smembers(self.keys.user_routes(user)),
            return_exceptions=True,
        )
        # Keys of the wrong type (_OFFLINE): not online; no gateway.
        if isinstance(state, BaseException):
            if not _wrong_type(state):
                raise state
            return 0
        if isinstance(members, BaseException):
            if not _wrong_type(members):
                raise members
            members = set()
        on, was_seen = (_text(v) if v is not None else None for v in state)
        if on != "1" or was_seen is None:
            return 0
        others = {_text(m) for m in members} - {node}
        if others and await self.node.routes.live_nodes(others):
            return 0
        changed: int = await self._offline_cas(
            keys=[self.keys.presence(user)], args=[seen, PRESENCE_TTL_S, was_seen]
        )
        return changed

    async def announce(self, user: str, online: bool, last_seen: int | None) -> None:
        """One `presence` frame per gateway with subscribers of the user's small rooms."""
        await self.announce_many([(user, online, last_seen)])

    async def announce_many(self, changes: list[tuple[str, bool, int | None]]) -> None:
        """`announce` for several users: their rooms read together (one query per shard),
        one route lookup, one publish per gateway with every frame for it."""
        rooms = await asyncio.gather(
            *(self.rooms.read(self.pools.for_user(u), u) for u, _, _ in changes)
        )
        wanted = [
            (frames.presence(u, online, seen), [c for c, n in found if n <= self.max_members])
            for (u, online, seen), found in zip(changes, rooms, strict=True)
        ]
        wanted = [(frame, convs) for frame, convs in wanted if convs]
        if not wanted:
            return
        by_conv, _ = await self.node.routes.nodes_for(
            convs=sorted({c for _, convs in wanted for c in convs})
        )
        while True:  # each round that finds states stale drops at least one
            deliveries = _deliveries(wanted, by_conv)
            if self.keys.cluster or not deliveries:
                # A cluster: the hashes and channels are in different slots (no script
                # over them); announcements of two gateways may arrive out of order there.
                await self.node.routes.publish(deliveries)
                break
            stale = await self._publish_if_current(wanted, deliveries)
            if not stale:
                break
            # Changed meanwhile (another gateway's announcement of it is due, or out):
            # the others go out without it.
            wanted = [w for i, w in enumerate(wanted) if i not in stale]
            if not wanted:
                return
        self.announced += len(wanted)

    async def _publish_if_current(
        self, wanted: list[tuple[dict[str, Any], list[int]]], deliveries: dict[str, Delivery]
    ) -> set[int]:
        """Publish `deliveries` in one script that first checks every announced state is
        still the user's (`_PUBLISH_IF_CURRENT`); the indexes in `wanted` of those that
        are not (nothing published then)."""
        keys = [self.keys.presence(frame["user"]) for frame, _ in wanted]
        args: list[Any] = ["1" if frame["online"] else "0" for frame, _ in wanted]
        for n, delivery in deliveries.items():
            args += [self.keys.node_channel(n), encode_delivery(delivery)]
        if self.line is not None:
            found = await self.line.execute("EVAL", _PUBLISH_IF_CURRENT, len(keys), *keys, *args)
        else:
            found = await self.redis.eval(_PUBLISH_IF_CURRENT, len(keys), *keys, *args)
        return {int(i) - 1 for i in found}

    # -- every node: heartbeat; one node at a time: sweep the dead ones -------------------
    async def run(self) -> None:
        counts = self._spawn(self._count_threads())
        graces = self._spawn(self._graces())
        try:
            await self._sweep_forever()
        finally:
            counts.cancel()
            graces.cancel()

    async def _sweep_forever(self) -> None:
        while True:
            try:
                await self._heartbeat()
                await self._sweep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("presence sweep failed: %s", exc)
            await asyncio.sleep(max(1.0, min(self.grace_s, self.lease_s) / 2))

    async def _heartbeat(self) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(self.keys.presence_nodes(), {self.node.id: now_ms()})
        pipe.expire(self.keys.presence_nodes(), max(3600, self.lease_s * 10))
        pipe.expire(self.keys.presence_node(self.node.id), self.lease_s * 3)
        await pipe.execute()

    async def _sweep(self) -> None:
        lock = await self.redis.set(
            self.keys.presence_sweep(), self.node.id, nx=True, ex=max(1, int(self.grace_s))
        )
        if not lock:
            return
        stale_before = now_ms() - self.lease_s * 1000
        raw = await self.redis.zrangebyscore(self.keys.presence_nodes(), "-inf", stale_before)
        candidates = {r.decode() if isinstance(r, bytes) else str(r) for r in raw}
        candidates.discard(self.node.id)
        if not candidates:
            return
        # Late, not necessarily dead: a node still holding its lease keeps its users.
        alive = await self.node.routes._live_nodes(candidates)
        for dead in candidates - alive:
            users = await self.redis.smembers(self.keys.presence_node(dead))
            for raw_user in users:
                user = raw_user.decode() if isinstance(raw_user, bytes) else str(raw_user)
                await self.give_up(user, dead)
            await self.redis.delete(self.keys.presence_node(dead))
            await self.redis.zrem(self.keys.presence_nodes(), dead)
            log.info("presence: took over %d users of dead node %s", len(users), dead)

    # -- post threads: counts only ---------------------------------------------------------
    async def _count_threads(self) -> None:
        """Each second: write this node's subscriber count of every thread it has
        subscribers of, read every node's, and tell the local subscribers the total when
        it changed. One pipelined round trip per second, whatever the threads' sizes; no
        frame crosses gateways."""
        while True:
            await asyncio.sleep(COUNT_EVERY_S)
            try:
                await self.count_threads_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("thread presence counts failed: %s", exc)

    async def count_threads_once(self) -> None:
        local = {c: len(s) for c, s in list(self.node.conv_subs.items()) if s}
        for conv in [c for c in local if c not in self._kinds][:1000]:
            found = await conversations.access(self.pools, conv, "")
            if len(self._kinds) >= MAX_KINDS:
                self._kinds.clear()
            self._kinds[conv] = found[0] if found else ""
        threads = [c for c in local if self._kinds.get(c) == "thread"]
        for gone in [c for c in self._sent if c not in local]:
            del self._sent[gone]
        if not threads:
            return
        now = now_ms()
        pipe = self.redis.pipeline(transaction=False)
        for conv in threads:
            key = self.keys.presence_watchers(conv)
            pipe.hset(key, self.node.id, f"{local[conv]}:{now + COUNT_VALID_MS}")
            pipe.expire(key, 10)
            pipe.hgetall(key)
        replies = await pipe.execute()
        for i, conv in enumerate(threads):
            total = 0
            for raw in replies[i * 3 + 2].values():
                count, _, until = (raw.decode() if isinstance(raw, bytes) else raw).partition(":")
                if int(until) >= now:  # a dead gateway's count fades out
                    total += int(count)
            # Sent again when the total moved, or to a subscriber that joined since.
            if self._sent.get(conv) != (total, local[conv]):
                self._sent[conv] = (total, local[conv])
                subs = self.node.conv_subs.get(conv)
                if subs:
                    self.node._broadcast(frames.presence_count(conv, total), subs)

    async def states(self, users: list[str]) -> dict[str, tuple[bool, int | None]]:
        """{user: (online, last_seen)} in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for user in users:
            pipe.hmget(self.keys.presence(user), "on", "seen")
        out: dict[str, tuple[bool, int | None]] = {}
        for user, (on, seen) in zip(users, await pipe.execute(), strict=True):
            online = on in (b"1", "1")
            out[user] = (online, None if online or seen is None else int(seen))
        return out

    async def stop(self) -> None:
        await self.changes.stop()
        # Cancelled again until each ends (core/tasks.py: a cancellation can be lost).
        await stop_tasks(list(self._tasks), STOP_RECANCEL_S)


def _deliveries(
    wanted: list[tuple[dict[str, Any], list[int]]], by_conv: dict[int, set[str]]
) -> dict[str, Delivery]:
    """One delivery per gateway with subscribers of the rooms: each frame with its rooms
    there."""
    deliveries: dict[str, Delivery] = {}
    for frame, convs in wanted:
        per_node: dict[str, list[int]] = {}
        for conv in convs:
            for n in by_conv.get(conv, ()):
                per_node.setdefault(n, []).append(conv)
        for n, node_convs in per_node.items():
            deliveries.setdefault(n, Delivery()).presence.append((node_convs, frame))
    return deliveries


def _keep(old: None, new: None) -> None:
    return None


def _wrong_type(exc: BaseException) -> bool:
    return isinstance(exc, ResponseError) and str(exc).startswith("WRONGTYPE")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
