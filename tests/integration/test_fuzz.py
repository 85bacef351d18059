"""Bad input from outside: fuzzed WebSocket frames and HTTP bodies, injection strings and
every size limit. The node never crashes, the offender gets the docs/protocol.md error or close,
and everyone else is unaffected."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Iterator
from typing import Any

import httpx
import msgpack
import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from agora_client import AgoraClient, ServerError
from core.settings import Settings
from tests.stack import Proc, Stack

pytestmark = pytest.mark.engines

CLOSES_ALLOWED = {4002, 1009, 1007, 4008}  # protocol error, too large, bad UTF-8, abuse
PING_RID = 3_141_592_653_589_793


@pytest.fixture(scope="module")
def node(settings: Settings) -> Iterator[tuple[Stack, Proc]]:
    s = Stack(settings)
    try:
        g = s.gateway("fuzz-g")
        s.fanout("fuzz-f")
        yield s, g
    finally:
        s.stop_all()


scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=50)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=30,
)
field_names = st.sampled_from(["t", "conv", "cid", "body", "since", "rid", "kind", "x"])
frames = st.one_of(
    st.dictionaries(field_names, values, max_size=6),
    st.fixed_dictionaries(
        {"t": st.sampled_from(["sub", "unsub", "send", "typing", "ping", "nope", ""])},
        optional={"conv": values, "cid": values, "body": values, "since": values, "rid": values},
    ),
    values,
)


async def _exercise(
    url: str, token: str, encoding: str, batch: list[Any], raw: list[bytes]
) -> None:
    """Send every frame; whatever happens must be an answer or an allowed close."""
    client = await AgoraClient.connect(url, token, encoding)
    for frame in batch:
        if client.closed.is_set():
            break
        try:
            data = client.encode(frame) if encoding == "msgpack" else orjson.dumps(frame).decode()
        except (TypeError, ValueError, OverflowError):
            continue  # not representable in this encoding
        try:
            await client.send_raw(data)
        except Exception:
            break
    for blob in raw:
        if client.closed.is_set():
            break
        try:
            await client.ws.send(blob, text=encoding == "json")  # invalid UTF-8 in text frames
        except Exception:
            break
    # The ping's rid is one the fuzzed frames do not use: their replies, still in flight,
    # must not be taken for its answer.
    client._rids = itertools.count(PING_RID)
    try:
        pong = await asyncio.wait_for(client.ping(), 10)
    except (ConnectionError, ConnectionClosed, ServerError, TimeoutError) as exc:
        # Only a closed connection may leave a ping unanswered (the close may still be on
        # its way: wait for it), and only with one of the allowed codes.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(client.closed.wait(), 10)
        assert client.closed.is_set(), f"a ping on an open connection failed: {exc!r}"
    else:
        assert pong["t"] == "pong" and pong["rid"] == PING_RID, pong
    if client.closed.is_set():
        assert client.close_code in CLOSES_ALLOWED, client.close_code
    while not client.events.empty():
        f = client.events.get_nowait()
        if f.get("t") == "err":
            assert f["code"] in (
                "bad_request",
                "too_large",
                "forbidden",
                "not_found",
                "rate_limited",
            )
    await client.close()


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.lists(frames, min_size=1, max_size=20),
    st.lists(st.binary(min_size=1, max_size=64), max_size=3),
    st.sampled_from(["json", "msgpack"]),
)
def test_fuzzed_frames_never_crash_the_node(
    node: tuple[Stack, Proc], batch: list[Any], raw: list[bytes], encoding: str
) -> None:
    stack, g = node
    asyncio.run(_exercise(g.ws_url, stack.token("fuzzer"), encoding, batch, raw))
    assert g.alive()


def test_node_still_serves_everyone_after_the_fuzzing(node: tuple[Stack, Proc]) -> None:
    stack, g = node

    async def check() -> None:
        c = await AgoraClient.connect(g.ws_url, stack.token("bystander"))
        assert (await c.ping())["t"] == "pong"
        await c.close()

    asyncio.run(check())
    assert httpx.get(f"{g.http_url}/healthz").status_code == 200


json_bodies = st.one_of(
    values,
    st.fixed_dictionaries(
        {},
        optional={
            "kind": values | st.sampled_from(["direct", "group"]),
            "members": values | st.lists(st.text(max_size=70), max_size=5),
            "title": values,
            "cid": values,
            "body": values,
            "user": values,
        },
    ),
)
paths = st.sampled_from(
    [
        ("POST", "/v1/conversations"),
        ("GET", "/v1/conversations"),
        ("GET", "/v1/conversations/{id}"),
        ("POST", "/v1/conversations/{id}/members"),
        ("DELETE", "/v1/conversations/{id}/members/{user}"),
        ("GET", "/v1/conversations/{id}/messages"),
        ("POST", "/v1/conversations/{id}/messages"),
    ]
)
ids = st.one_of(
    st.integers(min_value=-5, max_value=2**70).map(str),
    st.text(min_size=1, max_size=30).filter(
        lambda x: "/" not in x and "?" not in x and "#" not in x
    ),
)
queries = st.dictionaries(
    st.sampled_from(["limit", "cursor", "before"]), st.text(max_size=30), max_size=3
)


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(paths, ids, json_bodies, queries, st.booleans())
def test_fuzzed_http_requests_get_documented_errors_never_500(
    node: tuple[Stack, Proc],
    route: tuple[str, str],
    id_: str,
    body: Any,
    query: dict[str, str],
    as_json: bool,
) -> None:
    stack, g = node
    method, path = route
    url = g.http_url + path.replace("{id}", id_).replace("{user}", id_)
    headers = {"Authorization": f"Bearer {stack.token('http-fuzzer')}"}
    try:
        content = orjson.dumps(body) if as_json else msgpack.packb(body)
    except (TypeError, ValueError, OverflowError):
        content = b"\x00garbage"
    try:
        r = httpx.request(method, url, params=query, content=content, headers=headers, timeout=20)
    except httpx.InvalidURL:
        assume(False)  # the client refuses to send it; nothing reached the server
        return
    # 405: a path that normalises ("." and "..") onto a route of another method.
    assert r.status_code in (200, 201, 202, 204, 400, 403, 404, 405, 409, 413, 422), (
        r.status_code,
        r.text,
    )
    if r.status_code >= 400:
        err = r.json()["error"]
        assert err["code"] in ("bad_request", "forbidden", "not_found", "conflict", "too_large")
        assert isinstance(err["message"], str) and err["message"]


def test_injection_strings_are_stored_verbatim_and_harmless(node: tuple[Stack, Proc]) -> None:
    stack, g = node
    nasty = [
        "'; DROP TABLE messages; --",
        '" OR 1=1 --',
        "Robert'); DELETE FROM members;--",
        "<script>alert(1)</script>",
        "nul as text: \\x00 \\u0000",
        "%s %d {0} ${jndi:ldap://x}",
    ]
    hdr = {"Authorization": f"Bearer {stack.token('bobby')}"}
    r = httpx.post(
        f"{g.http_url}/v1/conversations",
        json={"kind": "group", "members": [], "title": nasty[0]},
        headers=hdr,
    )
    assert r.status_code == 201 and r.json()["title"] == nasty[0]
    conv = r.json()["id"]
    for i, text in enumerate(nasty):
        r = httpx.post(
            f"{g.http_url}/v1/conversations/{conv}/messages",
            json={"cid": f"{text[:40]}-{i}", "body": text},
            headers=hdr,
        )
        assert r.status_code == 202, r.text

    items: list[dict[str, Any]] = []
    for _ in range(50):
        page = httpx.get(f"{g.http_url}/v1/conversations/{conv}/messages", headers=hdr).json()
        items = page["items"]
        if len(items) == len(nasty):
            break
        time.sleep(0.2)
    assert sorted(m["body"] for m in items) == sorted(nasty)
    assert (
        httpx.get(f"{g.http_url}/v1/conversations/{conv}", headers=hdr).json()["title"] == nasty[0]
    )


def test_every_size_limit_is_enforced(node: tuple[Stack, Proc], settings: Settings) -> None:
    stack, g = node
    hdr = {"Authorization": f"Bearer {stack.token('limits')}"}
    base = g.http_url
    conv = httpx.post(
        f"{base}/v1/conversations", json={"kind": "group", "members": []}, headers=hdr
    ).json()["id"]
    cases = [
        ("POST", "/v1/conversations", {"kind": "group", "members": [], "title": "t" * 201}, 422),
        (
            "POST",
            "/v1/conversations",
            {"kind": "group", "members": [f"u{i}" for i in range(1001)]},
            422,
        ),
        ("POST", "/v1/conversations", {"kind": "group", "members": ["x" * 65]}, 422),
        ("POST", "/v1/conversations", {"kind": "direct", "members": ["a", "b"]}, 422),
        ("POST", f"/v1/conversations/{conv}/messages", {"cid": "c" * 65, "body": "x"}, 422),
        ("POST", f"/v1/conversations/{conv}/messages", {"cid": "c", "body": "x" * 4001}, 413),
        ("POST", f"/v1/conversations/{conv}/messages", {"cid": "c", "body": ""}, 422),
        ("POST", f"/v1/conversations/{conv}/messages", {"cid": "c", "body": "a\u0000b"}, 422),
    ]
    for method, path, body, status in cases:
        r = httpx.request(method, base + path, json=body, headers=hdr)
        assert r.status_code == status, (path, r.status_code, r.text)
    r = httpx.post(f"{base}/v1/conversations", content=b"{" + b" " * 70_000 + b"}", headers=hdr)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
    for q in ("limit=0", "limit=101", "limit=abc", "before=-1", "cursor=%%%"):
        r = httpx.get(f"{base}/v1/conversations/{conv}/messages?{q}", headers=hdr)
        assert r.status_code == 400, (q, r.status_code)
    for bad_id in ("0", "9223372036854775808", "12ab", "-1"):
        r = httpx.get(f"{base}/v1/conversations/{bad_id}", headers=hdr)
        assert r.status_code == 404, bad_id
    long_token = "x" * 9000
    r = httpx.get(f"{base}/v1/me", headers={"Authorization": f"Bearer {long_token}"})
    assert r.status_code == 401

    async def ws_nul() -> None:
        c = await AgoraClient.connect(g.ws_url, stack.token("limits"))
        err = None
        try:
            await c.send(conv, "nul \u0000 inside", cid="nul")
        except ServerError as exc:
            err = exc.code
        assert err == "bad_request"
        await c.close()

    asyncio.run(ws_nul())

    async def ws_limits() -> None:
        # A token that fits in a header but is not a token: 4001.
        hdr = {"Authorization": f"Bearer {'x' * 8000}"}
        async with connect(g.ws_url, additional_headers=hdr) as ws:
            with pytest.raises(Exception):  # noqa: B017
                await asyncio.wait_for(ws.recv(), 5)
            assert ws.close_code == 4001
        # A header over the handshake parser's limit: a prompt 400, not a hung socket.
        with pytest.raises(InvalidStatus) as info:
            await connect(
                g.ws_url,
                additional_headers={"Authorization": f"Bearer {long_token}"},
                open_timeout=5,
            )
        assert info.value.response.status_code == 400

    asyncio.run(ws_limits())
