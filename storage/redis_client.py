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
they are left unbounded there (AGORA_REDIS_POOL_MAX bounds the single-Redis pool only).
"""

from __future__ import annotations

from typing import cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from core.settings import Settings

POOL_TIMEOUT_S = 5


def make_redis(settings: Settings) -> aioredis.Redis:
    if settings.redis_cluster:
        cluster = RedisCluster.from_url(
            settings.redis_url,
            socket_connect_timeout=settings.redis_timeout_s,
            socket_timeout=settings.redis_timeout_s,
            health_check_interval=30,
        )
        # It has every command method Agora calls on aioredis.Redis; the calls that differ
        # on a cluster (sharded pub/sub, SHARDNUMSUB) branch on RedisKeys.cluster.
        return cast(aioredis.Redis, cluster)
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_pool_max,
        timeout=POOL_TIMEOUT_S,
        socket_connect_timeout=settings.redis_timeout_s,
        socket_timeout=settings.redis_timeout_s,
        health_check_interval=30,
    )
    return aioredis.Redis(connection_pool=pool)
