"""AGORA_SHARD_FILE: what the file may hold, how a running process takes a changed map,
and what it refuses (pure: ShardPools opens no connection until a query needs one)."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest

from core.errors import ConfigError
from core.settings import Settings, read_shard_file
from storage import shardwatch
from storage.ids import EPOCH_MS, compose
from storage.pools import ShardPools

DB0, DB1, DB2 = (f"postgresql://postgres@127.0.0.1:5432/move_{i}" for i in range(3))
BEFORE = "0-2047=0,2048-4095=1"
AFTER = "0-1023=2,1024-2047=0,2048-4095=1"


def write(path: Path, dsns: list[str], shard_map: str) -> None:
    # As an operator should: a new file renamed over the old one (never half-written).
    tmp = path.with_suffix(".tmp")
    tmp.write_text(
        f"# the shard map\nAGORA_SHARD_DSNS={','.join(dsns)}\n\nAGORA_SHARD_MAP={shard_map}\n"
    )
    os.replace(tmp, path)


def settings_of(path: Path) -> Settings:
    return Settings.from_env({"AGORA_SHARD_FILE": str(path), "AGORA_SHARD_DSNS": DB2})


def test_the_file_takes_the_place_of_the_two_settings(tmp_path: Path) -> None:
    path = tmp_path / "shards"
    write(path, [DB0, DB1], BEFORE)
    s = settings_of(path)
    assert s.shard_dsns == (DB0, DB1) and s.shard_map == BEFORE  # not the environment's DB2
    assert ShardPools(s).for_id(compose(EPOCH_MS + 1, 5, 1)) == 0


@pytest.mark.parametrize(
    ("text", "why"),
    [
        (f"AGORA_SHARD_DSNS={DB0}\n", "no AGORA_SHARD_MAP line"),
        ("AGORA_SHARD_MAP=\n", "no AGORA_SHARD_DSNS line"),
        (f"AGORA_SHARD_DSNS={DB0}\nAGORA_SHARD_MAP=\nAGORA_REDIS_URL=redis://x\n", "line 3"),
        (f"AGORA_SHARD_DSNS={DB0}\nAGORA_SHARD_MAP=\nAGORA_SHARD_MAP=\n", "given twice"),
        (f"AGORA_SHARD_DSNS {DB0}\n", "line 1"),
    ],
)
def test_a_file_with_anything_else_is_refused(tmp_path: Path, text: str, why: str) -> None:
    path = tmp_path / "shards"
    path.write_text(text)
    with pytest.raises(ConfigError, match=why):
        read_shard_file(str(path))
    with pytest.raises(ConfigError, match=why):
        settings_of(path)


def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        settings_of(tmp_path / "absent")


def test_a_running_process_takes_a_changed_map_and_keeps_every_index(tmp_path: Path) -> None:
    path = tmp_path / "shards"
    write(path, [DB0, DB1], BEFORE)
    s = settings_of(path)
    pools = ShardPools(s)
    moved = compose(EPOCH_MS + 1, 5, 1)  # logical 5
    kept = compose(EPOCH_MS + 1, 1500, 1)
    before = pools.version
    assert shardwatch.reload(s, pools).shard_map == BEFORE  # unchanged: nothing to do
    assert pools.version == before
    write(path, [DB0, DB1, DB2], AFTER)
    now = shardwatch.reload(s, pools)
    assert now.shard_dsns == (DB0, DB1, DB2)
    assert pools.physical_count == 3 and pools.version != before
    assert pools.for_id(moved) == 2 and pools.for_id(kept) == 0
    assert pools.names[2].startswith("#2 (127.0.0.1:5432/move_2")


@pytest.mark.parametrize(
    ("dsns", "shard_map", "why"),
    [
        ([DB1, DB0], BEFORE, "only grow at its end"),  # reordered: index 0 would change
        ([DB0], "0-4095=0", "only grow at its end"),  # a database dropped
        ([DB0, DB1], "0-2047=0", "logical shard 2048 is not mapped"),
        ([DB0, DB1], "0-4095=2", "database 2 is not in"),
    ],
)
def test_a_changed_map_that_would_misroute_is_refused_and_the_old_one_kept(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    dsns: list[str],
    shard_map: str,
    why: str,
) -> None:
    path = tmp_path / "shards"
    write(path, [DB0, DB1], BEFORE)
    s = settings_of(path)
    pools = ShardPools(s)
    before = pools.version
    write(path, dsns, shard_map)
    with caplog.at_level(logging.WARNING, "storage.shardwatch"):
        assert shardwatch.reload(s, pools) is s
    assert why in caplog.text and f"keeping shard map version {before}" in caplog.text
    assert pools.version == before and pools.physical_count == 2


async def test_the_watch_takes_a_new_file_within_its_poll(tmp_path: Path) -> None:
    path = tmp_path / "shards"
    write(path, [DB0, DB1], BEFORE)
    s = settings_of(path)
    pools = ShardPools(s)
    task = asyncio.create_task(shardwatch.watch(s, pools, poll_s=0.01))
    await asyncio.sleep(0)  # the watch starts: it notes the file as it is now
    try:
        write(path, [DB0, DB1, DB2], AFTER)
        async with asyncio.timeout(5):
            while pools.physical_count != 3:
                await asyncio.sleep(0.01)
        assert pools.for_id(compose(EPOCH_MS + 1, 5, 1)) == 2
        # Gone for a moment (being replaced): the map in force stays.
        path.unlink()
        await asyncio.sleep(0.05)
        assert pools.physical_count == 3
    finally:
        task.cancel()
