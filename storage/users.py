"""Users, on the shard of their id's hash. Users are created on first sight of a token."""

from __future__ import annotations

from storage.pools import ShardPools


async def ensure_user(pools: ShardPools, user_id: str, name: str) -> None:
    async with pools.connection(pools.for_user(user_id)) as conn:
        await conn.execute(
            """INSERT INTO users (id, name) VALUES ($1, $2)
               ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name
               WHERE users.name IS DISTINCT FROM EXCLUDED.name""",
            user_id,
            name,
        )


async def get_user_name(pools: ShardPools, user_id: str) -> str | None:
    async with pools.connection(pools.for_user(user_id)) as conn:
        name: str | None = await conn.fetchval("SELECT name FROM users WHERE id = $1", user_id)
        return name
