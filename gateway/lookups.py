"""The send path's shard reads, coalesced while one is in flight.

Every send that produces also reads its shard for a copy stored earlier under the same
(conv, sender, cid) (gateway/send.py). One query per send costs the gateway a pool
acquire, a round trip and a result decode, and PostgreSQL a statement each. Here a read
goes out at once when no read of its physical shard is in flight; the reads asked while
one is in flight wait for it and then go out together, as one query. No timer: a lone
read never waits, and under load the batches grow with the reads in flight.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

from storage import messages
from storage.pools import ShardPools

Key = tuple[int, str, str]  # conv, sender, cid
Found = tuple[int, int] | None  # (id, ts) of the stored copy


class StoredLookups:
    def __init__(self, pools: ShardPools) -> None:
        self.pools = pools
        self._waiting: dict[int, list[tuple[Key, asyncio.Future[Found]]]] = defaultdict(list)
        self._running: set[int] = set()
        self._tasks: set[asyncio.Future[None]] = set()  # held: a task nobody holds may vanish
        self.queries = 0  # how many queries the reads took (reads / queries = batch size)
        self.reads = 0

    async def stored_id(self, conv: int, sender: str, cid: str) -> Found:
        """What `storage.messages.stored_id` answers, raising what it raises."""
        physical = self.pools.for_id(conv)
        fut: asyncio.Future[Found] = asyncio.get_running_loop().create_future()
        self._waiting[physical].append(((conv, sender, cid), fut))
        self.reads += 1
        if physical not in self._running:
            self._running.add(physical)
            task = asyncio.ensure_future(self._drain(physical))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await fut

    async def _drain(self, physical: int) -> None:
        try:
            while self._waiting.get(physical):
                batch = self._waiting.pop(physical)
                self.queries += 1
                try:
                    found = await messages.stored_ids(self.pools, physical, [k for k, _ in batch])
                except Exception as exc:
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                for (_, fut), one in zip(batch, found, strict=True):
                    if not fut.done():  # its send was cancelled meanwhile
                        fut.set_result(one)
        finally:
            self._running.discard(physical)
            # Cancelled mid-query (the loop is closing): nobody is left to answer these.
            for _, fut in self._waiting.pop(physical, []):
                if not fut.done():
                    fut.cancel()
