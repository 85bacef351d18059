"""agora_client.policy: the reconnect rules of docs/protocol.md's close codes, without sockets."""

from __future__ import annotations

import pytest

from agora_client.policy import MIN_REFUSAL_DELAY_S, Backoff


def test_full_jitter_spans_zero_to_the_capped_exponential() -> None:
    b = Backoff(base_s=0.5, cap_s=30)
    assert b.jitter(0, lambda: 0.0) == 0
    assert b.jitter(0, lambda: 0.999) == pytest.approx(0.4995)
    assert b.jitter(3, lambda: 0.5) == pytest.approx(2.0)  # 0.5 * 2**3 * 0.5
    assert b.jitter(10, lambda: 0.999) == pytest.approx(29.97)  # capped at 30
    assert b.jitter(10_000, lambda: 0.5) == 15  # no overflow for absurd attempts


@pytest.mark.parametrize("code", [1000, 1009, 4001, 4002])
def test_no_reconnect_where_the_client_must_change(code: int) -> None:
    assert Backoff().delay(code, 0, rand=lambda: 0.5) is None


@pytest.mark.parametrize("code", [1001, 1006, 1011, 4009])
def test_reconnect_with_plain_jitter(code: int) -> None:
    assert Backoff(base_s=1).delay(code, 2, rand=lambda: 0.25) == pytest.approx(1.0)


@pytest.mark.parametrize("code", [1013, 4008])
def test_overload_and_rate_limit_wait_at_least_a_second(code: int) -> None:
    assert Backoff().delay(code, 0, rand=lambda: 0.0) == MIN_REFUSAL_DELAY_S


def test_a_refusal_honours_retry_after_as_a_floor_never_shortened() -> None:
    b = Backoff(base_s=1, cap_s=30)
    assert b.delay(None, 0, retry_after_s=5, refused=True, rand=lambda: 0.1) == 5
    assert b.delay(None, 6, retry_after_s=5, refused=True, rand=lambda: 0.9) == pytest.approx(27)
    assert b.delay(None, 0, refused=True, rand=lambda: 0.0) == MIN_REFUSAL_DELAY_S
