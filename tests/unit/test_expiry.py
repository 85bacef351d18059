"""The token-expiry heap (gateway.expiry): pure, with connections standing in."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.expiry import COMPACT_MIN, TokenExpiry


@dataclass(eq=False)
class FakeConn:
    id: int
    user: str = "u"
    token_deadline: float = float("inf")
    is_gone: bool = False
    closed: list[tuple[int, str]] = field(default_factory=list)

    def close(self, code: int, reason: str = "") -> None:
        self.closed.append((code, reason))
        self.is_gone = True


def conn(i: int) -> Any:
    return FakeConn(i)


def test_closes_at_the_deadline_with_4001_and_not_before() -> None:
    expiry = TokenExpiry()
    a, b = conn(1), conn(2)
    expiry.watch(a, 100.0)
    expiry.watch(b, 200.0)
    assert expiry.expire(99.9) == 100.0 and not a.closed
    assert expiry.expire(100.0) == 200.0
    assert a.closed == [(4001, "token expired")] and not b.closed
    assert expiry.expire(300.0) is None and b.closed and expiry.closed == 2


def test_a_refresh_supersedes_the_old_deadline() -> None:
    expiry = TokenExpiry()
    a = conn(1)
    expiry.watch(a, 100.0)
    expiry.watch(a, 500.0)  # `auth` with a newer token
    assert expiry.expire(150.0) == 500.0 and not a.closed
    assert expiry.expire(500.0) is None and a.closed


def test_closed_connections_are_skipped_and_do_not_pile_up() -> None:
    expiry = TokenExpiry()
    for i in range(20 * COMPACT_MIN):  # churn: each connection gone before its deadline
        c = conn(i)
        expiry.watch(c, 1e12 + i)
        c.is_gone = True
    assert len(expiry) <= 2 * COMPACT_MIN
    live = conn(-1)
    expiry.watch(live, 50.0)
    expiry.expire(60.0)
    assert live.closed and all(not c.closed for _, _, c in expiry._heap)
