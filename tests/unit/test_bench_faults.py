"""The recovery time of bench.faults: from the fault's end until latency settles."""

from __future__ import annotations

import pytest

from bench.faults import parse_args, recovery_s


def steady(
    start: float, end: float, latency: float, step: float = 0.05
) -> list[tuple[float, float]]:
    n = round((end - start) / step)
    return [(start + i * step, latency) for i in range(n)]


def test_latency_never_high_recovers_at_once() -> None:
    assert recovery_s(steady(100, 110, 10), 100, 20, hold_s=2) == 0.0


def test_recovery_starts_at_the_first_bin_that_stays_low() -> None:
    samples = steady(100, 101.5, 900) + steady(101.5, 110, 10)
    assert recovery_s(samples, 100, 20, hold_s=2) == 1.5


def test_a_dip_that_does_not_hold_is_not_recovery() -> None:
    samples = (steady(100, 101, 900) + steady(101, 101.5, 10) + steady(101.5, 103, 900)) + steady(
        103, 110, 10
    )
    assert recovery_s(samples, 100, 20, hold_s=2) == 3.0


def test_no_delivery_is_not_recovery() -> None:
    # Nothing delivered for 2 s after the fault (a worker restarting), then low latency.
    samples = steady(95, 100, 10) + steady(102, 110, 10)
    assert recovery_s(samples, 100, 20, hold_s=1) == 2.0


def test_never_settled_and_too_few_samples_give_none() -> None:
    assert recovery_s(steady(100, 110, 900), 100, 20, hold_s=2) is None
    assert recovery_s(steady(100, 101, 10), 100, 20, hold_s=2) is None
    assert recovery_s([], 100, 20, hold_s=2) is None
    assert recovery_s(steady(90, 99, 10), 100, 20, hold_s=2) is None


def test_unknown_scenarios_are_refused() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--scenarios", "read-only,meteor"])
    assert parse_args(["--scenarios", "deadlock"]).scenarios == ["deadlock"]
