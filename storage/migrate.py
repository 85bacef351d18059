"""Versioned SQL migrations, applied to every physical shard.

Files are `storage/migrations/NNNN_name.sql`. Each database records what it has applied in
`schema_migrations`; a session-level advisory lock makes concurrent runs (several processes
starting at once) wait for each other instead of applying a file twice.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

from storage.pools import shard_name

_LOCK_KEY = 0x61676F7261  # "agora": one advisory lock id for schema changes
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations() -> list[Migration]:
    found: list[Migration] = []
    for entry in resources.files("storage.migrations").iterdir():
        m = _FILE.match(entry.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2), entry.read_text("utf-8")))
    found.sort(key=lambda mig: mig.version)
    versions = [mig.version for mig in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError("two migrations share a version number")
    return found


async def migrate_database(dsn: str, migrations: list[Migration] | None = None) -> list[int]:
    """Apply what `dsn` lacks; returns the versions applied now."""
    migrations = load_migrations() if migrations is None else migrations
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
        try:
            await conn.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                       version integer PRIMARY KEY,
                       name text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            applied: list[int] = []
            for mig in migrations:
                if mig.version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(mig.sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                        mig.version,
                        mig.name,
                    )
                applied.append(mig.version)
            return applied
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    finally:
        await conn.close()


async def migrate_all(dsns: tuple[str, ...] | list[str]) -> dict[str, list[int]]:
    """Migrate every physical shard (in parallel); shard name -> versions applied."""
    migrations = load_migrations()
    results = await asyncio.gather(*(migrate_database(d, migrations) for d in dsns))
    return {shard_name(d, i): r for i, (d, r) in enumerate(zip(dsns, results, strict=True))}
