"""Token buckets, the abuse policy and admission decisions, with an injected clock."""

from __future__ import annotations

from core.settings import Settings
from gateway.admission import Admission
from gateway.limits import AbusePolicy, BucketMap, TokenBucket


def test_bucket_allows_a_burst_then_refuses_with_the_wait() -> None:
    b = TokenBucket(rate=10, burst=5)
    assert [b.take(0.0) for _ in range(5)] == [0] * 5
    wait = b.take(0.0)
    assert 90 <= wait <= 100  # one token comes back in 100 ms
    assert b.take(0.1) == 0  # and then it is there
    assert b.take(0.1) > 0


def test_bucket_refills_only_up_to_its_burst() -> None:
    b = TokenBucket(rate=100, burst=3)
    b.take(0.0)
    assert [b.take(100.0) for _ in range(4)].count(0) == 3


def test_zero_rate_disables() -> None:
    assert all(TokenBucket(rate=0, burst=0).take(0.0) == 0 for _ in range(1000))
    assert BucketMap(0, 0).take("x", 0.0) == 0


def test_bucket_map_keys_are_independent_and_bounded() -> None:
    m = BucketMap(rate=1, burst=1, max_keys=10)
    assert m.take("a", 0.0) == 0 and m.take("a", 0.0) > 0
    assert m.take("b", 0.0) == 0
    for i in range(100):
        m.take(f"k{i}", 1000.0 + i)
    assert len(m) <= 10


def test_drained_bucket_refills_from_zero() -> None:
    m = BucketMap(rate=10, burst=10)
    m.take("u", 0.0)
    m.drain("u", 0.0)
    assert m.take("u", 0.0) > 0
    assert m.take("u", 0.1) == 0  # one token back after 100 ms, not the burst


def test_abuse_policy_closes_after_sustained_refusals_only() -> None:
    p = AbusePolicy(max_refusals=3, window_s=10)
    assert [p.refused(t) for t in (0, 1, 2)] == [False, False, False]
    assert p.refused(3) is True
    q = AbusePolicy(max_refusals=3, window_s=10)
    assert not any(q.refused(t * 20.0) for t in range(10))  # spread out: never abuse


def test_admission_reasons() -> None:
    s = Settings.from_env(
        {
            "AGORA_MAX_CONNECTIONS": "10",
            "AGORA_MAX_HANDSHAKES": "2",
            "AGORA_LOOP_LAG_MS": "100",
            "AGORA_HANDSHAKES_PER_IP_S": "1",
        }
    )
    a = Admission(s)
    assert a.check(0, False, "1.1.1.1") is None
    r = a.check(0, True, "1.1.1.2")
    assert r is not None and (r.status, r.reason) == (503, "draining")
    r = a.check(10, False, "1.1.1.3")
    assert r is not None and (r.status, r.reason) == (503, "connection limit")
    a.handshakes = 2
    r = a.check(0, False, "1.1.1.4")
    assert r is not None and r.reason == "handshake limit"
    a.handshakes = 0
    a.lag_ms = 250
    r = a.check(0, False, "1.1.1.5")
    assert r is not None and r.reason == "event loop lag" and r.retry_after_s >= 1
    a.lag_ms = 0
    for _ in range(4):  # burst 4x
        a.check(0, False, "9.9.9.9")
    r = a.check(0, False, "9.9.9.9")
    assert r is not None and (r.status, r.reason) == (429, "per-ip handshake rate")
    assert a.refused["per-ip handshake rate"] == 1 and sum(a.refused.values()) == 5


def test_spend_takes_what_there_is_and_counts_the_rest_as_refused() -> None:
    bucket = TokenBucket(rate=10, burst=20)
    assert bucket.spend(0.0, 15) == (0, 0)
    refused, wait_ms = bucket.spend(0.0, 8)  # 5 left: 5 pass, 3 refused
    assert refused == 3 and wait_ms == 100
    assert bucket.spend(0.5, 5) == (0, 0)  # half a second: 5 more
    assert TokenBucket(rate=0, burst=0).spend(0.0, 10**6) == (0, 0)  # disabled


def test_abuse_policy_counts_a_batch_of_refusals() -> None:
    policy = AbusePolicy(max_refusals=20, window_s=10)
    assert not policy.refused(0.0, 20)
    assert policy.refused(0.1, 1)
    fresh = AbusePolicy(max_refusals=20, window_s=10)
    assert fresh.refused(0.0, 10_000)  # a flood in one read closes at once
    assert len(fresh._times) <= 21  # and keeps a bounded record
