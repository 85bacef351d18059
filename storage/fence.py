"""During a logical shard move: the source database refuses writes to the moving range
(`agora shards fence`), so nothing written by a process still on the old map lands on the
copy that `agora shards prune` deletes after the switch.

The fence is a trigger on every moved table (storage/reshard.py: MOVED_TABLES) that raises
SQLSTATE `FENCED` for a row of a fenced logical shard: inserts, updates and deletes alike,
the old row and the new. ShardPools turns that error into `ShardUnavailable`, so a client
is told `unavailable` (retryable) and its retry, after its gateway took the new map, goes to
the new database; a fan-out or scores worker holds the record and retries it (an unknown
SQLSTATE is transient to them: storage/pgerrors.py). Nothing written is lost; the write
waits for the switch.

Id-keyed rows carry their logical shard inside the id, so the trigger fences exactly the
moving range (the notification inbox among them: its rows live on their conversation's
shard, keyed by `conv_id`). User-keyed rows live on the shard of a blake2b hash of the user
id, which PostgreSQL cannot compute: while a fence stands, every user-keyed write on the
source database is refused (a user signing up, a conversation's membership index), for the
few seconds of the switch. Outside a move there is no trigger and no cost.

Row triggers do not see TRUNCATE (nothing in Agora truncates). The function and triggers
are schema objects: a `pg_dump` taken while a fence stands carries it, and `agora shards
status` on a restored database shows it.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg

from storage.ids import SEQ_BITS, SHARD_MASK
from storage.pgerrors import FENCED
from storage.pools import ShardPools
from storage.reshard import ID_KEYED, USER_KEYED

_FUNCTION = "agora_shard_fence"
_TRIGGER = "agora_shard_fence"
ATTEMPTS = 40  # times the tables are tried (each waits at most half a deadlock_timeout)


def _function_sql(shards: Sequence[int]) -> str:
    """The trigger function refusing rows of `shards` (and every user-keyed row); with no
    shards, a lifted fence: it lets every write pass until its triggers are dropped."""
    # The fenced range is written into the function's body (and its comment, for
    # `fenced`): the fence is the function and its triggers, with no table of its own for
    # a move to copy or prune to sweep.
    fenced = "{" + ",".join(str(s) for s in sorted(set(shards))) + "}"
    shard_of = f"((to_jsonb(%s) ->> TG_ARGV[0])::bigint >> {SEQ_BITS}) & {SHARD_MASK}"
    refused = (
        f"TG_ARGV[1] = 'user'"
        f" OR (TG_OP <> 'DELETE' AND ({shard_of % 'NEW'}) = ANY(fenced))"
        f" OR (TG_OP <> 'INSERT' AND ({shard_of % 'OLD'}) = ANY(fenced))"
        if shards
        else "false"
    )
    return f"""
