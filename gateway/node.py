"""The gateway node: local subscribers, routing registration and delivery.

Like Centrifuge's hub: the node knows which local connections follow which conversation
and user; it registers that in Redis (fanout.routing) under a renewed lease; and it turns
one delivery from Redis into frames, encoding each message once per encoding and pushing
the same bytes to every local subscriber.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import secrets
import socket
import time
from collections import defaultdict
from typing import Any, Protocol, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterPubSub

from core.errors import Unavailable
from core.settings import Settings
from core.tasks import stop_tasks
from fanout.envelope import Delivery, EnvelopeError, decode_delivery
from fanout.routing import ROUTE_REFRESH_S, Routes
from gateway.connection import Connection, Link, WireCounters
from gateway.heartbeat import keep_alive
from gateway.presence import Presence
from gateway.protocol import frames
from gateway.protocol.messages import message_frame
from gateway.protocol.subscription import State, Subscription
from gateway.routesync import RouteSync
from gateway.tailcheck import TailCheck
from gateway.transport import WRITE_HIGH_WATER
from storage import messages
from storage.models import Message
from storage.pools import ShardPools
from storage.redis_keys import RedisKeys
from storage.redisline import RedisLine

log = logging.getLogger("agora.gateway")
MAX_FILL_ROUNDS = 5
# After a failed lease renewal the next try comes this soon, then doubles up to the usual
# interval (a third of the lease) while they keep failing.
LEASE_RETRY_S = 0.1
STOP_RECANCEL_S = 0.1  # how long `stop` waits for a cancelled task before cancelling it again
PUBSUB_RETRY_S = 0.5  # between a lost pub/sub connection and the next subscribe

_LIVE = State.LIVE

# A conversation's local subscribers as the delivery loop walks them: grouped by wire
# counters and codec (one encode and one count per group), each (connection, its
# subscription, its link). Rebuilt after any subscription of the conversation changes.
_Writers = tuple[tuple[WireCounters, Any, tuple[tuple[Connection, Subscription, Link], ...]], ...]


class LatencySink(Protocol):
    def observe(self, value: float, count: int = 1) -> None: ...


class _NoLatency:
    def observe(self, value: float, count: int = 1) -> None:
        pass


def make_node_id(settings: Settings) -> str:
    if settings.node_id:
        return settings.node_id
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


class Node:
    def __init__(
        self,
        settings: Settings,
        node_id: str,
        redis: aioredis.Redis,
        pools: ShardPools,
        lease_redis: aioredis.Redis,
        line: RedisLine | None = None,
    ) -> None:
        """`lease_redis` (storage.redis_client.make_lease_redis): the node's own client for
        its lease, which requests never use, so that however many of them hold `redis`,
        the renewal is not starved and the node does not take Redis for gone. `line`
        (storage.redis_client.make_line, a single Redis only): the pipelined connection
        of the batched writes of connects and disconnects (route updates, presence)."""
        self.settings = settings
        self.id = node_id
        self.redis = redis
        self.pools = pools
        self.keys = RedisKeys(settings.redis_prefix, settings.redis_cluster)
        self.routes = Routes(redis, self.keys, line)
        # Registration, renewal, re-registration, route refresh and leave: the lease's.
        self.lease_routes = Routes(lease_redis, self.keys)
        self.sync = RouteSync(
            self.routes,
            node_id,
            lambda conv: bool(self.conv_subs.get(conv)),
            lambda user: bool(self.user_conns.get(user)),
        )
        self.conv_subs: dict[int, set[Connection]] = defaultdict(set)
        self._writers: dict[int, _Writers] = {}  # by conversation; see _writers_of
        # Pub/sub deliveries read but not dispatched yet: those read together (the
        # gateway was busy while they arrived) are dispatched together, one socket write
        # per subscriber for a conversation's messages among them.
        self._inbox: list[bytes] = []
        self.user_conns: dict[str, set[Connection]] = defaultdict(set)
        self.connections: set[Connection] = set()
        # Users whose presence was handed to `presence.attached` since their connections
        # here last all closed (see attach).
        self._present: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._fills_by_conv: dict[int, asyncio.Task[None]] = {}
        # Catches subscribers up from storage after the pub/sub connection was down.
        self.tails = TailCheck(pools, self.conv_subs, self._push_messages)
        self.draining = False
        self.cut_off = False  # Redis unreachable for a lease: clients shed, none admitted
        # The lease loop's outcomes: renewals that held, tries that failed or timed out,
        # and renewals that found the lease gone (everything registered again).
        self.lease_renewals = 0
        self.lease_failures = 0
        self.lease_losses = 0
        self.pubsub_losses = 0  # the listener's connection seen lost
        # Registrations of everything (see _register_all), one at a time: how many have
        # begun, and the number of the last that succeeded and of the last that failed.
        self._registering = asyncio.Lock()
        self._registrations_begun = 0
        self._registered = 0
        self._registration_failed = 0
        self._none_left = asyncio.Event()  # set whenever the last connection detaches
        self.deliveries = 0  # frames pushed to local connections
        # Server-side end-to-end latency (accept ts to socket write) of live deliveries.
        self.latency: LatencySink = _NoLatency()
        self.presence = Presence(self, pools)

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        await self.lease_routes.register(self.id, self.settings.route_lease_s, (), ())
        ready = asyncio.Event()
        self._tasks.append(asyncio.create_task(self._listen(ready)))
        self._tasks.append(asyncio.create_task(self._keep_lease()))
        self._tasks.append(asyncio.create_task(self.sync.run()))
        self._tasks.append(asyncio.create_task(self.tails.run()))
        self._tasks.append(asyncio.create_task(keep_alive(self.connections, self.settings)))
        self._tasks.append(asyncio.create_task(self.presence.run()))
        await asyncio.wait_for(ready.wait(), 10)

    async def stop(self) -> None:
        for fill in list(self._fills_by_conv.values()):
            fill.cancel()
        # Cancelled again until each ends (core/tasks.py: a cancellation can be lost).
        await stop_tasks(self._tasks, STOP_RECANCEL_S)
        for conn in list(self.connections):  # whoever outlived the drain (a forced exit)
            conn.close(frames.CloseCode.GOING_AWAY, "server shutting down")
        await self.presence.stop()
        with contextlib.suppress(Exception):
            await self.lease_routes.leave(self.id, list(self.conv_subs), list(self.user_conns))

    async def drain(self, window_ms: int, deadline_ms: int) -> None:
        """Graceful shutdown: every client is told to reconnect elsewhere at a time spread
        over `window_ms` (so they do not all land on the other nodes at once); whoever is
        still here at `deadline_ms` is closed with 1001, each after its request in flight."""
        self.draining = True
        conns = list(self.connections)
        log.info("node %s draining %d connections", self.id, len(conns))
        for conn in conns:
            conn.push_frame(frames.reconnect(random.randint(0, window_ms) if window_ms else 0))
        if not await self._all_gone(deadline_ms / 1000):
            for conn in list(self.connections):
                conn.close_when_idle(frames.CloseCode.GOING_AWAY)
            await self._all_gone(5.0)

    async def _all_gone(self, seconds: float) -> bool:
        if not self.connections:
            return True
        try:
            await asyncio.wait_for(self._none_left.wait(), seconds)
        except TimeoutError:
            return False
        return True

    @property
    def _must_register(self) -> bool:
        """A registration failed (or timed out) part way and none succeeded since."""
        return self._registration_failed > self._registered

    async def _register_all(self, seen: int | None = None) -> None:
        """Register the lease and every local conversation and user, each round trip
        bounded by a lease. Until one such registration succeeds, `_keep_lease` does it
        again instead of renewing: a failed one may have set the lease (its first round
        trip) and not every route, and a renewal, finding the lease, would then never
        register the rest (the periodic refresh only extends sets that exist: it does not
        put the node back).

        One at a time (the listener after a pub/sub reconnect and the lease loop can both
        want one at once: each a full registration, every route written twice). `seen`:
        how many registrations had begun when the caller learnt it needs one (default:
        now). A registration begun after that, which succeeded, did what the caller
        needs, so it returns once that one ends; one begun before may have written what
        was lost since, so the caller's runs after it."""
        if seen is None:
            seen = self._registrations_begun
        async with self._registering:
            if self._registered > seen:
                return
            self._registrations_begun += 1
            number = self._registrations_begun
            convs, users = list(self.conv_subs), list(self.user_conns)
            self.sync.forget_registered()
            lease_s = self.settings.route_lease_s
            try:
                # Each round trip bounded by a lease (a Redis cut off hangs instead of
                # failing), not the whole: it takes longer the more the node serves.
                await self.lease_routes.register(self.id, lease_s, convs, users, timeout_s=lease_s)
            except BaseException:
                self._registration_failed = number
                raise
            self._registered = number
            self.sync.mark_registered(convs, users)

    async def _keep_lease(self) -> None:
        interval = max(self.settings.route_lease_s / 3, 0.5)
        refresh_at = time.monotonic() + ROUTE_REFRESH_S
        redis_seen = time.monotonic()
        delay, failed = interval, 0  # failed: tries that failed in a row
        while True:
            await asyncio.sleep(delay)
            try:
                if self._must_register:
                    # The last registration failed (or timed out) part way: one begun
                    # since (the listener's, maybe running) will do.
                    await self._register_all(self._registration_failed)
                    log.warning("node %s: registered again after a failed try", self.id)
                    renewed = True
                else:
                    # Bounded: a Redis cut off by the network hangs instead of failing.
                    renewed = await asyncio.wait_for(
                        self.lease_routes.renew(self.id, self.settings.route_lease_s), interval
                    )
                redis_seen = time.monotonic()
                if self.cut_off:
                    log.warning("node %s: Redis answers again; accepting connections", self.id)
                    self.cut_off = False
                if not renewed:
                    # The lease lapsed or Redis came back empty: register everything again.
                    log.warning("node %s: lease lost, registering again", self.id)
                    self.lease_losses += 1
                    await self._register_all()
                else:
                    self.lease_renewals += 1
                    if time.monotonic() >= refresh_at:
                        # Route sets expire unless refreshed (fanout.routing.ROUTE_TTL_S).
                        # Each chunk bounded by a lease, not the whole (it grows with
                        # the sessions: bounded as a whole it could time out every try),
                        # and renewing the lease (no renewal runs while it does).
                        await self.lease_routes.refresh(
                            self.id,
                            list(self.conv_subs),
                            list(self.user_conns),
                            timeout_s=self.settings.route_lease_s,
                            lease_s=self.settings.route_lease_s,
                        )
                        refresh_at = time.monotonic() + ROUTE_REFRESH_S
                delay, failed = interval, 0
            except (aioredis.RedisError, OSError, TimeoutError) as exc:
                self.lease_failures += 1
                log.warning("node %s: lease renewal failed: %r", self.id, exc)
                silent_s = time.monotonic() - redis_seen
                if not self.cut_off and silent_s >= self.settings.route_lease_s:
                    self._shed(silent_s)
                # Soon, not a whole interval later: a renewal that timed out ended two
                # intervals after the last one, so the next at the usual cadence would
                # land when the lease expires (a moment of slow Redis cost the lease and a
                # re-registration). Backing off up to the interval keeps a Redis that
                # stays down from being asked, and logged, more often than that.
                failed += 1
                delay = min(interval, LEASE_RETRY_S * 2 ** min(failed - 1, 16))

    def _shed(self, silent_s: float) -> None:
        """Redis has not answered for a whole lease: publishers take this node for dead (or
        publish into a connection that goes nowhere), so its clients would wait in silence.
        Close them with 1013 (they resume on another node with `since`) and refuse new
        ones until Redis answers again."""
        self.cut_off = True
        conns = list(self.connections)
        log.error(
            "node %s: Redis unreachable for %.1f s; closing %d connections with 1013",
            self.id,
            silent_s,
            len(conns),
        )
        for conn in conns:
            conn.close(frames.CloseCode.TRY_AGAIN_LATER, "this node lost Redis; reconnect")

    async def _listen(self, ready: asyncio.Event) -> None:
        channel = self.keys.node_channel(self.id)
        # Registrations begun when the connection was last seen lost: what Redis lost
        # (a restart) was lost by then, so a registration begun since covers it.
        lost_at = 0
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                if self.keys.cluster:
                    await pubsub.ssubscribe(channel)
                else:
                    await pubsub.subscribe(channel)
                if ready.is_set():
                    # A reconnect: anything registered may be gone (a Redis restart), and
                    # what was published meanwhile is lost: check every tail.
                    await self._register_all(lost_at)
                    self.tails.request()
                ready.set()
                if self.keys.cluster:
                    await self._sharded(cast(ClusterPubSub, pubsub))
                async for item in pubsub.listen():
                    if item.get("type") == "message":
                        self._on_delivery(item["data"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                lost_at = self._registrations_begun
                self.pubsub_losses += 1
                log.warning("node %s: pub/sub lost (%s); resubscribing", self.id, exc)
                await asyncio.sleep(PUBSUB_RETRY_S)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _sharded(self, pubsub: ClusterPubSub) -> None:
        """Read the node's sharded channel (Redis Cluster) until the connection fails."""
        while True:
            item = await pubsub.get_sharded_message(ignore_subscribe_messages=True, timeout=1.0)
            if item is not None and item.get("type") == "smessage":
                self._on_delivery(item["data"])

    # -- connections and subscriptions ------------------------------------------------------
    async def attach(self, conn: Connection) -> None:
        if conn.is_gone:
            return  # closed already: detach has run and would not run again
        self.connections.add(conn)
        self._none_left.clear()
        self.user_conns[conn.user].add(conn)
        self.sync.changed(users=(conn.user,))
        await self.sync.ensure(user=conn.user)
        # Online once a connection of the user is registered here, whichever it is: not
        # "the first to attach" decided before registering, since that one's registration
        # can fail after another of the user's has attached (then nobody announced it).
        if self.user_conns.get(conn.user) and conn.user not in self._present:
            self._present.add(conn.user)
            self.presence.attached(conn.user)

    def detach(self, conn: Connection) -> None:
        self.connections.discard(conn)
        if not self.connections:
            self._none_left.set()
        drop_convs = tuple(c for c in list(conn.subs) if self._remove_sub(conn, c))
        users = self.user_conns.get(conn.user)
        if users is not None:
            users.discard(conn)
            if not users:
                del self.user_conns[conn.user]
                self.sync.changed(users=(conn.user,))
                self._present.discard(conn.user)
                self.presence.detached(conn.user)
        self.sync.changed(convs=drop_convs)

    def _remove_sub(self, conn: Connection, conv: int) -> bool:
        """Forget conn's subscription; True when the node has no subscriber of conv left."""
        conn.subs.pop(conv, None)
        self._writers.pop(conv, None)
        subs = self.conv_subs.get(conv)
        if subs is None:
            return False
        subs.discard(conn)
        if not subs:
            del self.conv_subs[conv]
            return True
        return False

    async def subscribe(self, conn: Connection, conv: int, since: int | None) -> dict[str, Any]:
        """Live first, then the missed messages from storage, then release live ones.
        Returns the `subbed` frame fields (seq, recovered); missed msgs are already queued."""
        if conn.is_gone:
            # Closed while this request waited (say on its access check): its detach has
            # run, so a subscription added now would never be removed.
            raise Unavailable("connection closed")
        sub = Subscription(conv, last_seq=since or 0, state=State.RECOVERING)
        conn.subs[conv] = sub
        self.conv_subs[conv].add(conn)
        self._writers.pop(conv, None)
        try:
            # Registered before reading storage: anything persisted after our read is
            # published to this node, anything before it is in what we read.
            await self.sync.ensure(conv=conv)
            limit = self.settings.replay_limit
            wanted = 0 if since is None else limit
            latest, missed = await messages.recover(self.pools, conv, since or 0, wanted)
        except BaseException:
            # Failed (routing or storage down): no half-made subscription holding messages.
            if conn.subs.get(conv) is sub:
                self._remove_sub(conn, conv)
                self.sync.changed(convs=(conv,))
            raise
        recovered = False
        if since is None or since >= latest:
            out = sub.skip_to(latest)
            recovered = since is not None
        elif latest - since > limit:  # more than we replay: none was read
            out = sub.skip_to(latest)
        else:
            out = sub.fill(missed)
            recovered = True
        if conn.subs.get(conv) is not sub:
            return {"seq": sub.last_seq, "recovered": recovered}  # unsubscribed meanwhile
        self._push_messages(conn, out)
        self._maybe_fill(conn, sub)
        return {"seq": sub.last_seq, "recovered": recovered}

    async def unsubscribe(self, conn: Connection, conv: int) -> None:
        if conv in conn.subs and self._remove_sub(conn, conv):
            self.sync.changed(convs=(conv,))

    def unsubscribe_user(self, conv: int, user: str | None, reason: str) -> int:
        """End the local subscriptions of `user` (everyone's when None) to `conv`: each
        connection is told `unsubbed` and gets nothing of `conv` after it. Returns how
        many subscriptions ended."""
        conns = self.conv_subs.get(conv)
        if not conns:
            return 0
        ended = [c for c in list(conns) if user is None or c.user == user]
        frame = frames.unsubbed(conv, reason)
        for conn in ended:
            self._remove_sub(conn, conv)
            conn.push_frame(frame)
        if ended and conv not in self.conv_subs:
            self.sync.changed(convs=(conv,))
        return len(ended)

    # -- delivery ---------------------------------------------------------------------------
    def _on_delivery(self, data: bytes) -> None:
        # Dispatched once the pub/sub reader has nothing more already received: what it
        # read meanwhile goes out together (never waiting for more than what is there).
        self._inbox.append(data)
        if len(self._inbox) == 1:
            asyncio.get_running_loop().call_soon(self._drain_inbox)

    def _drain_inbox(self) -> None:
        inbox, self._inbox = self._inbox, []
        deliveries = []
        for data in inbox:
            try:
                deliveries.append(decode_delivery(data))
            except EnvelopeError as exc:
                log.error("node %s: bad delivery dropped: %s", self.id, exc)
        try:
            self.dispatch_many(deliveries)
        except Exception:
            # A bug of ours, outside the pub/sub reader now: what this batch did not
            # deliver is caught up from storage rather than lost.
            log.exception("node %s: dispatch failed; checking every tail", self.id)
            self.tails.request()

    def dispatch(self, delivery: Delivery) -> None:
        self.dispatch_many([delivery])

    def dispatch_many(self, deliveries: list[Delivery]) -> None:
        """Dispatch deliveries in order. Consecutive messages of one conversation (in one
        delivery or across several, with nothing else between them) are delivered as a
        run: one write per subscriber socket for all of them."""
        run: list[Message] = []
        for delivery in deliveries:
            for m in delivery.messages:
                if run and m.conv != run[0].conv:
                    self._deliver_run(run)
                    run = []
                run.append(m)
            if delivery.typing or delivery.scores or delivery.user_frames or delivery.presence:
                if run:
                    self._deliver_run(run)
                    run = []
                self._dispatch_others(delivery)
        if run:
            self._deliver_run(run)

    def _dispatch_others(self, delivery: Delivery) -> None:
        for conv, user in delivery.typing:
            conns = self.conv_subs.get(conv)
            if conns:
                self._broadcast(frames.typing(conv, user), conns, skip_user=user)
        for s in delivery.scores:
            conns = self.conv_subs.get(s.thread)
            if conns:
                self._broadcast(frames.score(s.post, s.score, s.up, s.down), conns)
        for user, frame in delivery.user_frames:
            conns = self.user_conns.get(user)
            if conns:
                self._broadcast(frame, conns)
        for convs, frame in delivery.presence:
            # Once per connection, however many of these rooms it follows.
            targets = set().union(*(self.conv_subs.get(c, ()) for c in convs))
            if targets:
                self._broadcast(frame, targets, skip_user=frame.get("user"))

    def _broadcast(
        self, frame: dict[str, Any], conns: set[Connection], skip_user: str | None = None
    ) -> None:
        encoded: dict[bool, bytes] = {}
        for conn in list(conns):
            if conn.user == skip_user:
                continue
            data = encoded.get(conn.codec.binary)
            if data is None:
                data = encoded[conn.codec.binary] = conn.codec.frame(frame)
            conn.push(data)
            self.deliveries += 1

    def _writers_of(self, conv: int) -> _Writers:
        writers = self._writers.get(conv)
        if writers is None:
            groups: dict[tuple[WireCounters, Any], list[tuple[Connection, Subscription, Link]]]
            groups = {}
            for conn in self.conv_subs.get(conv, ()):
                sub = conn.subs.get(conv)
                if sub is not None:
                    groups.setdefault((conn.wire, conn.codec), []).append((conn, sub, conn.link))
            writers = tuple((w, codec, tuple(e)) for (w, codec), e in groups.items())
            if writers:
                # Not when none is left (the last one closed 4009 earlier in this
                # dispatch): nothing would drop that entry until the next subscription.
                self._writers[conv] = writers
        return writers

    def _deliver_run(self, run: list[Message]) -> None:
        """Messages of one conversation, in order."""
        if not self.conv_subs.get(run[0].conv):
            return
        first = run[0].seq
        if len(run) > 1 and all(m.seq == first + i for i, m in enumerate(run)):
            self._deliver_joined(run)
        else:
            for m in run:
                self._deliver_message(m)

    def _deliver_message(self, m: Message) -> None:
        """One message to every local subscriber of its conversation. The loop is the
        node's hottest (a large room: one pass per message over thousands of sockets), so
        the common case is inlined: a live subscription expecting exactly this seq, on a
        connection writing straight to a socket whose buffer is below its high-water mark,
        gets the shared frame bytes written to its link. Anything else (recovering, a gap,
        a duplicate, a paused socket: slow-consumer counting, a closed connection) takes
        `_deliver_to`, the general path."""
        seq = m.seq
        prev = seq - 1
        live = 0
        frame: dict[str, Any] | None = None
        encoded: dict[bool, bytes] = {}
        for wire, codec, entries in self._writers_of(m.conv):
            # One encode per encoding: the same frame bytes go to every subscriber's socket.
            data = encoded.get(codec.binary)
            if data is None:
                if frame is None:
                    frame = _msg_frame(m)
                data = encoded[codec.binary] = codec.frame(frame)
            written = 0
            for conn, sub, link in entries:
                if (
                    sub.last_seq == prev
                    and sub.state is _LIVE
                    and not sub.held
                    and conn.direct
                    and not link.paused
                ):
                    sub.last_seq = seq
                    link.write(data)
                    written += 1
                else:
                    live += self._deliver_to(conn, m, data)
            if written:
                # What Connection.push counts per frame, counted once for the group.
                wire.frames_out += written
                wire.bytes_out += written * len(data)
                live += written
        if live:
            self.deliveries += live
            # Written to every socket within this one call: one latency for all of them.
            self.latency.observe(max(0.0, time.time() - m.ts / 1000), live)

    def _deliver_joined(self, run: list[Message]) -> None:
        """Consecutive messages of one conversation (seq first..last): a subscriber
        expecting `first` on a socket that takes all of them without reaching its
        high-water mark gets one write of all the frames (they arrive as separate frames,
        in order); any other subscriber gets them one by one through `_deliver_to`, exactly
        as if they had come apart (so a socket that would pause midway is counted frame by
        frame as a slow consumer, as before)."""
        prev = run[0].seq - 1
        last = run[-1].seq
        count = len(run)
        live = [0] * count
        frames_of: list[dict[str, Any]] | None = None
        encoded: dict[bool, tuple[bytes, list[bytes]]] = {}
        for wire, codec, entries in self._writers_of(run[0].conv):
            both = encoded.get(codec.binary)
            if both is None:
                if frames_of is None:
                    frames_of = [_msg_frame(m) for m in run]
                parts = [codec.frame(f) for f in frames_of]
                both = encoded[codec.binary] = (b"".join(parts), parts)
            joined, parts = both
            size = len(joined)
            written = 0
            for conn, sub, link in entries:
                if (
                    sub.last_seq == prev
                    and sub.state is _LIVE
                    and not sub.held
                    and conn.direct
                    and not link.paused
                    and link.buffered() + size <= WRITE_HIGH_WATER
                ):
                    sub.last_seq = last
                    link.write(joined)
                    written += 1
                else:
                    for i, m in enumerate(run):
                        live[i] += self._deliver_to(conn, m, parts[i])
            if written:
                wire.frames_out += written * count
                wire.bytes_out += written * size
                for i in range(count):
                    live[i] += written
        now = time.time()
        for m, n in zip(run, live, strict=True):
            if n:
                self.deliveries += n
                self.latency.observe(max(0.0, now - m.ts / 1000), n)

    def _deliver_to(self, conn: Connection, m: Message, data: bytes) -> int:
        """The general path of one live message to one subscriber (`data`: its frame in
        the connection's encoding). Returns 1 if `m` itself was pushed (counted by the
        caller), 0 otherwise."""
        sub = conn.subs.get(m.conv)
        if sub is None:
            return 0
        pushed = 0
        out = sub.on_live(m)
        if len(out) == 1 and out[0] is m:
            conn.push(data)
            pushed = 1
        elif out:
            self._push_messages(conn, out)
        if sub.state is State.GAP:
            self._maybe_fill(conn, sub)
        return pushed

    def _push_messages(self, conn: Connection, out: list[Message]) -> None:
        for m in out:
            conn.push_frame(_msg_frame(m))
            self.deliveries += 1

    def _maybe_fill(self, conn: Connection, sub: Subscription) -> None:
        # One fill per conversation at a time, shared by every local subscriber with a gap
        # (a publish lost for one subscriber is usually lost for all of them).
        if sub.conv in self._fills_by_conv or sub.gap() is None:
            return
        task = asyncio.create_task(self._fill(sub.conv))
        self._fills_by_conv[sub.conv] = task
        task.add_done_callback(functools.partial(self._fill_done, sub.conv))

    def _fill_done(self, conv: int, _task: asyncio.Task[None]) -> None:
        self._fills_by_conv.pop(conv, None)

    async def _fill(self, conv: int) -> None:
        """Fetch the missing range of every subscription of `conv` with a gap, with one
        storage read per round (rare: a message published out of order or lost)."""
        try:
            for _ in range(MAX_FILL_ROUNDS):
                waiting = [
                    (c, sub, gap)
                    for c in list(self.conv_subs.get(conv, ()))
                    if (sub := c.subs.get(conv)) is not None
                    and sub.state is State.GAP
                    and (gap := sub.gap()) is not None
                ]
                if not waiting:
                    return
                low = min(gap[0] for _, _, gap in waiting)
                high = max(gap[1] for _, _, gap in waiting)
                missed = await messages.between(self.pools, conv, low, high)
                for c, sub, gap in waiting:
                    if c.subs.get(conv) is not sub:
                        continue
                    self._push_messages(c, sub.fill(missed))
                    if sub.gap() == gap:
                        # Not in storage either: accept the jump rather than stall forever.
                        self._push_messages(c, sub.skip_to(gap[1] - 1))
        except Exception as exc:
            log.warning("gap fill of conversation %d failed: %s", conv, exc)

    # -- publishing from the gateway (typing, user events) -----------------------------------
    async def publish_typing(self, conv: int, user: str) -> None:
        nodes, _ = await self.routes.nodes_for(convs=[conv])
        await self.routes.publish({n: Delivery(typing=[(conv, user)]) for n in nodes.get(conv, ())})

    async def publish_to_users(self, frames_by_user: dict[str, dict[str, Any]]) -> None:
        _, nodes = await self.routes.nodes_for(users=list(frames_by_user))
        deliveries: dict[str, Delivery] = {}
        for user, frame in frames_by_user.items():
            for n in nodes.get(user, ()):
                deliveries.setdefault(n, Delivery()).user_frames.append((user, frame))
        await self.routes.publish(deliveries)


def _msg_frame(m: Message) -> dict[str, Any]:
    return message_frame(m)
