"""bench.broker's fit: broker CPU per interval against records held, before any consumer
and with one there for the whole interval (the interval it joined in counts in neither)."""

from __future__ import annotations

from typing import Any

import pytest

from bench.broker import cpu_slopes


def _row(records: int, cpu: float, consumed: int, consumer: bool) -> dict[str, Any]:
    return {"log_records": records, "broker_cpu_s": cpu, "consumed": consumed, "consumer": consumer}


def test_the_join_interval_is_left_out() -> None:
    rows = [
        _row(6000, 1.4, 0, False),
        _row(12000, 1.4, 0, False),
        _row(18000, 1.4, 0, False),
        _row(24000, 30.0, 24000, False),  # joined and caught up: in neither fit
        _row(30000, 10.0, 30000, True),
        _row(36000, 13.0, 36000, True),
        _row(42000, 16.0, 42000, True),
    ]
    out = cpu_slopes(rows)
    assert out["cpu_per_1000_records_without_consumer"] == pytest.approx(0.0)
    assert out["cpu_per_1000_records_with_consumer"] == pytest.approx(0.5)


def test_no_consumer_rows_give_no_slope() -> None:
    out = cpu_slopes([_row(1000, 1.0, 0, False), _row(2000, 1.0, 0, False)])
    assert out["cpu_per_1000_records_with_consumer"] == 0.0
