"""Reads of one physical shard, coalesced while one is in flight.

A read goes out at once when no read of its physical shard is in flight; the reads asked
while one is in flight wait for it and then go out together, as one query. No timer: a
lone read never waits, and under load the batches grow with the reads in flight. Used by
the send path's shard reads (gateway/lookups.py) and presence's rooms of a user coming
online (gateway/presence.py): each costs a pool acquire, a round trip and a statement per
query, which a connection storm or a burst of sends would otherwise pay per request. The
per-user session counts of connects (gateway/usercap.py) use it for Redis the same way,
with one "shard", and a bound on how many go in one pipeline (`max_batch`).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Coalescer(Generic[K, V]):
    def __init__(
        self,
        fetch: Callable[[int, list[K]], Awaitable[list[V]]],
        max_batch: int | None = None,
        min_interval_s: float = 0.0,
    ) -> None:
        """`fetch(physical, keys)`: one query's answers, one per key, in order; at most
        `max_batch` keys a query (None: no bound), the rest wait for the next one. With
        `min_interval_s`, a query starts at least that long after the previous one of its
        shard started: a read after a quiet spell goes at once, under load the reads
        gather for up to that long (fewer, larger queries when each round trip is short)."""
        self._fetch = fetch
        self.max_batch = max_batch
        self.min_interval_s = min_interval_s
        self._started: dict[int, float] = {}  # when each shard's last query started
        self._waiting: dict[int, list[tuple[K, asyncio.Future[V]]]] = defaultdict(list)
        self._running: set[int] = set()
        self._tasks: set[asyncio.Future[None]] = set()  # held: a task nobody holds may vanish
        self.queries = 0  # how many queries the reads took (reads / queries = batch size)
        self.reads = 0

    async def read(self, physical: int, key: K) -> V:
        """What `fetch(physical, [key])` answers for `key`, raising what it raises."""
        return await self.ask(physical, key)

    def ask(self, physical: int, key: K) -> asyncio.Future[V]:
        """`read` as a future, for a caller that waits for it later: no task of its own.
        A lone read (none of its shard in flight) is answered by the task that runs its
        query, returned as the future (no future, drain loop or callback of its own: a
        send's read is usually lone, bench/RESULTS.md); it is the caller's to hold, as
        the returned future always was. Cancelling it cancels that query, which no other
        read shares (the reads asked meanwhile go in a query after it)."""
        self.reads += 1
        if physical not in self._running:
            self._running.add(physical)
            if self.min_interval_s <= 0:
                self.queries += 1
                return asyncio.ensure_future(self._lone(physical, key))
            self._start_drain(physical)
        fut: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        self._waiting[physical].append((key, fut))
        return fut

    async def _lone(self, physical: int, key: K) -> V:
        # Reads asked in the same turn of the loop, before this task ran, join its query.
        joined = self._take(physical, 1)
        try:
            if not joined:
                (found,) = await self._fetch(physical, [key])
                return found
            try:
                answers = await self._fetch(physical, [key] + [k for k, _ in joined])
            except Exception as exc:
                _answer(joined, exc)
                raise
            _answer(joined, answers[1:])
            return answers[0]
        finally:
            # The reads asked while this one was in flight: together, after it (those
            # whose callers were cancelled meanwhile, as at the loop's close, need none).
            waiting = self._waiting.get(physical)
            if waiting:
                waiting[:] = [w for w in waiting if not w[1].done()]
            if waiting:
                self._start_drain(physical)
            else:
                self._waiting.pop(physical, None)
                self._running.discard(physical)

    def _take(self, physical: int, taken: int = 0) -> list[tuple[K, asyncio.Future[V]]]:
        """The waiting reads of `physical` for the next query (`taken` keys already in
        it), at most `max_batch` in all."""
        waiting = self._waiting.get(physical)
        if not waiting:
            return []
        room = None if self.max_batch is None else self.max_batch - taken
        if room is None or len(waiting) <= room:
            return self._waiting.pop(physical)
        batch = waiting[:room]
        del waiting[:room]
        return batch

    def _start_drain(self, physical: int) -> None:
        task = asyncio.ensure_future(self._drain(physical))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self, physical: int) -> None:
        try:
            while self._waiting.get(physical):
                if self.min_interval_s > 0:
                    loop = asyncio.get_running_loop()
                    wait = self._started.get(physical, -1e9) + self.min_interval_s - loop.time()
                    if wait > 0:
                        await asyncio.sleep(wait)
                    self._started[physical] = loop.time()
                batch = self._take(physical)
                self.queries += 1
                try:
                    found = await self._fetch(physical, [k for k, _ in batch])
                except Exception as exc:
                    _answer(batch, exc)
                    continue
                _answer(batch, found)
        finally:
            self._running.discard(physical)
            # Cancelled mid-query (the loop is closing): nobody is left to answer these.
            for _, fut in self._waiting.pop(physical, []):
                if not fut.done():
                    fut.cancel()


def _answer(batch: list[tuple[K, asyncio.Future[V]]], found: list[V] | Exception) -> None:
    """Each read's answer, or the query's exception for all."""
    if isinstance(found, Exception):
        for _, fut in batch:
            if not fut.done():
                fut.set_exception(found)
        return
    for (_, fut), one in zip(batch, found, strict=True):
        if not fut.done():  # its caller was cancelled meanwhile
            fut.set_result(one)
