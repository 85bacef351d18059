"""Where a row lives: users by a stable hash, everything else by the shard inside its id.

Logical shards (thousands) map to physical databases through configuration ranges, so a
logical shard can move to another database without rehashing anything. Pure functions.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from core.errors import ConfigError
from storage.ids import shard_of_id

if TYPE_CHECKING:
    from core.settings import Settings


def shard_for_user(user_id: str, logical_shards: int) -> int:
    """The logical shard of a user: blake2b of the id, so stable across processes/versions."""
    digest = hashlib.blake2b(user_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % logical_shards


_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*=\s*(\d+)\s*$")


@dataclass(frozen=True)
class ShardMap:
    """Logical shard -> physical database index."""

    logical_shards: int
    physical_count: int
    _table: tuple[int, ...]

    @classmethod
    def equal_ranges(cls, logical_shards: int, physical_count: int) -> ShardMap:
        if physical_count < 1:
            raise ConfigError("AGORA_SHARD_DSNS must name at least one database")
        if physical_count > logical_shards:
            raise ConfigError(
                f"AGORA_SHARD_DSNS names {physical_count} databases, more than "
                f"AGORA_LOGICAL_SHARDS={logical_shards}"
            )
        table = tuple(i * physical_count // logical_shards for i in range(logical_shards))
        return cls(logical_shards, physical_count, table)

    @classmethod
    def parse(cls, spec: str, logical_shards: int, physical_count: int) -> ShardMap:
        """Parse `lo-hi=db,...`; every logical shard must be covered exactly once."""
        table: list[int | None] = [None] * logical_shards
        for part in spec.split(","):
            if not part.strip():
                continue
            m = _RANGE.match(part)
            if not m:
                raise ConfigError(f"AGORA_SHARD_MAP: cannot parse {part.strip()!r} (want lo-hi=db)")
            lo, hi, db = (int(g) for g in m.groups())
            if lo > hi or hi >= logical_shards:
                raise ConfigError(
                    f"AGORA_SHARD_MAP: range {lo}-{hi} is outside 0-{logical_shards - 1}"
                )
            if db >= physical_count:
                raise ConfigError(f"AGORA_SHARD_MAP: database {db} is not in AGORA_SHARD_DSNS")
            for i in range(lo, hi + 1):
                if table[i] is not None:
                    raise ConfigError(f"AGORA_SHARD_MAP: logical shard {i} is mapped twice")
                table[i] = db
        missing = [i for i, v in enumerate(table) if v is None]
        if missing:
            raise ConfigError(f"AGORA_SHARD_MAP: logical shard {missing[0]} is not mapped")
        return cls(logical_shards, physical_count, tuple(v for v in table if v is not None))

    @classmethod
    def from_settings(cls, settings: Settings) -> ShardMap:
        count = len(settings.shard_dsns)
        if settings.shard_map.strip():
            return cls.parse(settings.shard_map, settings.logical_shards, count)
        return cls.equal_ranges(settings.logical_shards, count)

    def physical(self, logical: int) -> int:
        if not 0 <= logical < self.logical_shards:
            raise ValueError(f"logical shard {logical} is outside 0..{self.logical_shards - 1}")
        return self._table[logical]

    def for_user(self, user_id: str) -> int:
        return self.physical(shard_for_user(user_id, self.logical_shards))

    def for_id(self, id_: int) -> int:
        return self.physical(shard_of_id(id_))

    def logical_for_user(self, user_id: str) -> int:
        return shard_for_user(user_id, self.logical_shards)


def map_version(dsns: tuple[str, ...], shard_map: ShardMap) -> str:
    """A short digest of which database holds each logical shard (DSNs by host and
    database name only: a password rotation is not a new map)."""
    digest = hashlib.blake2b(digest_size=6)
    for dsn in dsns:
        digest.update(_where(dsn).encode() + b"\0")
    digest.update(",".join(map(str, shard_map._table)).encode())
    return digest.hexdigest()


def _where(dsn: str) -> str:
    parts = urlsplit(dsn)
    return f"{parts.hostname}:{parts.port}{parts.path}"
