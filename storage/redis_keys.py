"""Every Redis key and channel name Agora uses is made here, and nowhere else.

User ids may contain ':', so a user id inside a compound key is length-prefixed: no two
different (user, x) pairs can produce the same key.

Every key is bounded: it has a TTL, or there is a fixed number of them (the epoch, one id
counter per logical shard, the feed statistics hash with one field per feed). Each
docstring below says which; tests/integration/test_redis_bounds.py checks it on a running
stack and measures the bytes (docs/operations.md, "Redis memory").
"""

from __future__ import annotations

import zlib

# Redis Cluster: the send path's claim script touches the cid's record, the user's send
# counter, an id counter and the epoch in one round trip, so all four share one hash tag:
# the user's send bucket. Its number also goes into the low bits of the message id's
# sequence (the counter is per bucket, not cluster-wide per shard), so ids of different
# buckets never collide: 32 buckets leave 32 ids per ms per (logical shard, bucket).
SEND_BUCKETS = 32


class RedisKeys:
    def __init__(self, prefix: str, cluster: bool = False) -> None:
        self.p = prefix
        self.cluster = cluster
        self.send_buckets = SEND_BUCKETS if cluster else 1

    def send_bucket(self, user: str) -> int:
        """The user's send bucket: 0 on a single Redis, 0..SEND_BUCKETS-1 on a cluster."""
        return zlib.crc32(user.encode()) % SEND_BUCKETS if self.cluster else 0

    def _tag(self, user: str) -> str:
        return f"{{s{self.send_bucket(user)}}}:" if self.cluster else ""

    # -- send path -------------------------------------------------------------------------
    def idempotency(self, user: str, cid: str) -> str:
        """(user, cid) -> state of that send: pending, acked or failed, with its id's parts.
        Lives the idempotency window (AGORA_IDEMPOTENCY_WINDOW_S) after the answer."""
        return f"{self.p}:idem:{self._tag(user)}{len(user)}:{user}:{cid}"

    def epoch(self, bucket: int = 0) -> str:
        """Made once (no TTL) by the first send: `<created ms>-<token>`. A new value means
        Redis lost its data (flush, restart without persistence): idempotency records made
        before it are gone, so the send path checks the shards until it has proof that no
        older copy is still on its way (gateway/idempotency.py). On a cluster, one per
        send bucket (SEND_BUCKETS keys): a failover loses the data of its own slots only."""
        return f"{self.p}:epoch:{{s{bucket}}}" if self.cluster else f"{self.p}:epoch"

    def id_counter(self, logical_shard: int, bucket: int = 0) -> str:
        """Sequence for message ids of one logical shard (per send bucket on a cluster).
        No TTL: AGORA_LOGICAL_SHARDS keys at most (times SEND_BUCKETS on a cluster)."""
        if self.cluster:
            return f"{self.p}:idseq:{{s{bucket}}}:{logical_shard}"
        return f"{self.p}:idseq:{logical_shard}"

    # -- routing ---------------------------------------------------------------------------
    def node_lease(self, node: str) -> str:
        """Exists while gateway `node` is alive (TTL: AGORA_ROUTE_LEASE_S)."""
        return f"{self.p}:node:{node}"

    def node_channel(self, node: str) -> str:
        """Pub/sub channel a gateway node listens on for its deliveries (not a key). On a
        cluster a sharded channel (SSUBSCRIBE/SPUBLISH): it lives on its slot's shard only,
        instead of every message being broadcast to every node of the cluster."""
        return f"{self.p}:to:{node}"

    def conv_routes(self, conv: int) -> str:
        """Set of node ids with local subscribers of conversation `conv`. TTL:
        fanout.routing.ROUTE_TTL_S, refreshed by each live member node."""
        return f"{self.p}:route:c:{conv}"

    def user_routes(self, user: str) -> str:
        """Set of node ids with connections of `user`. TTL: as conv_routes."""
        return f"{self.p}:route:u:{user}"

    def user_sessions(self, user: str) -> str:
        """Hash of node incarnation -> open WebSocket sessions of `user` there. TTL:
        gateway.usercap.KEY_TTL_S, renewed by each new session."""
        return f"{self.p}:sessions:{len(user)}:{user}"

    def revocations(self) -> str:
        """Stream of membership changes every gateway node reads: (conv, user, reason),
        so caches and subscriptions follow a removal at once (gateway.revocation). No TTL:
        one key, trimmed to about gateway.revocation.STREAM_MAXLEN entries."""
        return f"{self.p}:revocations"

    def typing(self, conv: int, user: str) -> str:
        """Exists for 2 s after `user` typed in `conv`: later typing frames are dropped
        (TTL: gateway.session.TYPING_EVERY_S)."""
        return f"{self.p}:typing:{conv}:{len(user)}:{user}"

    # -- presence (gateway/presence.py) ------------------------------------------------------
    def presence(self, user: str) -> str:
        """Hash {on: 1|0, seen: ms} of `user`. TTL: PRESENCE_TTL_S, reset on each change."""
        return f"{self.p}:pres:u:{len(user)}:{user}"

    def presence_node(self, node: str) -> str:
        """Set of users that went online through gateway `node`. TTL: a few leases,
        refreshed by the live node; a dead node's set is swept, then expires."""
        return f"{self.p}:pres:n:{node}"

    def presence_nodes(self) -> str:
        """Sorted set: node id -> ms of its last presence heartbeat. TTL: refreshed by
        every heartbeat (gone when no gateway runs)."""
        return f"{self.p}:pres:nodes"

    def presence_watchers(self, conv: int) -> str:
        """Hash node -> "count:until_ms" of a post thread's subscribers per gateway.
        TTL: a few seconds, refreshed each second by the gateways that have some."""
        return f"{self.p}:pres:w:{conv}"

    def presence_sweep(self) -> str:
        """Held for one sweep by the gateway that takes over the users of dead nodes."""
        return f"{self.p}:pres:sweep"

    # -- votes -----------------------------------------------------------------------------
    def vote_sweep(self) -> str:
        """Held for one sweep interval by the gateway that re-produces pending votes."""
        return f"{self.p}:votesweep"

    # -- feeds (rebuildable caches) --------------------------------------------------------
    # Every key of one feed shares the hash tag {kind:scope[:window]}, so the feed's Lua
    # scripts touch one Redis Cluster slot.
    def feed(self, kind: str, community: str | None, window: str | None = None) -> str:
        """Sorted set of the feed: member = fixed-width post id, score = rank.
        TTL: fanout.feeds.LIVE_TTL_S, at most FEED_DEPTH members."""
        scope = community if community is not None else "*"
        suffix = f":{window}" if window else ""
        return f"{self.p}:feed:{{{kind}:{scope}{suffix}}}"

    def feed_ready(self, kind: str, community: str | None, window: str | None = None) -> str:
        """Marks a feed set as complete (a missing marker means: rebuild from the shards).
        Its value is the token of the rebuild that set it: new after every rebuild.
        TTL: fanout.feeds.READY_TTL_S."""
        return self.feed(kind, community, window) + ":ready"

    def feed_rebuild_lock(self, kind: str, community: str | None, window: str | None) -> str:
        """Held by the one process rebuilding the feed (value: its token; TTL: the lock's)."""
        return self.feed(kind, community, window) + ":lock"

    def feed_journal(self, kind: str, community: str | None, window: str | None) -> str:
        """Hash of member -> rank (or '-': removed) written while a rebuild runs, replayed
        over the rebuilt set so that no update made during the rebuild is lost.
        TTL: fanout.feeds.JOURNAL_TTL_S."""
        return self.feed(kind, community, window) + ":journal"

    def feed_staging(self, kind: str, community: str | None, window: str | None) -> str:
        """Where a rebuild assembles the new set before swapping it in (TTL: JOURNAL_TTL_S)."""
        return self.feed(kind, community, window) + ":staging"

    def feed_version(self, kind: str, community: str | None, window: str | None) -> str:
        """Counter bumped by every change of the feed set (tells snapshots apart).
        TTL: LIVE_TTL_S."""
        return self.feed(kind, community, window) + ":version"

    def feed_touched(self, kind: str, community: str | None, window: str | None) -> str:
        """Counter bumped when posts' counters change without a change of the set (votes,
        for `new`): with the version and the ready token, tells cached pages apart.
        TTL: LIVE_TTL_S."""
        return self.feed(kind, community, window) + ":touched"

    def feed_latest_snapshot(self, kind: str, community: str | None, window: str | None) -> str:
        """Hash {name, v, r, ms}: the newest paging snapshot (of version v of the set that
        rebuild r made), reused while the set is unchanged.
        TTL: the snapshot's."""
        return self.feed(kind, community, window) + ":snap"

    def feed_snapshot(self, kind: str, community: str | None, window: str | None, name: str) -> str:
        """A frozen copy of the feed set that one or more readers page through.
        TTL: SNAPSHOT_TTL_S, SNAPSHOT_READ_TTL_S after each page read."""
        return self.feed(kind, community, window) + f":snap:{name}"

    def feed_stats(self) -> str:
        """Hash of feed key -> number of rebuilds (operational counter). No TTL: one field
        per feed (kinds x windows x (communities + 1))."""
        return f"{self.p}:feed-stats"

    # -- limits ----------------------------------------------------------------------------
    def rate(self, scope: str, subject: str, window: int) -> str:
        """Count of a user's sends (TTL 2 s) or HTTP requests (TTL 5 s) in one second."""
        return f"{self.p}:rate:{scope}:{self._tag(subject)}{len(subject)}:{subject}:{window}"
