"""The one way processes make their Redis client.

A blocking pool: when every connection is busy a caller waits (up to the timeout) instead
of failing at once, as redis-py's default pool does past 100 connections.

Every command has a socket timeout (`AGORA_REDIS_TIMEOUT_S`): a Redis that stops answering
(paused, a half-open connection) fails requests with `unavailable` within it instead of
holding them forever. Pub/sub reads are exempt (redis-py blocks them without a timeout: an
idle channel is not a dead one); a blocking XREAD asks for less than the timeout.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from storage.settings import Settings

POOL_TIMEOUT_S = 5


def make_redis(settings: Settings) -> aioredis.Redis:
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_pool_max,
        timeout=POOL_TIMEOUT_S,
        socket_connect_timeout=settings.redis_timeout_s,
        socket_timeout=settings.redis_timeout_s,
        health_check_interval=30,
    )
    return aioredis.Redis(connection_pool=pool)
