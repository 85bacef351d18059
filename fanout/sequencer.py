"""Where a message gets its seq: one transaction per physical shard per batch.

A batch of plain texts (the common one) is sequenced by one statement, its own
transaction (`storage.onetrip`); any other by `storage.messages.append_batch` in an
explicit transaction. Both return the same, and fail the same way.

The numbers come from `conversations.last_seq` in PostgreSQL (the source of truth), so a
lost Redis can never make a seq be reused. A message already stored keeps its seq and is
returned as `redelivered` so the worker can publish it again (gateways drop the duplicate by
seq); it is never sequenced twice.

What a failed transaction means is decided by its SQLSTATE (`storage.pgerrors`): a
transient error (connection lost, deadlock, serialization failure, statement or lock
timeout, read-only database, admin shutdown, anything unrecognised) holds the shard's
messages for the worker to retry; only an error that says a message itself can never be
stored (a data exception, an integrity violation other than the idempotency key) makes the
batch be retried one message at a time to find the poison, which is dead-lettered by the
worker. Nothing is dropped.

A shard move's fence (storage/fence.py) refuses only the rows of the logical shards it
names, but it refuses the whole transaction. So a batch the fence refused is split: the
messages of the fenced logical shards come back in `fenced` (the worker holds them per
logical shard, `fenced_key`), the others are sequenced at once in a second transaction. A
conversation lives in one logical shard, so holding a logical shard's messages together
keeps each conversation in its order; the rest of the database is not paused by the move.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from dataclasses import dataclass, field

from core.errors import NotFound, Unavailable
from fanout.holding import fenced_key
from storage import onetrip
from storage.fence import fenced as fenced_shards
from storage.ids import shard_of_id
from storage.messages import append_batch
from storage.models import Message, NewMessage
from storage.pgerrors import FENCED, Fault, classify, describe, sqlstate
from storage.pools import ShardPools

log = logging.getLogger(__name__)
_ATTEMPTS = 3


@dataclass
class Sequenced:
    stored: list[Message] = field(default_factory=list)
    redelivered: list[Message] = field(default_factory=list)
    # Messages no database will take as they are: (message, why). The worker dead-letters
    # them. Messages of a conversation that does not exist on its shard are among them.
    poison: list[tuple[NewMessage, str]] = field(default_factory=list)
    # Messages of shards that failed transiently, in their original order, and why per
    # shard name: the worker holds and retries them.
    held: list[NewMessage] = field(default_factory=list)
    # Messages of logical shards a shard move's fence refused, in their original order:
    # the worker holds them per logical shard (`fenced_key`, also their key in `errors`).
    fenced: list[NewMessage] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)

    def in_order(self) -> list[Message]:
        """Everything to publish, per conversation in seq order."""
        return sorted(self.stored + self.redelivered, key=lambda m: (m.conv, m.seq))

    def add(self, other: Sequenced) -> None:
        self.stored.extend(other.stored)
        self.redelivered.extend(other.redelivered)
        self.poison.extend(other.poison)
        self.held.extend(other.held)
        self.fenced.extend(other.fenced)
        self.errors.update(other.errors)


async def _one_shard(pools: ShardPools, physical: int, batch: list[NewMessage]) -> Sequenced:
    try:
        return await _one_shard_tx(pools, physical, batch)
    except Exception as exc:
        if sqlstate(exc) == FENCED:
            return await _around_fence(pools, physical, batch, describe(exc))
        return await _refused(pools, physical, batch, exc)


async def _refused(
    pools: ShardPools, physical: int, batch: list[NewMessage], exc: Exception
) -> Sequenced:
    """What to make of a batch whose transaction failed with `exc` (not the fence)."""
    name = pools.names[physical]
    if classify(exc) is not Fault.POISON:
        return Sequenced(held=list(batch), errors={name: describe(exc)})
    if len(batch) == 1:
        return Sequenced(poison=[(batch[0], describe(exc))])
    log.warning("batch refused on %s (%s); retrying one by one", name, describe(exc))
    # One transaction per message, in order, to tell the poison from the rest. A transient
    # error on the way holds that message and every later one of the shard, so a
    # conversation's messages are never stored out of their partition order.
    out = Sequenced()
    for i, m in enumerate(batch):
        try:
            out.add(await _one_shard_tx(pools, physical, [m]))
        except Exception as exc:
            if classify(exc) is Fault.POISON:
                out.poison.append((m, describe(exc)))
                continue
            out.held.extend(batch[i:])
            out.errors[name] = describe(exc)
            break
    return out


async def _around_fence(
    pools: ShardPools, physical: int, batch: list[NewMessage], why: str
) -> Sequenced:
    """`batch` met a shard move's fence: the messages of its fenced logical shards come
    back in `fenced`, the others are sequenced now (one more transaction, after a read of
    the fence's range: only while a fence refuses something)."""
    try:
        shards = set(await fenced_shards(pools, physical) or ())
    except Exception as exc:
        # Which shards are fenced is unknown: hold the batch, as for any transient failure.
        return Sequenced(held=list(batch), errors={pools.names[physical]: describe(exc)})
    out = Sequenced()
    free = []
    for m in batch:
        logical = shard_of_id(m.conv)
        if logical in shards:
            out.fenced.append(m)
            out.errors[fenced_key(logical)] = why
        else:
            free.append(m)
    if out.fenced:
        # The others once more, split again if the fence grew meanwhile (each round holds
        # at least one message more, so this ends).
        if free:
            out.add(await _one_shard(pools, physical, free))
        return out
    # None of them is fenced, yet the fence refused the batch: it was lifted or changed
    # since (a retry now tells), or a message writes a row the fence refuses on every shard
    # (a user-keyed table). Then hold them per logical shard: each conversation keeps its
    # order and the rest of the database is not held with them.
    try:
        return await _one_shard_tx(pools, physical, batch)
    except Exception as exc:
        if sqlstate(exc) != FENCED:
            return await _refused(pools, physical, batch, exc)
        why = describe(exc)
    return Sequenced(
        fenced=list(batch), errors={fenced_key(shard_of_id(m.conv)): why for m in batch}
    )


async def _one_shard_tx(pools: ShardPools, physical: int, batch: list[NewMessage]) -> Sequenced:
    attempt = 1
    while True:
        try:
            if onetrip.fits(batch):
                # One statement, its own transaction: one round trip instead of ~6. On the
                # shard's held connection (`ShardPools.on_held`): the pool's acquire and
                # release cost the worker ~40% of the statement's client CPU
                # (bench/RESULTS.md, issue 14, "the worker's per-batch CPU"). The worker
                # has one attempt per shard in flight (`FanoutWorker.slow`): nothing waits
                # for it. A connection lost during the statement fails it as a pooled one
                # would (`again=False`): held, retried with the worker's backoff.
                stored, already, orphans = await pools.on_held(
                    physical, lambda conn: onetrip.append(conn, batch), again=False
                )
            else:
                async with pools.transaction(physical) as conn:
                    stored, already, orphans = await append_batch(conn, batch)
            why = f"conversation not found on shard {pools.names[physical]}"
            return Sequenced(stored, already, poison=[(m, why) for m in orphans])
        except Exception as exc:
            # Another worker (a zombie after a rebalance) stored some of these between our
            # check and our insert; the transaction rolled back, so no seq was used. Retry:
            # the check now finds them.
            if classify(exc) is not Fault.RACE:
                raise
            if attempt == _ATTEMPTS:
                # Retried later like a shard that is down.
                raise Unavailable(f"sequencing race persisted: {describe(exc)}") from None
            attempt += 1
            log.info("sequencing race on shard %s, retrying", pools.names[physical])


async def sequence(
    pools: ShardPools,
    batch: list[NewMessage],
    budget_s: float | None = None,
    slow: dict[int, asyncio.Future[Sequenced]] | None = None,
) -> Sequenced:
    """Sequence and persist `batch`, one transaction per physical shard, in parallel.

    Never raises for a database error: a shard that fails transiently fails only its own
    messages (they come back in `held`, in their original order, for the caller to
    retry) while the other shards' messages are stored; poison comes back in `poison`.

    With `budget_s`, a shard that has not answered within it (cut off by the network: its
    queries hang until their timeout instead of failing) is not waited for: its messages
    come back held, and its attempt, left running, goes into `slow` for the caller to
    leave that shard alone until the attempt ends. Whatever the attempt stores is found
    as already stored by the retry (and published then under its seq), never twice.
    """
    out = Sequenced()
    by_shard: dict[int, list[NewMessage]] = defaultdict(list)
    for m in batch:
        try:
            by_shard[pools.for_id(m.conv)].append(m)
        except NotFound:
            out.poison.append((m, f"conversation id {m.conv} names no shard"))
    shards = list(by_shard)
    tasks = [asyncio.ensure_future(_one_shard(pools, p, by_shard[p])) for p in shards]
    if tasks:
        await asyncio.wait(tasks, timeout=budget_s)
    for physical, task in zip(shards, tasks, strict=True):
        if task.done():
            out.add(task.result())
            continue
        task.add_done_callback(_retrieve)
        if slow is not None:
            slow[physical] = task
        name = pools.names[physical]
        out.add(
            Sequenced(
                held=list(by_shard[physical]),
                errors={name: f"{name} did not answer within {budget_s} s"},
            )
        )
    return out


def _retrieve(task: asyncio.Future[Sequenced]) -> None:
    # Nobody awaits a slow attempt: its outcome only matters to the retry, which reads
    # the shard again. (_one_shard never raises: it returns what failed as held messages;
    # only a worker's exit cancels it.) What made it fail is still said, with its SQLSTATE,
    # as the worker says it for any other attempt: an operator (and a fault test) must see
    # a deadlock or a timeout here too.
    if task.cancelled():
        return
    late = task.result()
    if late.errors:
        log.warning(
            "slow shard attempt ended with %d messages held: %s",
            len(late.held),
            "; ".join(f"{name}: {why}" for name, why in late.errors.items()),
        )
