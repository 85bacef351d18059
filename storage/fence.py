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
moving range. User-keyed rows live on the shard of a blake2b hash of the user id, which
PostgreSQL cannot compute: while a fence stands, every user-keyed write on the source
database is refused (a user signing up, a conversation's membership index, an inbox entry
read), for the few seconds of the switch. Outside a move there is no trigger and no cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from storage.ids import SEQ_BITS, SHARD_MASK
from storage.pgerrors import FENCED
from storage.pools import ShardPools
from storage.reshard import ID_KEYED, USER_KEYED

_FUNCTION = "agora_shard_fence"
_TRIGGER = "agora_shard_fence"


def _function_sql(shards: Sequence[int]) -> str:
    # The fenced range is written into the function's body (and its comment, for
    # `fenced`): the fence is the function and its triggers, with no table of its own for
    # a move to copy or prune to sweep.
    fenced = "{" + ",".join(str(s) for s in sorted(set(shards))) + "}"
    shard_of = f"((to_jsonb(%s) ->> TG_ARGV[0])::bigint >> {SEQ_BITS}) & {SHARD_MASK}"
    return f"""
CREATE OR REPLACE FUNCTION {_FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS $fn$
DECLARE
  fenced CONSTANT int[] := '{fenced}';
BEGIN
  IF TG_ARGV[1] = 'user'
     OR (TG_OP <> 'DELETE' AND ({shard_of % "NEW"}) = ANY(fenced))
     OR (TG_OP <> 'INSERT' AND ({shard_of % "OLD"}) = ANY(fenced)) THEN
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


async def fence(pools: ShardPools, physical: int, shards: Sequence[int]) -> None:
    """Refuse writes for logical `shards` on database `physical` (and every user-keyed
    write there) until `unfence`. Fencing again replaces the range. One transaction: the
    fence stands on every table or on none."""
    if not shards:
        raise ValueError("no logical shards to fence")
    bad = [s for s in shards if not 0 <= s < pools.map.logical_shards]
    if bad:
        raise ValueError(f"logical shard {bad[0]} is outside 0..{pools.map.logical_shards - 1}")
    async with pools.transaction(physical) as conn:
        await conn.execute(_function_sql(shards))
        for tables, kind in ((ID_KEYED, "id"), (USER_KEYED, "user")):
            for table, column in tables:
                await conn.execute(f"DROP TRIGGER IF EXISTS {_TRIGGER} ON {table}")
                await conn.execute(
                    f"CREATE TRIGGER {_TRIGGER} BEFORE INSERT OR UPDATE OR DELETE ON {table}"
                    f" FOR EACH ROW EXECUTE FUNCTION {_FUNCTION}('{column}', '{kind}')"
                )


async def unfence(pools: ShardPools, physical: int) -> bool:
    """Take the fence down; False when there was none. Safe to repeat."""
    async with pools.transaction(physical) as conn:
        was = await _range(conn) is not None
        # CASCADE drops the triggers with the function.
        await conn.execute(f"DROP FUNCTION IF EXISTS {_FUNCTION}() CASCADE")
    return was


async def fenced(pools: ShardPools, physical: int) -> list[int] | None:
    """The logical shards fenced on `physical`, or None when no fence stands."""
    async with pools.connection(physical) as conn:
        return await _range(conn)


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
