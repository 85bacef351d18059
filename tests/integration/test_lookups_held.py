"""The send path's shard reads on a connection of their own per shard (gateway/lookups.py,
`ShardPools.on_held`): what they answer, a connection the server closed, a PostgreSQL that
refuses connections. Real PostgreSQL; the refusing one is a proxy in front of it that
stops listening."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from typing import NamedTuple
from urllib.parse import urlsplit, urlunsplit

import pytest

from core.errors import ShardUnavailable, Unavailable
from core.settings import Settings
from gateway.lookups import StoredLookups
from gateway.send import _found
from storage import conversations, messages
from storage.ids import IdGenerator
from storage.models import NewMessage
from storage.pools import HELD_APPLICATION_NAME, ShardPools
from tests.integration.test_storage import new_message, tag, users_on

pytestmark = pytest.mark.engines


async def _stored(pools: ShardPools, ids: IdGenerator, physical: int) -> list[NewMessage]:
    """Three messages stored in a fresh conversation on `physical`."""
    alice, bob = users_on(pools, physical, 2, tag())
    conv = await conversations.create_group(pools, ids, alice, [bob], "chat")
    batch = [new_message(conv.id, ids, alice, f"c{i}") for i in range(3)]
    async with pools.transaction(physical) as conn:
        await messages.append_batch(conn, batch)
    return batch


def _key(m: NewMessage, cid: str | None = None) -> tuple[int, str, str]:
    return m.conv, m.sender, cid or m.cid


class _Held(NamedTuple):
    batch: list[NewMessage]
    want: int | None  # the first message's stored id
    own: ShardPools
    lookups: StoredLookups


@contextlib.asynccontextmanager
async def _first_read_held(
    pools: ShardPools, ids: IdGenerator, settings: Settings
) -> AsyncIterator[_Held]:
    """Three messages stored on shard 0, and lookups on pools of their own (`settings`)
    whose first read answered (so they hold a connection of the shard); those pools
    closed at the end."""
    batch = await _stored(pools, ids, 0)
    want = await messages.stored_id(pools, *_key(batch[0]))
    own = ShardPools(settings)
    try:
        lookups = StoredLookups(own)
        assert await lookups.ask(*_key(batch[0])) == want
        yield _Held(batch, want, own, lookups)
    finally:
        await own.close()


async def _backend(pools: ShardPools, physical: int) -> int:
    pid: int = await pools.on_held(physical, lambda conn: conn.fetchval("SELECT pg_backend_pid()"))
    return pid


@pytest.mark.parametrize("physical", [0, 1])
async def test_reads_run_on_one_held_connection_per_shard(
    pools: ShardPools, settings: Settings, ids: IdGenerator, physical: int
) -> None:
    """Lone and coalesced reads answer what `stored_id` answers, all on one connection of
    the shard, kept between reads; none takes one from the pool."""
    batch = await _stored(pools, ids, physical)
    asked = [_key(m) for m in batch] + [_key(batch[0], "never")]
    expected = [await messages.stored_id(pools, *k) for k in asked]
    assert expected[-1] is None and all(e is not None for e in expected[:-1])

    own = ShardPools(settings)
    try:
        lookups = StoredLookups(own)
        for k, want in zip(asked, expected, strict=True):
            assert await lookups.ask(*k) == want
        assert await asyncio.gather(*(lookups.ask(*k) for k in asked)) == expected
        assert lookups.queries == len(asked) + 1  # the lone ones, then one for all
        assert own.held_reads == lookups.queries and own.held_connects == 1

        pid = await _backend(own, physical)
        async with pools.connection(physical) as conn:
            row = await conn.fetchrow(
                "SELECT application_name, query FROM pg_stat_activity WHERE pid = $1", pid
            )
        assert row["application_name"] == HELD_APPLICATION_NAME
        assert own.held_connects == 1
        # No read went through the pool: it never made a connection.
        pool = await own._pool(physical)
        assert pool.get_size() == 0
    finally:
        await own.close()
    async with pools.connection(physical) as conn:  # closing the pools closed it
        gone = await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid)
    assert gone == 0


async def test_a_held_connection_the_server_closed_is_replaced_by_the_next_read(
    pools: ShardPools, settings: Settings, ids: IdGenerator
) -> None:
    """pg_terminate_backend on the held connection: the very next read still answers, on a
    new connection; a connection of a closed pool is not used again."""
    async with _first_read_held(pools, ids, settings) as (batch, want, own, lookups):
        old = await _backend(own, 0)
        async with pools.connection(0) as conn:
            # With a timeout, it returns once the backend has exited.
            assert await conn.fetchval("SELECT pg_terminate_backend($1, 5000)", old)
        assert await lookups.ask(*_key(batch[0])) == want
        assert own.held_connects == 2
        new = await _backend(own, 0)
        assert new != old

        await own.close()  # a pool closed and made anew: its held connection goes too
        assert await lookups.ask(*_key(batch[1])) == await messages.stored_id(
            pools, *_key(batch[1])
        )
        assert own.held_connects == 3 and await _backend(own, 0) not in (old, new)


@pytest.mark.skipif(shutil.which("psql") is None, reason="needs psql")
async def test_a_held_connection_closed_unseen_is_read_again_on_a_new_one(
    pools: ShardPools, settings: Settings, ids: IdGenerator
) -> None:
    """The backend terminated while the event loop was busy, so the client has not seen
    the connection close when the next read goes out on it: that read still answers, run
    once more on a new connection."""
    async with _first_read_held(pools, ids, settings) as (batch, want, own, lookups):
        old = await _backend(own, 0)
        # Blocking on purpose: the loop does not run until the backend has exited.
        subprocess.run(  # noqa: ASYNC221
            ["psql", settings.shard_dsns[0], "-qAtc", f"SELECT pg_terminate_backend({old}, 5000)"],
            check=True,
            capture_output=True,
            timeout=30,
        )
        assert await lookups.ask(*_key(batch[0])) == want
        assert own.held_connects == 2 and await _backend(own, 0) != old


class _Proxy:
    """A TCP proxy to PostgreSQL that can stop listening (connections refused) and cut
    the connections through it, then listen again on the same port."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.listen_port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.listen_port)
        self.listen_port = self._server.sockets[0].getsockname()[1]

    async def refuse(self) -> None:
        assert self._server is not None
        self._server.close()
        self._server = None
        for w in self._writers:
            w.transport.abort()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        self._writers += [writer, up_writer]
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        dst.transport.abort()


