"""JWKS keys: chosen by `kid`, fetched off the caller's thread, at most once per interval."""

from __future__ import annotations

from collections.abc import Callable

import jwt
import pytest

from core.errors import Unauthorized
from core.settings import Settings
from gateway.auth import TokenVerifier
from gateway.jwks import JwksKeys
from tests.jwks_server import SigningKey

A = SigningKey.new("a")
B = SigningKey.new("b")
E = SigningKey.new("e", "ES256")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Endpoint:
    """What the JWKS endpoint serves now; fetches are counted and may fail."""

    def __init__(self, *keys: SigningKey) -> None:
        self.keys = list(keys)
        self.fetches = 0
        self.down = False

    def __call__(self) -> list[jwt.PyJWK]:
        self.fetches += 1
        if self.down:
            raise jwt.PyJWKClientConnectionError("connection refused")
        return [k.pyjwk() for k in self.keys]


class Deferred:
    """Holds the spawned fetches until the test runs them: as a worker thread would."""

    def __init__(self) -> None:
        self.pending: list[Callable[[], None]] = []

    def __call__(self, work: Callable[[], None]) -> None:
        self.pending.append(work)

    def run(self) -> int:
        n = len(self.pending)
        while self.pending:
            self.pending.pop(0)()
        return n


def keys(
    endpoint: Endpoint, clock: Clock, spawn: Deferred, algs: tuple[str, ...] = ("RS256",)
) -> JwksKeys:
    return JwksKeys(
        "https://idp.example/jwks", algs, 300, 30, fetch=endpoint, spawn=spawn, clock=clock
    )


def test_the_key_is_chosen_by_kid_and_never_fetched_on_the_callers_thread() -> None:
    endpoint, clock, spawn = Endpoint(A, B), Clock(), Deferred()
    k = keys(endpoint, clock, spawn)
    assert k.key("a") is None and not k.loaded  # nothing yet: a fetch is started, not awaited
    assert endpoint.fetches == 0 and spawn.run() == 1 and endpoint.fetches == 1
    assert k.loaded
    got_a, got_b = k.key("a"), k.key("b")
    assert got_a is not None and got_a.key_id == "a"
    assert got_b is not None and got_b.key_id == "b"
    assert spawn.run() == 0  # known kids in a fresh set fetch nothing


def test_unknown_kids_fetch_at_most_once_per_interval() -> None:
    endpoint, clock, spawn = Endpoint(A), Clock(), Deferred()
    k = keys(endpoint, clock, spawn)
    k.refresh()
    spawn.run()
    clock.now += 30
    for i in range(1000):  # a flood of made-up kids
        assert k.key(f"bogus-{i}") is None
    assert spawn.run() == 1 and endpoint.fetches == 2
    clock.now += 29.9
    assert k.key("bogus") is None and spawn.run() == 0
    clock.now += 0.1
    assert k.key("bogus") is None and spawn.run() == 1 and endpoint.fetches == 3


def test_one_fetch_at_a_time_even_when_the_interval_has_passed() -> None:
    endpoint, clock, spawn = Endpoint(A), Clock(), Deferred()
    k = keys(endpoint, clock, spawn)
    k.key("a")
    clock.now += 120  # the first fetch is still running (not run yet)
    assert not k.refresh() and len(spawn.pending) == 1
    spawn.run()
    assert k.refresh()


def test_rotation_a_new_kid_is_seen_after_the_fetch_it_triggers() -> None:
    endpoint, clock, spawn = Endpoint(A), Clock(), Deferred()
    k = keys(endpoint, clock, spawn)
    k.refresh()
    spawn.run()
    endpoint.keys = [A, B]
    clock.now += 30
    assert k.key("b") is None  # refused this time, fetched for the next
    spawn.run()
    got = k.key("b")
    assert got is not None and got.key_id == "b"
    generation = k.generation
    endpoint.keys = [B]
    clock.now += 30
    k.refresh()
    spawn.run()
    assert k.key("a") is None and k.generation == generation + 1  # a key withdrawn


def test_an_old_set_is_refetched_in_the_background_and_still_used() -> None:
    endpoint, clock, spawn = Endpoint(A), Clock(), Deferred()
    k = keys(endpoint, clock, spawn)
    k.refresh()
    spawn.run()
    clock.now += 299
    assert k.key("a") is not None and spawn.run() == 0
    clock.now += 1  # the lifespan has passed: answered from the old set, refetched
    assert k.key("a") is not None and spawn.run() == 1 and endpoint.fetches == 2


