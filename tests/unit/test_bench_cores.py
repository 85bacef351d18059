"""bench/common.py: per-core busy and interrupt shares from /proc/stat tick counters."""

from __future__ import annotations

from bench.common import core_shares, core_ticks


def test_busy_and_softirq_shares_of_an_interval() -> None:
    # user nice system idle iowait irq softirq steal
    before = {"cpu0": [100, 0, 50, 800, 10, 0, 5, 0], "cpu1": [0, 0, 0, 0, 0, 0, 0, 0]}
    after = {"cpu0": [150, 0, 70, 810, 10, 0, 25, 0], "cpu1": [10, 0, 0, 90, 0, 0, 0, 0]}
    shares = core_shares(before, after)
    # cpu0: 100 ticks, 10 idle: busy 0.9, of it 20 in softirq
    assert shares["cpu0"] == {"busy": 0.9, "irq": 0.2}
    assert shares["cpu1"] == {"busy": 0.1, "irq": 0.0}


def test_a_core_missing_before_is_left_out() -> None:
    assert core_shares({}, {"cpu0": [1, 0, 0, 1, 0, 0, 0, 0]}) == {}


def test_this_machine_has_its_cores_counted() -> None:
    ticks = core_ticks()
    assert ticks and all(name.startswith("cpu") and len(t) == 8 for name, t in ticks.items())
