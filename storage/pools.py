"""One asyncpg pool per physical shard database, and the error a dead shard gives.

Pools are created lazily (min_size=0), so a shard that is down at start-up does not stop
the process: only requests that need that shard fail, with `ShardUnavailable` naming it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from core.errors import ConfigError, NotFound, ShardUnavailable
from core.settings import Settings
from storage.pgerrors import FENCED
from storage.shards import ShardMap, map_version

# Errors that mean "this database cannot serve us now", as opposed to a bad query.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.CannotConnectNowError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
)


async def _no_reset(conn: Any) -> None:
    return None


def shard_name(dsn: str, index: int) -> str:
    """A log-safe name for a physical shard: index, host and database, never the password."""
    parts = urlsplit(dsn)
    host = parts.hostname or "local"
    port = f":{parts.port}" if parts.port else ""
    return f"#{index} ({host}{port}{parts.path})"


class ShardPools:
    def __init__(self, settings: Settings) -> None:
        self.map = ShardMap.from_settings(settings)
        self._dsns: tuple[str, ...] = settings.shard_dsns
        self._max = settings.pg_pool_max
        self._timeout = settings.pg_timeout_s
        self._pools: list[asyncpg.Pool | None] = [None] * len(self._dsns)
        self._locks = [asyncio.Lock() for _ in self._dsns]
        self.names = [shard_name(d, i) for i, d in enumerate(self._dsns)]

    @property
    def physical_count(self) -> int:
        return len(self._dsns)

    @property
    def version(self) -> str:
        """A short digest of the databases and the map: equal in every process that routes
        the same way (what `/readyz` and the reload's log line show)."""
        return map_version(self._dsns, self.map)

    def remap(self, settings: Settings) -> bool:
        """Route by `settings`' databases and map from now on (a shard move's switch,
        storage/shardwatch.py); whether anything changed. Databases may only be appended:
        an index names the same database for the life of the process, since callers hold
        indices across awaits (a batch in flight, a coalesced read). ConfigError otherwise,
        and nothing changes."""
        new_map = ShardMap.from_settings(settings)
        dsns = settings.shard_dsns
        if dsns[: len(self._dsns)] != self._dsns:
            raise ConfigError(
                "AGORA_SHARD_DSNS may only grow at its end while processes run "
                f"(was {len(self._dsns)} databases, now {len(dsns)}, not in the same order)"
            )
        if dsns == self._dsns and new_map == self.map:
            return False
        added = dsns[len(self._dsns) :]
        self._pools.extend([None] * len(added))
        self._locks.extend(asyncio.Lock() for _ in added)
        self.names.extend(shard_name(d, len(self._dsns) + i) for i, d in enumerate(added))
        self._dsns = dsns
        self.map = new_map
        return True

    async def _pool(self, index: int) -> asyncpg.Pool:
        pool = self._pools[index]
        if pool is not None:
            return pool
        async with self._locks[index]:
            if self._pools[index] is None:
                self._pools[index] = await asyncpg.create_pool(
                    self._dsns[index],
                    min_size=0,
                    max_size=self._max,
                    timeout=self._timeout,
                    command_timeout=max(self._timeout * 2, 10),
                    max_inactive_connection_lifetime=60,
                    # asyncpg resets session state on every release (one more round trip
                    # per query). Agora sets no session state on pooled connections: no
                    # SET, LISTEN, advisory locks or open cursors (migrations use their
                    # own connection), so there is nothing to reset.
                    reset=_no_reset,
                )
            pool = self._pools[index]
            assert pool is not None
            return pool

    @contextlib.asynccontextmanager
    async def connection(self, physical: int) -> AsyncIterator[Any]:
        """A connection to physical shard `physical`; connection failures -> ShardUnavailable."""
        try:
            pool = await self._pool(physical)
            async with pool.acquire(timeout=self._timeout) as conn:
                yield conn
        except _UNAVAILABLE as exc:
            raise ShardUnavailable(self.names[physical], exc) from exc
        except asyncpg.PostgresError as exc:
            if exc.sqlstate != FENCED:
                raise
            # A shard move fenced this row's shard here (storage/fence.py): the caller's
            # retry, once its process took the new map, goes to the new database.
            raise ShardUnavailable(
                self.names[physical], exc, reason="its rows are being moved"
            ) from exc

    @contextlib.asynccontextmanager
    async def transaction(self, physical: int) -> AsyncIterator[Any]:
        async with self.connection(physical) as conn, conn.transaction():
            yield conn

    def for_user(self, user_id: str) -> int:
        return self.map.for_user(user_id)

    def for_id(self, id_: int) -> int:
        """The physical shard of an id. An id naming a logical shard this deployment does
        not have (ids come from clients) names nothing: NotFound, not a crash."""
        try:
            return self.map.for_id(id_)
        except ValueError:
            raise NotFound("no such id") from None

    async def ping(self) -> dict[str, str | None]:
        """Each physical shard's name -> None when it answers, else the error."""

        async def one(i: int) -> tuple[str, str | None]:
            try:
                async with self.connection(i) as conn:
                    await conn.fetchval("SELECT 1")
                return self.names[i], None
            except ShardUnavailable as exc:
                return self.names[i], exc.message

        results = await asyncio.gather(*(one(i) for i in range(self.physical_count)))
        return dict(results)

    async def close(self) -> None:
        for pool in self._pools:
            if pool is not None:
                await pool.close()
        self._pools = [None] * len(self._dsns)