def test_an_endpoint_that_is_down_keeps_the_keys_and_is_not_hammered() -> None:
    endpoint, clock, spawn = Endpoint(A), Clock(), Deferred()
    k = keys(endpoint, clock, spawn)
    k.refresh()
    spawn.run()
    endpoint.down = True
    clock.now += 400  # the set is old and the endpoint down
    for _ in range(100):
        assert k.key("a") is not None
        k.key("bogus")
    assert spawn.run() == 1 and k.failures == 1
    assert k.key("a") is not None  # the failed fetch kept what it had
    clock.now += 30
    k.key("a")
    assert spawn.run() == 1 and k.failures == 2 and endpoint.fetches == 3


def test_keys_for_other_algorithms_are_left_out() -> None:
    endpoint, clock, spawn = Endpoint(A, E), Clock(), Deferred()
    k = keys(endpoint, clock, spawn, ("RS256",))
    k.refresh()
    spawn.run()
    assert k.key("a") is not None and k.key("e") is None
    both = keys(endpoint, clock, spawn, ("RS256", "ES256"))
    both.refresh()
    spawn.run()
    e = both.key("e")
    assert e is not None and e.algorithm_name == "ES256"


def verifier(endpoint: Endpoint, clock: Clock, spawn: Deferred, **env: str) -> TokenVerifier:
    settings = Settings.from_env(
        {
            "AGORA_JWT_ALGORITHMS": "RS256,ES256",
            "AGORA_JWT_JWKS_URL": "https://idp.example/jwks",
            **env,
        }
    )
    v = TokenVerifier(settings, prefetch=False)
    assert v.jwks is not None and v.jwks.fetches == 0
    v.jwks = keys(endpoint, clock, spawn, ("RS256", "ES256"))
    v.jwks.refresh()
    spawn.run()
    return v


def refusal(v: TokenVerifier, token: str) -> str:
    with pytest.raises(Unauthorized) as err:
        v.verify(token)
    return err.value.message


def test_verifier_checks_each_token_with_the_key_its_kid_names() -> None:
    endpoint, clock, spawn = Endpoint(A, B, E), Clock(), Deferred()
    v = verifier(endpoint, clock, spawn)
    assert v.verify(A.token("alice")).user == "alice"
    assert v.verify(B.token("bob")).user == "bob"
    assert v.verify(E.token("eve")).user == "eve"
    # Signed with A but naming B: B's key does not verify it.
    assert refusal(v, A.token("mallory", kid="b")) == "token invalid: InvalidSignatureError"
    assert refusal(v, A.token("x", kid="nope")) == "token kid 'nope' is not a known signing key"
    no_kid = jwt.encode({"sub": "x", "exp": 2**31}, A.private, algorithm="RS256")
    assert refusal(v, no_kid).startswith("token has no kid")
    # An RS256 token naming the ES256 key's kid.
    assert refusal(v, A.token("x", kid="e")) == "token kid 'e' is a key for another algorithm"


def test_verifier_with_audience_and_issuer_over_jwks() -> None:
    endpoint, clock, spawn = Endpoint(A), Clock(), Deferred()
    v = verifier(endpoint, clock, spawn, AGORA_JWT_AUDIENCE="agora", AGORA_JWT_ISSUER="idp")
    assert v.verify(A.token("alice", aud="agora", iss="idp")).user == "alice"
    assert refusal(v, A.token("alice", aud="agora")) == "token has no iss claim"


def test_a_withdrawn_key_stops_verifying_even_remembered_tokens() -> None:
    endpoint, clock, spawn = Endpoint(A, B), Clock(), Deferred()
    v = verifier(endpoint, clock, spawn)
    old = A.token("alice")
    assert v.verify(old).user == "alice"
    assert v.verify(old).user == "alice"  # remembered
    endpoint.keys = [B]
    clock.now += 300
    assert v.verify(old).user == "alice"  # still the old set (the refetch just started)
    spawn.run()
    assert refusal(v, old) == "token kid 'a' is not a known signing key"
    assert v.verify(B.token("bob")).user == "bob"


def test_before_the_first_fetch_lands_tokens_are_refused_as_unavailable() -> None:
    endpoint, clock, spawn = Endpoint(A), Clock(), Deferred()
    settings = Settings.from_env(
        {"AGORA_JWT_ALGORITHMS": "RS256", "AGORA_JWT_JWKS_URL": "https://idp.example/jwks"}
    )
    v = TokenVerifier(settings, prefetch=False)
    v.jwks = keys(endpoint, clock, spawn)
    assert refusal(v, A.token("alice")) == "signing keys are not available yet"
    assert spawn.run() == 1
    assert v.verify(A.token("alice")).user == "alice"
