"""The one way processes make their Redis client.

A blocking pool: when every connection is busy a caller waits (up to the timeout) instead
of failing at once, as redis-py's default pool does past 100 connections.
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
        socket_connect_timeout=POOL_TIMEOUT_S,
        health_check_interval=30,
    )
    return aioredis.Redis(connection_pool=pool)
