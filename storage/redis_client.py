"""The one way processes make their Redis client.

A blocking pool: when every connection is busy a caller waits (up to the timeout) instead
of failing at once, as redis-py's default pool does past 100 connections.

Every command has a socket timeout (`AGORA_REDIS_TIMEOUT_S`): a Redis that stops answering
(paused, a half-open connection) fails requests with `unavailable` within it instead of
holding them forever. Pub/sub reads are exempt (redis-py blocks them without a timeout: an
idle channel is not a dead one); a blocking XREAD asks for less than the timeout.

With AGORA_REDIS_CLUSTER, redis-py's asyncio cluster client instead (same timeouts): it routes each
command (and each command of a non-transactional pipeline) to its slot's master and
follows MOVED/ASK and failovers. Its per-node pools fail instead of waiting when full, so
AGORA_REDIS_POOL_MAX does not apply there: they keep redis-py's default (100 per node).

A gateway node's lease has a small client of its own (`make_lease_redis`).
"""

from __future__ import annotations

from typing import cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from core.settings import Settings
from storage.redisline import RedisLine

POOL_TIMEOUT_S = 5
# The lease loop runs one command at a time; a re-registration after a pub/sub reconnect
# (gateway.node._listen) may overlap it. Two connections cover both.
LEASE_CONNECTIONS = 2


def make_redis(settings: Settings) -> aioredis.Redis:
    return _client(settings, None if settings.redis_cluster else settings.redis_pool_max)


def make_lease_redis(settings: Settings) -> aioredis.Redis:
    """A gateway node's client for its lease (renewal, re-registration, route refresh),
    apart from the one every request uses. With one shared pool, sends holding all of
    it kept the renewal from a connection for a whole lease, and a healthy node took
    Redis for gone and shed its clients (bench/RESULTS.md, run A3). On a cluster too:
    a shared client's per-node pool fails a command outright while it is full, so the
    renewal gets a client of its own there as well (a few connections: the lease's
    slot's master, and each master holding the node's route sets)."""
    return _client(settings, LEASE_CONNECTIONS)


def _client(settings: Settings, max_connections: int | None) -> aioredis.Redis:
    if settings.redis_cluster:
        bound = {} if max_connections is None else {"max_connections": max_connections}
        cluster = RedisCluster.from_url(
            settings.redis_url,
            socket_connect_timeout=settings.redis_timeout_s,
            socket_timeout=settings.redis_timeout_s,
            health_check_interval=30,
            **bound,
        )
        # It has every command method Agora calls on aioredis.Redis; the calls that differ
        # on a cluster (sharded pub/sub, SHARDNUMSUB) branch on RedisKeys.cluster.
        return cast(aioredis.Redis, cluster)
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=max_connections,
        timeout=POOL_TIMEOUT_S,
        socket_connect_timeout=settings.redis_timeout_s,
        socket_timeout=settings.redis_timeout_s,
        health_check_interval=30,
    )
    return aioredis.Redis(connection_pool=pool)


def make_line(settings: Settings) -> RedisLine | None:
    """A pipelined connection (storage/redisline.py), with the settings' command timeout,
    for batched writes: a gateway's connects and disconnects (route updates, session
    counts, presence) and a fan-out worker's publish of each batch. None where it does not
    apply (as `make_send_line`)."""
    return make_send_line(settings, settings.redis_timeout_s)


def make_send_line(settings: Settings, timeout_s: float) -> RedisLine | None:
    """The send path's pipelined connection (storage/redisline.py), or None where it does
    not apply (a Redis Cluster, TLS, a unix socket): the send path uses redis-py there.
    `timeout_s`: at most the settings' command timeout."""
    if settings.redis_cluster or not RedisLine.supports(settings.redis_url):
        return None
    return RedisLine(settings.redis_url, min(timeout_s, settings.redis_timeout_s))
