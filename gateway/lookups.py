"""The send path's shard reads, coalesced while one is in flight (gateway/coalesce.py).

Every send that produces also reads its shard for a copy stored earlier under the same
(conv, sender, cid) (gateway/send.py). One query per send costs the gateway a pool
acquire, a round trip and a result decode, and PostgreSQL a statement each; reads asked
while one of their shard is in flight go out together, as one query. Since at most one is
in flight per shard, they run on a connection of their own per shard, held between reads
(`ShardPools.on_held`): a pool's acquire and release cost the gateway twice the CPU of the
read itself (bench/RESULTS.md, "The lookups' own connection").
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from gateway.coalesce import Coalescer
from storage import messages
from storage.pools import ShardPools

Key = tuple[int, str, str]  # conv, sender, cid
Found = tuple[int, int] | None  # (id, ts) of the stored copy


class StoredLookups:
    def __init__(self, pools: ShardPools) -> None:
        self.pools = pools
        self._reads: Coalescer[Key, Found] = Coalescer(self._fetch)

    @property
    def queries(self) -> int:
        return self._reads.queries

    @property
    def reads(self) -> int:
        return self._reads.reads

    async def _fetch(self, physical: int, keys: Sequence[Key]) -> list[Found]:
        return await self.pools.on_held(physical, lambda conn: messages.stored_ids_on(conn, keys))

    def ask(self, conv: int, sender: str, cid: str) -> asyncio.Future[Found]:
        """What `storage.messages.stored_id` answers (or raises), as a future: the send
        path reads beside its produce without a task of its own."""
        return self._reads.ask(self.pools.for_id(conv), (conv, sender, cid))