CREATE OR REPLACE FUNCTION {_FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS $fn$
DECLARE
  fenced CONSTANT int[] := '{fenced}';
BEGIN
  IF {refused} THEN
    RAISE EXCEPTION 'a row of table % is on a fenced shard: a shard move is switching',
      TG_TABLE_NAME USING ERRCODE = '{FENCED}';
  END IF;
  IF TG_OP = 'DELETE' THEN
    RETURN OLD;
  END IF;
  RETURN NEW;
END
$fn$;
COMMENT ON FUNCTION {_FUNCTION}() IS '{fenced}';
"""


class FenceBusy(Exception):
    """The tables could not be locked in time (a long transaction holds one of them)."""


async def _locking(
    pools: ShardPools, physical: int, attempts: int, work: Callable[[Any], Awaitable[None]]
) -> None:
    """Run `work` in a transaction that waits for each table lock at most half of the
    server's deadlock_timeout, and again (up to `attempts`) when it had to give up.

    Adding or dropping a trigger locks its table, one table after another, while live
    writers lock them in their own orders (the fan-out worker: conversations, then
    messages): waiting as long as a deadlock check takes could make PostgreSQL abort a
    writer (a client's 500, a worker's retry). Giving up first makes the fence the one
    that waits, and never for longer than this per attempt."""
    for attempt in range(1, attempts + 1):
        try:
            async with pools.transaction(physical) as conn:
                # One round trip: half the server's deadlock_timeout, for this transaction.
                await conn.execute(
                    "SELECT set_config('lock_timeout', greatest(10, setting::int / 2)::text, true)"
                    " FROM pg_settings WHERE name = 'deadlock_timeout'"
                )
                await work(conn)
            return
        except (asyncpg.LockNotAvailableError, asyncpg.DeadlockDetectedError):
            if attempt == attempts:
                break
            await asyncio.sleep(random.uniform(0.05, 0.25))
    raise FenceBusy(
        f"could not lock the moved tables of physical {physical} in {attempts} attempts:"
        " a long transaction holds one of them (pg_stat_activity shows it); try again"
    )


async def fence(
    pools: ShardPools, physical: int, shards: Sequence[int], attempts: int = ATTEMPTS
) -> None:
    """Refuse writes for logical `shards` on database `physical` (and every user-keyed
    write there) until `unfence`. Fencing again replaces the range. One transaction: the
    fence stands on every table or on none. FenceBusy if the tables stay locked."""
    if not shards:
        raise ValueError("no logical shards to fence")
    bad = [s for s in shards if not 0 <= s < pools.map.logical_shards]
    if bad:
        raise ValueError(f"logical shard {bad[0]} is outside 0..{pools.map.logical_shards - 1}")

    async def work(conn: Any) -> None:
        # Replacing the function takes no table lock: a fence that stands is changed at once.
        await conn.execute(_function_sql(shards))
        have = {
            r[0]
            for r in await conn.fetch(
                "SELECT c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid"
                " WHERE t.tgname = $1 AND c.relnamespace = current_schema()::regnamespace",
                _TRIGGER,
            )
        }
        for tables, kind in ((ID_KEYED, "id"), (USER_KEYED, "user")):
            for table, column in tables:
                if table not in have:
                    await conn.execute(
                        f"CREATE TRIGGER {_TRIGGER} BEFORE INSERT OR UPDATE OR DELETE"
                        f" ON {table} FOR EACH ROW"
                        f" EXECUTE FUNCTION {_FUNCTION}('{column}', '{kind}')"
                    )

    await _locking(pools, physical, attempts, work)


async def unfence(pools: ShardPools, physical: int, attempts: int = ATTEMPTS) -> bool:
    """Take the fence down; False when there was none. Safe to repeat.

    First the function becomes a pass-through (no table lock: writes pass at once), then
    the triggers are dropped, which locks each table exclusively (reads too) and so waits
    as `_locking` does. FenceBusy when they could not be dropped: the fence is lifted all
    the same, and running unfence again removes them."""
    async with pools.connection(physical) as conn:
        exists = await _range(conn) is not None
        if not exists:
            return False
        await conn.execute(_function_sql(()))

    async def work(conn: Any) -> None:
        # CASCADE drops the triggers with the function.
        await conn.execute(f"DROP FUNCTION IF EXISTS {_FUNCTION}() CASCADE")

    try:
        await _locking(pools, physical, attempts, work)
    except FenceBusy as exc:
        raise FenceBusy(
            f"the fence is lifted (writes pass), but its triggers stay: {exc}"
        ) from None
    return True


async def fenced(pools: ShardPools, physical: int) -> list[int] | None:
    """The logical shards fenced on `physical`, or None when no fence stands (a lifted
    fence whose triggers are still there is none)."""
    async with pools.connection(physical) as conn:
        return await _range(conn) or None


async def _range(conn: Any) -> list[int] | None:
    text = await conn.fetchval(
        "SELECT obj_description(p.oid, 'pg_proc') FROM pg_proc p"
        " JOIN pg_namespace n ON n.oid = p.pronamespace"
        " WHERE p.proname = $1 AND n.nspname = current_schema()",
        _FUNCTION,
    )
    if text is None:
        return None
    return [int(s) for s in text.strip("{}").split(",") if s]
