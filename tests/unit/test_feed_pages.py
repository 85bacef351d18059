"""The pure parts of the feed page cache (gateway/feedpages.py) and of token verification
(gateway/auth.py): coalescing, page encoding, the verified-token cache. No engines."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import jwt
import orjson
import pytest

from core.errors import Unauthorized
from core.settings import Settings
from fanout.feeds import FeedCursor
from gateway import auth
from gateway.auth import TokenVerifier, make_token
from gateway.feedpages import CachedPage, NextFlight, cursor_text
from gateway.http.posts import post_json
from storage.posts import Post

# -- NextFlight ---------------------------------------------------------------------------------


class Store:
    """A key-value store whose reads take a while, recording what each read saw."""

    def __init__(self) -> None:
        self.value = 0
        self.reads: list[list[str]] = []
        self.gate: asyncio.Event | None = None
        self.fail: Exception | None = None

    async def read(self, items: list[str]) -> list[tuple[str, int]]:
        self.reads.append(list(items))
        seen = self.value  # the state when the read is sent
        if self.gate is not None:
            await self.gate.wait()
        else:
            await asyncio.sleep(0)
        if self.fail is not None:
            raise self.fail
        return [(item, seen) for item in items]


async def test_lookups_made_together_share_one_flight() -> None:
    store = Store()
    flight = NextFlight(store.read)
    got = await asyncio.gather(*(flight.get(f"k{i}") for i in range(20)))
    assert store.reads == [[f"k{i}" for i in range(20)]]
    assert [r for r, _ in got] == [(f"k{i}", 0) for i in range(20)]  # each its own answer
    assert {n for _, n in got} == {1} and flight.flights == 1 and flight.lookups == 20


async def test_a_lookup_never_joins_a_flight_already_out() -> None:
    store = Store()
    store.gate = asyncio.Event()
    flight = NextFlight(store.read)
    early = asyncio.create_task(flight.get("a"))
    await asyncio.sleep(0.01)  # the first flight has left, with the state at value 0
    assert store.reads == [["a"]]
    store.value = 1  # a write completes; lookups from now on must see it
    late = [asyncio.create_task(flight.get(k)) for k in ("b", "c")]
    await asyncio.sleep(0.01)
    assert store.reads == [["a"]]  # b and c wait for the next flight, not this one
    store.gate.set()
    assert await early == (("a", 0), 1)
    assert [await t for t in late] == [(("b", 1), 2), (("c", 1), 2)]
    assert store.reads == [["a"], ["b", "c"]]


async def test_a_failed_flight_fails_its_lookups_only() -> None:
    store = Store()
    flight = NextFlight(store.read)
    store.fail = ConnectionError("down")
    results = await asyncio.gather(flight.get("a"), flight.get("b"), return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)
    store.fail = None
    assert await flight.get("c") == (("c", 0), 2)


async def test_a_reader_that_goes_away_does_not_hurt_the_others() -> None:
    store = Store()
    store.gate = asyncio.Event()
    flight = NextFlight(store.read)
    gone = asyncio.create_task(flight.get("a"))
    stays = asyncio.create_task(flight.get("b"))
    await asyncio.sleep(0.01)
    gone.cancel()
    store.gate.set()
    assert await stays == (("b", 0), 1)
    with pytest.raises(asyncio.CancelledError):
        await gone


# -- CachedPage -----------------------------------------------------------------------------------


def _post(i: int, title: str = "t") -> Post:
    return Post(1000 + i, f"u{i}", "c", title, 'b\u00e9\n"q"', 2000 + i, i, 1, 3, 0)


def _expected(items: list[Post], votes: dict[int, int], nxt: str | None) -> Any:
    out = []
    for p in items:
        obj = post_json(p)
        obj["my_vote"] = votes.get(p.id, 0)
        out.append(obj)
    return {"items": out, "next": nxt}


def test_a_cached_page_is_the_json_of_each_viewer() -> None:
    items = [_post(i) for i in range(5)] + [_post(9, "\u2028 \U0001f600 </script>")]
    nxt = cursor_text(FeedCursor("7-1735689600000", 6, 3.25, 1005))
    page = CachedPage.encode((b"tok", b"7", None), 3, 0.0, items, nxt)
    assert page.ids == tuple(p.id for p in items)
    for votes in ({}, {1001: 1}, {1000: -1, 1005: 1, 1009: -1}, {4242: 1}):
        assert orjson.loads(page.body(votes)) == _expected(items, votes, nxt)
    assert page.body({}) is page.plain  # a viewer without votes gets the shared bytes
    empty = CachedPage.encode((b"tok", None, None), 1, 0.0, [], None)
    assert orjson.loads(empty.body({})) == {"items": [], "next": None}


# -- verified tokens --------------------------------------------------------------------------


def _verifier(leeway_s: int = 5) -> tuple[TokenVerifier, str]:
    secret = "s" * 32
    env = {"AGORA_JWT_SECRET": secret, "AGORA_JWT_LEEWAY_S": str(leeway_s)}
    return TokenVerifier(Settings.from_env(env)), secret


def test_a_token_is_checked_once_while_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    verifier, secret = _verifier()
    calls = []
    real = verifier._jwt.decode  # the verifier's own PyJWT (gateway/auth.py: _decoder)

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(verifier._jwt, "decode", counting)
    alice, bob = make_token(secret, "alice", "Alice", 60), make_token(secret, "bob", None, 60)
    for _ in range(5):
        who = verifier.verify(alice)
        assert (who.user, who.name) == ("alice", "Alice") and who.exp > time.time() + 50
        assert verifier.verify(bob).user == "bob"
    assert calls == [alice, bob]
    # Only the exact text that was checked is remembered: a forged one is checked, and fails.
    head, body, _sig = alice.split(".")
    forged = f"{head}.{body}.{make_token('other' * 8, 'alice', 'Alice', 60).split('.')[2]}"
    with pytest.raises(Unauthorized):
        verifier.verify(forged)
    with pytest.raises(Unauthorized):
        verifier.verify(forged)  # failures are not remembered as successes either


def test_a_remembered_token_still_expires() -> None:
    verifier, secret = _verifier(leeway_s=0)
    # exp is whole seconds (int(time.time()) + ttl): with a ttl of 1 it could be a
    # millisecond away, and the first check below fail as expired. 2 leaves at least 1 s.
    token = make_token(secret, "carol", None, 2)
    assert verifier.verify(token).user == "carol"
    exp = jwt.decode(token, options={"verify_signature": False})["exp"]
    while time.time() < exp - 0.05:
        assert verifier.verify(token).user == "carol"  # from the cache
        time.sleep(0.05)
    time.sleep(max(0.0, exp + 0.05 - time.time()))
    with pytest.raises(Unauthorized) as err:
        verifier.verify(token)
    assert "expired" in err.value.message


def test_the_remembered_tokens_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "VERIFIED_CACHE", 10)
    verifier, secret = _verifier()
    tokens = [make_token(secret, f"u{i}", None, 60) for i in range(25)]
    for t in tokens:
        verifier.verify(t)
    assert len(verifier._verified) == 10
    assert list(verifier._verified) == tokens[-10:]  # the oldest went first
