"""RS256/ES256 keys from a JWKS endpoint, rotated under a running gateway; `aud`/`iss`.

A real JWKS server on loopback (tests/jwks_server.py) and a real gateway process configured
with its URL: tokens signed with the published keys work over WebSocket and HTTP, a new key
is picked up without a restart, a withdrawn key stops verifying, made-up `kid`s are refused
and cost the JWKS server a bounded number of requests, and a JWKS server that is down
leaves the keys fetched before in use.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest

from agora_client import AgoraClient
from agora_client.client import Closed
from core.settings import Settings
from tests.integration.helpers import uid
from tests.jwks_server import JwksServer, SigningKey
from tests.stack import Proc, Stack

pytestmark = pytest.mark.engines

MIN_REFETCH_S = 1
AUDIENCE = "agora-test"
ISSUER = "https://idp.test/"
A = SigningKey.new("key-a", "RS256")
B = SigningKey.new("key-b", "ES256")


@pytest.fixture(scope="module")
def jwks() -> Iterator[JwksServer]:
    with JwksServer() as server:
        server.publish(A)
        yield server


@pytest.fixture(scope="module")
def gateway(settings: Settings, jwks: JwksServer) -> Iterator[Proc]:
    s = Stack(
        settings,
        extra_env={
            "AGORA_JWT_ALGORITHMS": "RS256,ES256",
            "AGORA_JWT_JWKS_URL": jwks.url,
            "AGORA_JWT_JWKS_LIFESPAN_S": "3600",  # only unknown kids make it fetch here
            "AGORA_JWT_JWKS_MIN_REFETCH_S": str(MIN_REFETCH_S),
            "AGORA_JWT_AUDIENCE": AUDIENCE,
            "AGORA_JWT_ISSUER": ISSUER,
        },
    )
    try:
        yield s.gateway("jwks-g1")
    finally:
        s.stop_all()


def token(key: SigningKey, user: str, kid: str | None = None, **claims: object) -> str:
    claims = {"aud": AUDIENCE, "iss": ISSUER, **claims}
    return key.token(user, kid=kid, **claims)


async def get(http: httpx.AsyncClient, g: Proc, tok: str) -> httpx.Response:
    return await http.get(
        f"{g.http_url}/v1/conversations", headers={"Authorization": f"Bearer {tok}"}
    )


async def refused_ws(g: Proc, tok: str) -> Closed:
    with pytest.raises(Closed) as info:
        c = await AgoraClient.connect(g.ws_url, tok)
        await c.close()
    return info.value


async def until_status(
    http: httpx.AsyncClient, g: Proc, tok: str, status: int, seconds: float = 10
) -> int:
    """Ask with `tok` until the answer is `status`; how many requests that took."""
    deadline = time.monotonic() + seconds
    for attempt in range(1, 1000):
        if (await get(http, g, tok)).status_code == status:
            return attempt
        assert time.monotonic() < deadline, f"no {status} within {seconds}s"
        await asyncio.sleep(0.1)
    raise AssertionError("unreachable")


async def test_keys_from_jwks_rotate_without_a_restart(
    gateway: Proc, jwks: JwksServer, http: httpx.AsyncClient
) -> None:
    pid = gateway.popen.pid
    # The gateway fetched the set at start, so the first token is not refused.
    assert jwks.hits >= 1
    alice = uid("jwks-alice")
    tok_a = token(A, alice)
    c = await AgoraClient.connect(gateway.ws_url, tok_a)
    assert c.hello["user"] == alice
    await c.close()
    assert (await get(http, gateway, tok_a)).status_code == 200

    # aud and iss are required and must match.
    for bad, reason in (
        (A.token(alice, iss=ISSUER), "token has no aud claim"),
        (token(A, alice, aud="someone-else"), "token aud is not this service's audience"),
        (token(A, alice, iss="https://evil.test/"), "token iss is not the accepted issuer"),
    ):
        r = await get(http, gateway, bad)
        assert r.status_code == 401 and r.json()["error"] == {
            "code": "unauthorized",
            "message": reason,
        }
        closed = await refused_ws(gateway, bad)
        assert (closed.code, closed.reason) == (4001, reason)

    # Rotation, step 1: the issuer publishes B next to A and starts signing with B.
    # The set is an hour from stale: only the unknown kid makes the gateway fetch it again
    # (once the rate limit allows, hence the wait).
    jwks.publish(A, B)
    await asyncio.sleep(MIN_REFETCH_S)
    bob = uid("jwks-bob")
    tok_b = token(B, bob)
    start = time.monotonic()
    attempts = await until_status(http, gateway, tok_b, 200, seconds=3)
    print(f"key B accepted after {attempts} request(s), {time.monotonic() - start:.2f}s")
    c = await AgoraClient.connect(gateway.ws_url, tok_b)
    assert c.hello["user"] == bob
    await c.close()
    assert (await get(http, gateway, tok_a)).status_code == 200  # A still published

    # Step 2: A is withdrawn. The next fetch (here made by an unknown kid) drops it, and
    # tokens signed with it are refused, even the one the gateway had already verified.
    jwks.publish(B)
    await asyncio.sleep(MIN_REFETCH_S)
    assert (await get(http, gateway, token(A, alice, kid="unknown-kid"))).status_code == 401
    await until_status(http, gateway, tok_a, 401)
    r = await get(http, gateway, tok_a)
    assert r.json()["error"]["message"] == "token kid 'key-a' is not a known signing key"
    assert (await get(http, gateway, tok_b)).status_code == 200
    assert gateway.popen.pid == pid and gateway.alive()


async def test_bogus_kids_are_refused_and_cost_the_jwks_server_bounded_fetches(
    gateway: Proc, jwks: JwksServer, http: httpx.AsyncClient
) -> None:
    jwks.publish(B)
    await asyncio.sleep(MIN_REFETCH_S)
    before, start = jwks.hits, time.monotonic()
    refused = 0
    # For several refetch intervals: each lets one fetch through, no more.
    while time.monotonic() - start < 3.5 and refused < 20_000:
        r = await get(http, gateway, token(B, "mallory", kid=f"bogus-{refused}"))
        assert r.status_code == 401, r.text
        message = r.json()["error"]["message"]
        assert message == f"token kid 'bogus-{refused}' is not a known signing key"
        if refused % 500 == 0:
            closed = await refused_ws(gateway, token(B, "mallory", kid=f"ws-bogus-{refused}"))
            assert closed.code == 4001 and "is not a known signing key" in closed.reason
        refused += 1
    elapsed = time.monotonic() - start
    fetched = jwks.hits - before
    print(f"{refused} bogus kids in {elapsed:.1f}s: {fetched} JWKS fetches")
    assert 2 <= fetched <= elapsed / MIN_REFETCH_S + 1
    assert (await get(http, gateway, token(B, uid("jwks-ok")))).status_code == 200


async def test_a_jwks_server_that_is_down_leaves_the_cached_keys_in_use(
    gateway: Proc, jwks: JwksServer, http: httpx.AsyncClient
) -> None:
    jwks.publish(B)
    jwks.down = True
    try:
        await asyncio.sleep(MIN_REFETCH_S)
        before, start = jwks.hits, time.monotonic()
        # Unknown kids are refused (and try a fetch, which fails) ...
        for i in range(20):
            r = await get(http, gateway, token(B, "mallory", kid=f"down-{i}"))
            assert r.status_code == 401
        # ... while new tokens signed with the cached key B verify.
        carol = uid("jwks-carol")
        tok = token(B, carol)
        assert (await get(http, gateway, tok)).status_code == 200
        c = await AgoraClient.connect(gateway.ws_url, tok)
        assert c.hello["user"] == carol
        await c.close()
        elapsed = time.monotonic() - start
        # The fetch runs in a thread of the gateway: the server counts its hit before it
        # answers 503, and the gateway logs the failure after that answer. Wait, bounded,
        # for both, not for the requests alone (a loaded machine can lag the thread).
        deadline = time.monotonic() + 10
        while jwks.hits == before or "failed (keeping 1 keys)" not in gateway.log_text():
            assert time.monotonic() < deadline, "no failed JWKS fetch logged"
            await asyncio.sleep(0.02)
        fetched = jwks.hits - before
        assert 1 <= fetched <= elapsed / MIN_REFETCH_S + 1
        assert "JWKS fetch from" in gateway.log_text() and gateway.alive()
    finally:
        jwks.down = False


async def test_a_slow_jwks_server_does_not_stall_the_gateway(
    gateway: Proc, jwks: JwksServer, http: httpx.AsyncClient
) -> None:
    """The fetch runs in a thread: while it hangs, requests are answered."""
    jwks.publish(B)
    await asyncio.sleep(MIN_REFETCH_S)
    jwks.delay_s = 4.0
    try:
        before = jwks.hits
        r = await get(http, gateway, token(B, "mallory", kid="slow-bogus"))
        assert r.status_code == 401
        deadline = time.monotonic() + 5
        while jwks.hits == before:  # the fetch has reached the server and hangs there
            assert time.monotonic() < deadline, "no fetch"
            await asyncio.sleep(0.02)
        slowest = 0.0
        for _ in range(20):
            t0 = time.monotonic()
            assert (await get(http, gateway, token(B, uid("jwks-slow")))).status_code == 200
            slowest = max(slowest, time.monotonic() - t0)
        print(f"slowest request while the JWKS fetch hung: {slowest * 1000:.0f} ms")
        assert slowest < 1.0
        assert jwks.answered == before  # the fetch was still hanging throughout
    finally:
        jwks.delay_s = 0
