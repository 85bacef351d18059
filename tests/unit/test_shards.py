"""storage.shards: user hashing, logical -> physical maps, and routing ids to shards."""

from __future__ import annotations

import hashlib
import math
import os
import random
import subprocess
import sys
from collections import Counter
from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.errors import ConfigError
from core.settings import MAX_LOGICAL_SHARDS, Settings
from storage.ids import EPOCH_MS, SEQ_MASK, SHARD_MASK, compose
from storage.shards import ShardMap, shard_for_user

N_USERS = 100_000


def reference_shard(user_id: str, logical_shards: int) -> int:
    """blake2b-64 of the UTF-8 id, big-endian, modulo the shard count (computed here)."""
    h = hashlib.new("blake2b", user_id.encode("utf-8"), digest_size=8)
    return int(h.hexdigest(), 16) % logical_shards


def user_ids() -> list[str]:
    """100k ids of mixed shapes: sequential names, random hex, numbers, non-ASCII."""
    rng = random.Random(20240101)
    out = [f"user{i}" for i in range(N_USERS // 2)]
    out += [f"{rng.getrandbits(64):016x}" for _ in range(N_USERS // 4)]
    out += [str(rng.randrange(10**12)) for _ in range(N_USERS // 8)]
    out += [f"ü-{i}-ß" for i in range(N_USERS - len(out))]
    assert len(set(out)) == N_USERS
    return out


@pytest.fixture(scope="module")
def users() -> list[str]:
    return user_ids()


# -- shard_for_user -----------------------------------------------------------------------


@pytest.mark.parametrize("user", ["alice", "bob", "user0", "user1", "", "ünïcødé", "a" * 300])
@pytest.mark.parametrize("logical", [1, 2, 64, 1000, 4096, 8192])
def test_shard_for_user_matches_blake2b(user: str, logical: int) -> None:
    assert shard_for_user(user, logical) == reference_shard(user, logical)


@given(st.text(max_size=64), st.integers(1, MAX_LOGICAL_SHARDS))
def test_shard_for_user_is_in_range_and_deterministic(user: str, logical: int) -> None:
    shard = shard_for_user(user, logical)
    assert 0 <= shard < logical
    assert shard == shard_for_user(user, logical) == reference_shard(user, logical)


def test_shard_for_user_is_stable_across_processes() -> None:
    # Python's hash() is salted per process; the shard must not be.
    names = ["alice", "bob", "user42", "ünïcødé"]
    code = (
        "import sys; from storage.shards import shard_for_user; "
        f"print([shard_for_user(n, 4096) for n in {names!r}])"
    )
    seen = set()
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed, "PATH": ""},
        ).stdout.strip()
        seen.add(out)
    assert seen == {str([reference_shard(n, 4096) for n in names])}


def assert_within(counts: list[int], total: int, tolerance: float) -> None:
    mean = total / len(counts)
    worst = max(abs(c - mean) / mean for c in counts)
    assert worst <= tolerance, f"worst bucket is {worst:.1%} off the mean {mean:.0f}: {counts}"


@pytest.mark.parametrize("physical", [2, 16])
def test_users_spread_over_physical_shards_within_5_percent(
    users: list[str], physical: int
) -> None:
    shard_map = ShardMap.equal_ranges(4096, physical)
    counts = Counter(shard_map.for_user(u) for u in users)
    assert sorted(counts) == list(range(physical))
    assert_within([counts[p] for p in range(physical)], len(users), 0.05)


def test_users_spread_over_64_logical_shards(users: list[str]) -> None:
    # 100k users over 64 shards is ~1562 per shard with a binomial sd of ~39 (2.5%), so a
    # 5% bound is only 2 sd and 64 shards would breach it by chance; 5 sd is the sound bound.
    counts = Counter(shard_for_user(u, 64) for u in users)
    mean = len(users) / 64
    sd = math.sqrt(len(users) * (1 / 64) * (63 / 64))
    assert sorted(counts) == list(range(64))
    assert_within([counts[s] for s in range(64)], len(users), 5 * sd / mean)


def test_users_spread_over_4096_logical_shards_chi_square(users: list[str]) -> None:
    logical = 4096
    counts = Counter(shard_for_user(u, logical) for u in users)
    per_shard = [counts[s] for s in range(logical)]
    mean = len(users) / logical  # ~24.4
    assert min(per_shard) > 0
    assert max(per_shard) < 3 * mean
    chi2 = sum((c - mean) ** 2 / mean for c in per_shard)
    dof = logical - 1
    # chi-square with k dof has mean k and sd sqrt(2k); allow 5 sd either way.
    assert abs(chi2 - dof) < 5 * math.sqrt(2 * dof), chi2


# -- ShardMap.equal_ranges ----------------------------------------------------------------


def table_of(shard_map: ShardMap) -> list[int]:
    return [shard_map.physical(i) for i in range(shard_map.logical_shards)]


@given(st.data())
def test_equal_ranges_cover_contiguous_balanced(data: st.DataObject) -> None:
    logical = data.draw(st.integers(1, MAX_LOGICAL_SHARDS), label="logical")
    physical = data.draw(st.integers(1, min(logical, 64)), label="physical")
    shard_map = ShardMap.equal_ranges(logical, physical)
    table = table_of(shard_map)
    assert shard_map.physical_count == physical
    assert len(table) == logical
    # Every physical database is used, starting at 0, in contiguous non-decreasing ranges.
    assert table[0] == 0
    assert table[-1] == physical - 1
    assert all(b - a in (0, 1) for a, b in pairwise(table))
    sizes = Counter(table)
    assert set(sizes) == set(range(physical))
    assert max(sizes.values()) - min(sizes.values()) <= 1


def test_equal_ranges_two_databases() -> None:
    table = table_of(ShardMap.equal_ranges(4096, 2))
    assert table == [0] * 2048 + [1] * 2048


@pytest.mark.parametrize(("logical", "physical"), [(4096, 0), (4, 5), (1, 2)])
def test_equal_ranges_rejects_impossible_counts(logical: int, physical: int) -> None:
    with pytest.raises(ConfigError):
        ShardMap.equal_ranges(logical, physical)


def test_physical_rejects_out_of_range_logical_shard() -> None:
    shard_map = ShardMap.equal_ranges(4096, 2)
    for bad in (-1, 4096, 8191):
        with pytest.raises(ValueError):
            shard_map.physical(bad)


# -- ShardMap.parse -----------------------------------------------------------------------


def test_parse_two_halves() -> None:
    shard_map = ShardMap.parse("0-2047=0,2048-4095=1", 4096, 2)
    assert table_of(shard_map) == table_of(ShardMap.equal_ranges(4096, 2))
    assert shard_map.physical(0) == 0
    assert shard_map.physical(2047) == 0
    assert shard_map.physical(2048) == 1
    assert shard_map.physical(4095) == 1


def test_parse_uneven_interleaved_ranges_with_spaces() -> None:
    spec = " 0-9 = 1 , 10-10=0,11-4095=1, "
    shard_map = ShardMap.parse(spec, 4096, 2)
    table = table_of(shard_map)
    assert table[:10] == [1] * 10
    assert table[10] == 0
    assert table[11:] == [1] * (4096 - 11)


def test_parse_may_leave_a_database_unused() -> None:
    # Moving every logical shard off a database (before decommissioning it) is legal.
    shard_map = ShardMap.parse("0-4095=1", 4096, 3)
    assert set(table_of(shard_map)) == {1}


@given(st.data())
def test_parse_round_trips_random_partitions(data: st.DataObject) -> None:
    logical = data.draw(st.integers(1, 512), label="logical")
    physical = data.draw(st.integers(1, 8), label="physical")
    cuts = sorted(
        data.draw(st.sets(st.integers(1, logical - 1), max_size=10)) if logical > 1 else []
    )
    bounds = [0, *cuts, logical]
    ranges = [(lo, hi - 1) for lo, hi in pairwise(bounds)]
    dbs = [data.draw(st.integers(0, physical - 1)) for _ in ranges]
    order = data.draw(st.permutations(list(range(len(ranges)))))
    spec = ",".join(f"{ranges[i][0]}-{ranges[i][1]}={dbs[i]}" for i in order)
    table = table_of(ShardMap.parse(spec, logical, physical))
    expected = [db for (lo, hi), db in zip(ranges, dbs, strict=True) for _ in range(lo, hi + 1)]
    assert table == expected


@pytest.mark.parametrize(
    ("spec", "why"),
    [
        ("0-2048=0,2048-4095=1", "mapped twice"),  # overlap of one shard
        ("0-4095=0,100-200=1", "mapped twice"),  # overlap inside
        ("0-2046=0,2048-4095=1", "2047 is not mapped"),  # gap
        ("0-2047=0", "2048 is not mapped"),  # tail missing
        ("1-4095=0", "0 is not mapped"),  # head missing
        ("", "0 is not mapped"),
        ("0-2047=0,2048-4095=2", "database 2"),  # db index out of range
        ("0-4096=0", "outside"),  # logical shard out of range
        ("10-5=0,0-4095=1", "outside"),  # lo > hi
        ("garbage", "cannot parse"),
        ("0-2047:0,2048-4095=1", "cannot parse"),
        ("0..2047=0,2048-4095=1", "cannot parse"),
        ("-1-2047=0,2048-4095=1", "cannot parse"),
        ("0-2047=-1,2048-4095=1", "cannot parse"),
        ("0-2047=0;2048-4095=1", "cannot parse"),
        ("0-2047=a,2048-4095=1", "cannot parse"),
        ("0x0-2047=0,2048-4095=1", "cannot parse"),
    ],
)
def test_parse_rejects(spec: str, why: str) -> None:
    with pytest.raises(ConfigError) as err:
        ShardMap.parse(spec, 4096, 2)
    assert "AGORA_SHARD_MAP" in str(err.value)
    assert why in str(err.value)


def test_from_settings_uses_the_map_or_equal_ranges() -> None:
    two = ("postgresql://h/a", "postgresql://h/b")
    plain = Settings.from_env({"AGORA_SHARD_DSNS": ",".join(two)})
    assert table_of(ShardMap.from_settings(plain)) == table_of(ShardMap.equal_ranges(4096, 2))
    mapped = plain.with_overrides(shard_map="0-99=1,100-4095=0")
    table = table_of(ShardMap.from_settings(mapped))
    assert table[:100] == [1] * 100
    assert table[100:] == [0] * 3996
    with pytest.raises(ConfigError, match="AGORA_SHARD_MAP"):
        ShardMap.from_settings(
            Settings.from_env({"AGORA_SHARD_DSNS": ",".join(two), "AGORA_SHARD_MAP": "0-99=1"})
        )


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"AGORA_SHARD_MAP": "0-2047=0"}, ["AGORA_SHARD_MAP"]),
        ({"AGORA_SHARD_MAP": "0-4095=2"}, ["AGORA_SHARD_MAP"]),
        ({"AGORA_SHARD_MAP": "junk"}, ["AGORA_SHARD_MAP"]),
        # the default names 2 databases
        ({"AGORA_LOGICAL_SHARDS": "1"}, ["AGORA_SHARD_DSNS", "AGORA_LOGICAL_SHARDS"]),
    ],
)
def test_a_map_that_does_not_fit_the_databases_is_a_config_error(
    env: dict[str, str], names: list[str]
) -> None:
    settings = Settings.from_env(env)  # each value is well-formed on its own
    with pytest.raises(ConfigError) as err:
        ShardMap.from_settings(settings)
    for name in names:
        assert name in str(err.value)


