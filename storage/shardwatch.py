"""Taking a changed shard map without a restart: a shard move's switch (docs/operations.md,
"Moving logical shards").

With AGORA_SHARD_FILE set, every process (gateways, fan-out and scores workers) looks at the
file once a second and, when it changed, reads it, checks it (every logical shard mapped
once, databases only appended) and routes by it from then on (`ShardPools.remap`). A file
that does not parse is refused with a warning and the current map kept: a half-written file
is never taken (write it to a temporary name and rename it over the old one).

What a process was doing on the old map when it switches is safe because of the fence
(storage/fence.py): the old database refuses the moving range's writes, so a write that
still went there fails as `unavailable` and its retry takes the new map.
"""

from __future__ import annotations

import asyncio
import logging
import os

from core.errors import ConfigError
from core.settings import Settings
from storage.pools import ShardPools

log = logging.getLogger(__name__)

POLL_S = 1.0


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def reload(settings: Settings, pools: ShardPools) -> Settings:
    """Read AGORA_SHARD_FILE again and route by it; the settings now in force (the old ones
    when the file is refused, with a warning saying why)."""
    try:
        new = settings.with_shard_file()
        before = pools.version
        if pools.remap(new):
            log.info(
                "shard map changed: version %s (was %s), %d databases, from %s",
                pools.version,
                before,
                pools.physical_count,
                settings.shard_file,
            )
        return new
    except ConfigError as exc:
        log.warning("%s; keeping shard map version %s", exc, pools.version)
        return settings


async def watch(settings: Settings, pools: ShardPools, poll_s: float = POLL_S) -> None:
    """Re-read AGORA_SHARD_FILE whenever it changes, until cancelled."""
    last = _stamp(settings.shard_file)
    while True:
        await asyncio.sleep(poll_s)
        stamp = _stamp(settings.shard_file)
        if stamp is None or stamp == last:
            continue  # a file being replaced is briefly missing: wait for the new one
        last = stamp
        settings = reload(settings, pools)
