"""The send path's record parsing and its decision to wait for a copy to be stored."""

from __future__ import annotations

import pytest

from gateway.idempotency import EpochWatch, Record, epoch_created_ms, parse_record

HORIZON = 300_000


def test_a_record_round_trips_and_changes_state() -> None:
    r = parse_record("p|1764500000000|17|4242")
    assert r == Record("p", 1764500000000, 17, 4242)
    assert r.value() == "p|1764500000000|17|4242"
    assert r.value("a") == "a|1764500000000|17|4242"
    assert parse_record(r.value("f")).state == "f"


@pytest.mark.parametrize("raw", ["", "x|1|2|3", "a|1|2", "a|1|2|3|4", "a|one|2|3", "a|1|2|"])
def test_anything_else_is_not_a_record(raw: str) -> None:
    with pytest.raises(ValueError):
        parse_record(raw)


def test_the_epoch_carries_its_creation_time() -> None:
    assert epoch_created_ms("1764500000000-9f3a01bc") == 1764500000000
    assert epoch_created_ms("9f3a01bc") is None
    assert epoch_created_ms("-9f3a") is None
    assert epoch_created_ms("12x-9f3a") is None


def test_an_old_epoch_seen_at_start_means_nothing_to_wait_for() -> None:
    w = EpochWatch(HORIZON)
    now = 2_000_000_000
    assert w.observe(f"{now - HORIZON - 1}-aa", now)
    assert not w.suspect(0, 0, now)


def test_a_young_epoch_seen_at_start_means_wait_until_proven_per_pair() -> None:
    w = EpochWatch(HORIZON)
    now = 2_000_000_000
    epoch = f"{now - 1000}-aa"
    w.observe(epoch, now)
    assert w.suspect(3, 1, now)
    w.clear(epoch, 3, 1)
    assert not w.suspect(3, 1, now)
    assert w.suspect(3, 0, now) and w.suspect(2, 1, now)  # other pairs still unproven
    # The suspicion ends with the horizon even without proof.
    assert not w.suspect(2, 1, now - 1000 + HORIZON)


def test_an_epoch_that_changes_under_a_running_node_resets_every_proof() -> None:
    w = EpochWatch(HORIZON)
    now = 2_000_000_000
    first = f"{now - 10 * HORIZON}-aa"
    assert w.observe(first, now)
    assert not w.observe(first, now + 5)  # the same epoch again: nothing new
    assert not w.suspect(0, 0, now)
    # Redis lost its data: whatever the new value says about its age, wait from now.
    changed = f"{now - 10 * HORIZON}-bb"
    assert w.observe(changed, now + 10)
    assert w.suspect(0, 0, now + 10)
    assert w.suspect(0, 0, now + 10 + HORIZON - 1)
    assert not w.suspect(0, 0, now + 10 + HORIZON)


def test_an_epoch_without_a_time_is_suspect_for_the_horizon() -> None:
    w = EpochWatch(HORIZON)
    w.observe("garbage", 1000)
    assert w.suspect(0, 0, 1000 + HORIZON - 1)
    assert not w.suspect(0, 0, 1000 + HORIZON)


def test_proof_gathered_under_an_older_epoch_does_not_count() -> None:
    w = EpochWatch(HORIZON)
    now = 2_000_000_000
    old = f"{now}-aa"
    w.observe(old, now)
    w.observe(f"{now + 1}-bb", now + 1)
    w.clear(old, 0, 0)
    assert w.suspect(0, 0, now + 2)
    w.clear(None, 0, 0)
    assert w.suspect(0, 0, now + 2)


def test_each_pair_proven_counts_once() -> None:
    # The send path compares the count from when its shard read went out with the count
    # when it decides (gateway/send.py): only a new proof may change it.
    w = EpochWatch(horizon_ms=1000)
    w.observe("100-a", now_ms=150)
    assert w.proofs == 0
    w.clear("100-a", partition=0, physical=0)
    w.clear("100-a", partition=0, physical=0)  # proven already
    w.clear("99-z", partition=1, physical=0)  # another epoch's proof: none
    assert w.proofs == 1
    w.clear("100-a", partition=1, physical=0)
    assert w.proofs == 2