def test_every_command_refuses_a_map_that_does_not_fit() -> None:
    # gateway/cli.py checks the map when it loads the settings, before any command runs.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGORA_")}
    env["AGORA_SHARD_MAP"] = "0-2047=0"
    done = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "token", "alice"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "configuration error" in done.stderr and "AGORA_SHARD_MAP" in done.stderr


# -- routing ------------------------------------------------------------------------------


@given(
    st.integers(EPOCH_MS, EPOCH_MS + (1 << 40)),
    st.integers(0, 4095),
    st.integers(0, SEQ_MASK),
)
def test_for_id_uses_the_shard_inside_the_id(ms: int, logical: int, seq: int) -> None:
    shard_map = ShardMap.parse("0-99=1,100-2999=0,3000-4095=2", 4096, 3)
    id_ = compose(ms, logical, seq)
    assert shard_map.for_id(id_) == shard_map.physical(logical)


def test_for_id_rejects_ids_of_shards_beyond_the_map() -> None:
    shard_map = ShardMap.equal_ranges(4096, 2)
    with pytest.raises(ValueError):
        shard_map.for_id(compose(EPOCH_MS, SHARD_MASK, 0))


@given(st.text(max_size=32))
def test_for_user_goes_through_the_logical_shard(user: str) -> None:
    shard_map = ShardMap.parse("0-99=1,100-2999=0,3000-4095=2", 4096, 3)
    logical = shard_map.logical_for_user(user)
    assert logical == reference_shard(user, 4096)
    assert shard_map.for_user(user) == shard_map.physical(logical)