def _via(dsn: str, port: int) -> str:
    parts = urlsplit(dsn)
    netloc = parts.netloc.rsplit("@", 1)
    host = f"127.0.0.1:{port}"
    new = f"{netloc[0]}@{host}" if len(netloc) == 2 else host
    return urlunsplit((parts.scheme, new, parts.path, parts.query, parts.fragment))


async def test_a_shard_that_refuses_connections_fails_the_read_promptly_then_recovers(
    pools: ShardPools, settings: Settings, ids: IdGenerator
) -> None:
    """The held connection cut and PostgreSQL refusing new ones: the read fails at once,
    as the send answers it (`unavailable`), never a false answer; once PostgreSQL listens
    again, the next read answers."""
    target = urlsplit(settings.shard_dsns[0])
    proxy = _Proxy(target.hostname or "127.0.0.1", target.port or 5432)
    await proxy.start()
    dsns = (_via(settings.shard_dsns[0], proxy.listen_port), *settings.shard_dsns[1:])
    try:
        async with _first_read_held(pools, ids, settings.with_overrides(shard_dsns=dsns)) as (
            batch,
            want,
            _own,
            lookups,
        ):
            await proxy.refuse()
            started = time.monotonic()
            with pytest.raises(ShardUnavailable):
                await lookups.ask(*_key(batch[0]))
            with pytest.raises(Unavailable):  # what the send path makes of it
                await _found(lookups.ask(*_key(batch[1])))
            assert time.monotonic() - started < 2.0  # refused: no timeout waited out

            await proxy.start()
            assert await lookups.ask(*_key(batch[0])) == want
            assert await _found(lookups.ask(*_key(batch[0]))) is not None
    finally:
        if proxy._server is not None:
            await proxy.refuse()
