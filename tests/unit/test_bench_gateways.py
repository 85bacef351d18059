"""bench.gateways.plan: how a storm over several gateways spreads its clients, and the
limits it refuses to start past (the fd limit per process, the ephemeral ports per
(source ip, gateway port))."""

from __future__ import annotations

from collections import Counter

import pytest

from bench import gateways
from bench.gateways import plan


def test_100k_over_six_gateways_fits_the_20k_fd_limit() -> None:
    p = plan(100_000, 6, 8, 0, 20_000)
    assert p.per_gateway == 16_667 and p.per_proc <= 19_900
    assert p.procs == 20  # one load-generator process per 5,000 clients
    by_gateway = Counter(g for g, _ in p.slots)
    assert sorted(by_gateway.values()) == [16_666] * 2 + [16_667] * 4
    # Every gateway sees every source address, evenly: 100,000 / 48 pairs.
    assert len(Counter(p.slots)) == 48 and p.per_tuple == 2084
    # The processes together hold every client once.
    assert sum(len(p.for_proc(w)) for w in range(p.procs)) == 100_000


def test_refuses_a_gateway_past_its_fd_limit() -> None:
    with pytest.raises(ValueError, match="--gateways 6"):
        plan(100_000, 5, 8, 0, 20_000)
    assert plan(19_900, 1, 8, 0, 20_000).per_gateway == 19_900


def test_refuses_a_load_generator_past_its_fd_limit() -> None:
    with pytest.raises(ValueError, match="--procs 6"):
        plan(100_000, 6, 8, 4, 20_000)


def test_refuses_more_connections_per_4tuple_space_than_ephemeral_ports(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(gateways, "ephemeral_ports", lambda: 1000)
    with pytest.raises(ValueError, match="ephemeral ports"):
        plan(12_001, 6, 2, 0, 20_000)
    assert plan(12_000, 6, 2, 0, 20_000).per_tuple == 1000


def test_log_levels_counts_warnings_and_errors_of_json_lines() -> None:
    text = (
        '{"level":"WARNING","msg":"a"}\n{"level":"INFO"}\n{"level":"ERROR"}\n{"level":"WARNING"}\n'
    )
    assert gateways.log_levels(text) == {"WARNING": 2, "ERROR": 1}
    assert gateways.log_levels("") == {}
