"""One asyncpg pool per physical shard database, and the error a dead shard gives.

Pools are created lazily (min_size=0), so a shard that is down at start-up does not stop
the process: only requests that need that shard fail, with `ShardUnavailable` naming it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar
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

# A held connection (`ShardPools.on_held`) that fails with one of these on use was closed
# by the server while idle (a restart, pg_terminate_backend): the read runs once more on a
# new connection. Not a timeout: a read that timed out is not tried again.
_LOST: tuple[type[BaseException], ...] = (
    ConnectionError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
)

# How the held connections show in pg_stat_activity (docs/operations.md).
HELD_APPLICATION_NAME = "agora-held"

T = TypeVar("T")


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
        # Per physical shard: the held connection and the pool it belongs to (on_held).
        self._held: list[tuple[asyncpg.Pool, Any] | None] = [None] * len(self._dsns)
        self._held_locks = [asyncio.Lock() for _ in self._dsns]
        self.held_connects = 0  # held connections made (the first of each shard, then anew)
        self.held_reads = 0  # reads run on them
        self._ending: set[asyncio.Future[None]] = set()  # held connections cancelled mid-read

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
        self._held.extend([None] * len(added))
        self._held_locks.extend(asyncio.Lock() for _ in added)
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
                    command_timeout=self._command_timeout,
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

    @property
    def _command_timeout(self) -> float:
        return max(self._timeout * 2, 10)

    @contextlib.asynccontextmanager
    async def connection(self, physical: int) -> AsyncIterator[Any]:
        """A connection to physical shard `physical`; connection failures -> ShardUnavailable."""
        with self._unavailable(physical):
            pool = await self._pool(physical)
            async with pool.acquire(timeout=self._timeout) as conn:
                yield conn

    async def on_held(
        self, physical: int, read: Callable[[Any], Awaitable[T]], *, again: bool = True
    ) -> T:
        """`read(conn)` on a connection to `physical` of its own, kept open between reads
        instead of acquired from the pool each time (the pool's acquire and release cost
        the gateway more CPU than a short read: bench/RESULTS.md). For a caller with one
        query per shard in flight anyway (the send path's coalesced reads,
        gateway/lookups.py): others wait for it. Errors as `connection`'s, within the same
        timeouts (connect and command).

        `read` must be safe to run twice: when the held connection turns out to have been
        closed by the server while idle, it runs once more on a new one. A connection that
        failed otherwise than by a query's error (a timeout, a cancellation) is closed and
        made anew on the next read. It belongs to its shard's pool: when that pool is
        closed (`close`) so is it. One connection per shard beyond the pool's
        (docs/operations.md). With `again` False a connection lost during `read` fails
        the call as a pooled one would (for a caller that retries on its own and whose
        statement may hang: the fan-out worker's batches)."""
        with self._unavailable(physical):
            async with self._held_locks[physical]:
                conn, reused = await self._held_conn(physical)
                self.held_reads += 1
                try:
                    return await self._held_read(physical, conn, read)
                except _LOST:
                    if not reused or not again:
                        raise
                conn, _ = await self._held_conn(physical)
                return await self._held_read(physical, conn, read)

    async def _held_conn(self, physical: int) -> tuple[Any, bool]:
        """The held connection of `physical` (made if there is none, or if it is closed or
        of a pool since closed), and whether it was there already."""
        pool = await self._pool(physical)
        held = self._held[physical]
        if held is not None and held[0] is pool and not held[1].is_closed():
            return held[1], True
        self._drop_held(physical)
        conn = await asyncpg.connect(
            self._dsns[physical],
            timeout=self._timeout,
            command_timeout=self._command_timeout,
            server_settings={"application_name": HELD_APPLICATION_NAME},
        )
        if self._pools[physical] is not pool:  # `close` ran meanwhile: not kept past it
            conn.terminate()
            raise asyncpg.ConnectionDoesNotExistError("the shard's pool was closed")
        self.held_connects += 1
        self._held[physical] = (pool, conn)
        return conn, False

    async def _held_read(self, physical: int, conn: Any, read: Callable[[Any], Awaitable[T]]) -> T:
        try:
            return await read(conn)
        except BaseException as exc:
            # A query's error leaves the connection as it was; anything else (a lost
            # connection, a timeout, a cancellation mid-query) leaves it in a state
            # nobody knows: it goes, and the next read makes a new one.
            if not isinstance(exc, asyncpg.PostgresError) or isinstance(exc, _UNAVAILABLE):
                held = self._held[physical]
                if held is not None and held[1] is conn:
                    self._held[physical] = None
                    if isinstance(exc, (asyncio.CancelledError, TimeoutError)):
                        # Cancelled, or asyncpg's command timeout (which asks the server
                        # to cancel the statement too): the caller returns once the
                        # statement is stopped, as out of the pool's release. Terminated
                        # at once, a timed-out write waiting for a lock ran on and
                        # committed a batch the worker held as failed (test_sequencer.py,
                        # "timed out"). Shielded: a caller cancelled (again) meanwhile
                        # leaves the wait, and the end, to run on.
                        await asyncio.shield(self._end_after_cancel(conn))
                    elif not conn.is_closed():
                        conn.terminate()
            raise

    def _end_after_cancel(self, conn: Any) -> asyncio.Future[None]:
        """A statement cancelled by its caller, or timed out: asyncpg asks the server to
        cancel it (a request of its own, made in the background); terminating the
        connection at once would drop that request and leave the statement to run to its
        end, so a write would commit after all (a worker's batch stopped at shutdown, or
        held after its timeout while it waited for a lock). So it ends once the
        server has the cancellation, as the pool's release waits for it, at most the
        connect timeout later. The wait is asyncpg's own (`_wait_for_cancellation`, what
        its pool calls); an asyncpg without it is terminated at once, as before."""
        protocol = getattr(conn, "_protocol", None)
        wait = getattr(protocol, "_wait_for_cancellation", None)

        async def end() -> None:
            if wait is None:
                conn.terminate()
                return
            try:
                # The cancel request is made by a callback of the cancelled query's
                # future: it runs in this loop turn, before this.
                await asyncio.sleep(0)
                async with asyncio.timeout(self._timeout):  # 0.30 takes no timeout of its own
                    await wait()
            except Exception:  # timed out, or the server is gone
                pass
            finally:
                conn.terminate()

        task = asyncio.ensure_future(end())
        self._ending.add(task)  # the loop holds tasks weakly
        task.add_done_callback(self._ending.discard)
        return task

    def _drop_held(self, physical: int) -> None:
        held = self._held[physical]
        self._held[physical] = None
        if held is not None and not held[1].is_closed():
            held[1].terminate()

    @contextlib.contextmanager
    def _unavailable(self, physical: int) -> Iterator[None]:
        """Failures that mean the shard cannot serve us now -> ShardUnavailable."""
        try:
            yield
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
        for i, held in enumerate(self._held):
            self._held[i] = None
            if held is not None:
                try:
                    await held[1].close(timeout=self._timeout)
                except Exception:  # closing anyway: a read in flight on it, a dead server
                    held[1].terminate()
        for pool in self._pools:
            if pool is not None:
                await pool.close()
        self._pools = [None] * len(self._dsns)
