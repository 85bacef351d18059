"""The soak benchmark's arithmetic: slopes, "flat", the rows after the warm-up, and how a
missing delivery is classified (stored but not delivered, or acked and never stored) and
charged to the interval its cid names."""

from __future__ import annotations

from typing import Any

import pytest

from bench.common import slope
from bench.soak import classify_losses, is_flat, measured_rows, series


def test_slope_is_least_squares() -> None:
    assert slope([1, 2, 3, 4], [10, 12, 14, 16]) == pytest.approx(2.0)
    assert slope([1, 2, 3], [5, 5, 5]) == 0.0
    # Noise around a trend: the fit, not the endpoints.
    assert slope([0, 1, 2, 3], [0, 3, 1, 4]) == pytest.approx(1.0)
    assert slope([0, 1, 2], [3, 2, 1]) == pytest.approx(-1.0)


def test_slope_of_too_few_points_is_zero() -> None:
    assert slope([], []) == 0.0
    assert slope([1], [7]) == 0.0
    assert slope([2, 2], [1, 9]) == 0.0  # no spread in x


def test_flat_means_little_growth_over_the_span() -> None:
    # 0.1 MiB/min for 8 min on a 60 MiB process: 0.8 MiB, under 2 MiB.
    assert is_flat(0.1, 60.0, 8.0)
    # 1 MiB/min for 8 min on 60 MiB: 8 MiB, over max(3 MiB, 2 MiB).
    assert not is_flat(1.0, 60.0, 8.0)
    # Large process: 5 % of 1,000 MiB = 50 MiB allowed.
    assert is_flat(5.0, 1000.0, 8.0)
    assert not is_flat(7.0, 1000.0, 8.0)
    assert is_flat(-3.0, 60.0, 8.0)  # shrinking is flat enough


def _row(minute: float, lost: int = 0) -> dict[str, Any]:
    return {
        "minute": minute,
        "lost": lost,
        "latency_ms": {"p50": 10.0 + minute, "p99": 30.0},
        "redis": {"used_memory_mib": 5.0 + minute, "keys": 100 * minute},
        "broker_log_records": 1000 * minute,
        "procs": {"gateway A": {"rss_mib": 60.0, "cpu": 0.1}},
    }


def test_measured_rows_leave_out_the_warm_up() -> None:
    rows = [_row(m) for m in (1, 2, 3, 4, 5)]
    assert [r["minute"] for r in measured_rows(rows, 2)] == [3, 4, 5]
    # Fewer than two rows after it: all rows (a slope needs two points).
    assert [r["minute"] for r in measured_rows(rows, 4.5)] == [1, 2, 3, 4, 5]


def test_series_has_one_list_per_number() -> None:
    s = series([_row(1), _row(2)])
    assert s["p50 ms"] == [11.0, 12.0]
    assert s["redis keys"] == [100.0, 200.0]
    assert s["gateway A MiB"] == [60.0, 60.0]
    assert s["gateway A CPU"] == [0.1, 0.1]
    assert s["broker log records"] == [1000.0, 2000.0]


def test_no_missing_delivery_is_no_loss() -> None:
    out = classify_losses({}, {}, [], {"c1": 10})
    assert out["stored"] == 0 and out["never_stored"] == 0
    assert out["by_interval"] == {}


def test_stored_but_not_delivered_is_charged_to_its_interval() -> None:
    stored = {"c1": {1: "0.0.0", 2: "0.0.1", 3: "2.0.7"}}
    acked = {"c1": {"0.0.0", "0.0.1", "2.0.7"}}
    missing = [("c1", "alice", [3]), ("c1", "bob", [2, 3])]
    out = classify_losses(stored, acked, missing, {"c1": 3})
    assert out["stored"] == 3
    assert out["never_stored"] == 0 and out["messages_never_stored"] == 0
    assert out["by_interval"] == {"2": 2, "0": 1}


def test_acked_but_never_stored_costs_every_member() -> None:
    # Seqs 1-2 stored; the acked cid "1.0.5" has no row: each member lacks seq 3 (which
    # does not exist), and the loss is the message's, times its 4 members.
    stored = {"c1": {1: "0.0.0", 2: "1.0.4"}}
    acked = {"c1": {"0.0.0", "1.0.4", "1.0.5"}}
    missing = [("c1", u, [3]) for u in ("a", "b", "c", "d")]
    out = classify_losses(stored, acked, missing, {"c1": 4}, {"c1": 3})
    assert out["messages_never_stored"] == 1
    assert out["never_stored"] == 4
    assert out["never_stored_cids"] == [("c1", "1.0.5")]
    assert out["stored"] == 0
    assert out["other_gaps"] == 4  # the seq-3 holes, which no stored row explains
    assert out["by_interval"] == {"1": 4}
    assert out["acked_vs_stored"] == {"c1": [3, 2, 3]}


def test_warm_up_losses_are_kept_apart() -> None:
    stored = {"c1": {1: "w.0.0"}}
    out = classify_losses(stored, {"c1": {"w.0.0"}}, [("c1", "a", [1])], {"c1": 2})
    assert out["by_interval"] == {"w": 1}
