"""Where a message gets its seq: one transaction per physical shard per batch.

The numbers come from `conversations.last_seq` in PostgreSQL (the source of truth), so a
lost Redis can never make a seq be reused. A message already stored keeps its seq and is
returned as `redelivered` so the worker can publish it again (gateways drop the duplicate by
seq); it is never sequenced twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import dataclass, field

import asyncpg

from storage.errors import Unavailable
from storage.messages import append_batch
from storage.models import Message, NewMessage
from storage.pools import ShardPools

log = logging.getLogger(__name__)
_ATTEMPTS = 3


@dataclass
class Sequenced:
    stored: list[Message] = field(default_factory=list)
    redelivered: list[Message] = field(default_factory=list)
    orphans: list[NewMessage] = field(default_factory=list)

    def in_order(self) -> list[Message]:
        """Everything to publish, per conversation in seq order."""
        return sorted(self.stored + self.redelivered, key=lambda m: (m.conv, m.seq))


async def _one_shard(pools: ShardPools, physical: int, batch: list[NewMessage]) -> Sequenced:
    try:
        return await _one_shard_tx(pools, physical, batch)
    except asyncpg.PostgresError as exc:
        if isinstance(exc, asyncpg.UniqueViolationError) or len(batch) == 1:
            raise
        # A message the database refuses (it should have been refused at the gateway)
        # must not block its partition forever: store the batch one by one and drop
        # only the poison.
        log.error("batch refused on %s (%s); isolating", pools.names[physical], exc)
        out = Sequenced()
        for m in batch:
            try:
                part = await _one_shard_tx(pools, physical, [m])
            except asyncpg.PostgresError as one:
                if isinstance(one, asyncpg.UniqueViolationError):
                    raise
                log.error("dropping message %d of conversation %d: %s", m.id, m.conv, one)
                continue
            out.stored.extend(part.stored)
            out.redelivered.extend(part.redelivered)
            out.orphans.extend(part.orphans)
        return out


async def _one_shard_tx(pools: ShardPools, physical: int, batch: list[NewMessage]) -> Sequenced:
    for attempt in range(_ATTEMPTS):
        try:
            async with pools.transaction(physical) as conn:
                stored, already, orphans = await append_batch(conn, batch)
            return Sequenced(stored, already, orphans)
        except asyncpg.UniqueViolationError:
            # Another worker (a zombie after a rebalance) stored some of these between our
            # check and our insert; the transaction rolled back, so no seq was used. Retry:
            # the check now finds them.
            if attempt == _ATTEMPTS - 1:
                raise
            log.info("sequencing race on shard %s, retrying", pools.names[physical])
    raise AssertionError("unreachable")


async def sequence(
    pools: ShardPools, batch: list[NewMessage]
) -> tuple[Sequenced, list[NewMessage], list[Unavailable]]:
    """Sequence and persist `batch`, one transaction per physical shard, in parallel.

    A shard that is down fails only its own messages: they come back in the second list
    (in their original order) for the caller to retry, while the other shards' messages
    are stored and returned in the first.
    """
    by_shard: dict[int, list[NewMessage]] = defaultdict(list)
    for m in batch:
        by_shard[pools.for_id(m.conv)].append(m)
    shards = list(by_shard)
    parts = await asyncio.gather(
        *(_one_shard(pools, p, by_shard[p]) for p in shards), return_exceptions=True
    )
    out = Sequenced()
    failed: list[NewMessage] = []
    errors: list[Unavailable] = []
    for physical, part in zip(shards, parts, strict=True):
        if isinstance(part, Unavailable):
            failed.extend(by_shard[physical])
            errors.append(part)
        elif isinstance(part, BaseException):
            raise part
        else:
            out.stored.extend(part.stored)
            out.redelivered.extend(part.redelivered)
            out.orphans.extend(part.orphans)
    return out, failed, errors
