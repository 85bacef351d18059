"""The publish API end to end: a backend service posts with its own scoped key, through
the same pipeline as users' messages, to members on two gateways. Wrong, missing or
out-of-scope keys are refused and nothing is stored."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from agora_client import AgoraClient
from agora_client.publisher import Publisher, PublishError
from core.settings import Settings
from gateway.servicekeys import new_key
from storage import messages
from storage.pools import ShardPools
from tests.integration.helpers import collect, create_group, uid
from tests.stack import Proc, Stack

pytestmark = pytest.mark.engines

BILLING_KEY, BILLING = new_key("billing", "conv:*,user:*")
NARROW_KEY, NARROW = new_key("narrow", "conv:1")  # a conversation that is not these
UNLISTED_KEY, _ = new_key("billing")  # right name, a key the gateways do not know


@pytest.fixture(scope="module")
def stack(settings: Settings) -> Iterator[Stack]:
    s = Stack(settings, extra_env={"AGORA_SERVICE_KEYS": f"{BILLING};{NARROW}"})
    try:
        s.gateway("pub-g1")
        s.gateway("pub-g2")
        s.fanout("pub-f1")
        yield s
    finally:
        s.stop_all()


def key(k: str) -> dict[str, str]:
    return {"Authorization": f"ApiKey {k}"}


async def test_a_service_posts_into_a_conversation_marked_as_the_service(
    stack: Stack, g1: Proc, g2: Proc, http: httpx.AsyncClient
) -> None:
    a, b = uid("a"), uid("b")
    conv = await create_group(http, stack, g1, a, [b])
    ca = await AgoraClient.connect(g1.ws_url, stack.token(a))
    cb = await AgoraClient.connect(g2.ws_url, stack.token(b), "msgpack")
    await ca.sub(conv)
    await cb.sub(conv)
    url = f"{g2.http_url}/v1/publish/conversations/{conv}"
    r = await http.post(
        url, json={"cid": "inv-1", "body": "invoice ready"}, headers=key(BILLING_KEY)
    )
    assert r.status_code == 202, r.text
    again = await http.post(
        url, json={"cid": "inv-1", "body": "invoice ready"}, headers=key(BILLING_KEY)
    )
    assert again.json()["id"] == r.json()["id"]  # idempotent by cid, like a send
    for client in (ca, cb):
        (got,) = await collect(client, conv, 1, 15)
        assert got["from"] == "service/billing" and got["service"] is True
        assert got["body"] == "invoice ready" and got["id"] == r.json()["id"]
    # A user's own messages are not marked.
    await ca.send(conv, "thanks")
    (mine,) = await collect(cb, conv, 1, 15)
    assert "service" not in mine
    page = await http.get(
        f"{g1.http_url}/v1/conversations/{conv}/messages",
        headers={"Authorization": f"Bearer {stack.token(b)}"},
    )
    assert [m.get("service", False) for m in page.json()["items"]] == [False, True]
    await ca.close()
    await cb.close()


async def test_a_service_posts_to_a_user_who_is_told_and_can_read_it(
    stack: Stack, g1: Proc, g2: Proc, http: httpx.AsyncClient
) -> None:
    user = uid("u")
    client = await AgoraClient.connect(g1.ws_url, stack.token(user))
    # `hello` comes before the session's user route is registered, and `joined` goes only
    # where the route says: a request is answered once the session is registered.
    assert (await client.ping())["t"] == "pong"
    r = await http.post(
        f"{g2.http_url}/v1/publish/users/{user}",
        json={"cid": "welcome", "body": "welcome aboard"},
        headers=key(BILLING_KEY),
    )
    assert r.status_code == 202, r.text
    conv = r.json()["conv"]
    joined = await client.next_event("joined")
    assert joined["conv"]["id"] == conv
    assert sorted(joined["conv"]["members"]) == sorted(["service/billing", user])
    await client.sub(conv, since=0)
    (got,) = await collect(client, conv, 1, 15)
    assert got["service"] is True and got["body"] == "welcome aboard"
    r2 = await http.post(
        f"{g1.http_url}/v1/publish/users/{user}",
        json={"cid": "second", "body": "again"},
        headers=key(BILLING_KEY),
    )
    assert r2.json()["conv"] == conv  # the same direct conversation
    listed = await http.get(
        f"{g1.http_url}/v1/conversations", headers={"Authorization": f"Bearer {stack.token(user)}"}
    )
    assert conv in [c["id"] for c in listed.json()["items"]]
    await client.close()


async def test_wrong_missing_or_out_of_scope_keys_are_refused_and_store_nothing(
    stack: Stack, g1: Proc, http: httpx.AsyncClient, pools: ShardPools
) -> None:
    a = uid("a")
    conv = await create_group(http, stack, g1, a, [])
    url = f"{g1.http_url}/v1/publish/conversations/{conv}"
    body = {"cid": "x", "body": "should not land"}
    cases = {
        "missing": ({}, 401),
        "unknown key": (key(UNLISTED_KEY), 401),
        "garbage": (key("billing.nope"), 401),
        "a user's JWT": ({"Authorization": f"Bearer {stack.token(a)}"}, 401),
        "a JWT as a key": (key(stack.token(a)), 401),
        "out of scope": (key(NARROW_KEY), 403),
    }
    for label, (headers, status) in cases.items():
        r = await http.post(url, json=body, headers=headers)
        print(label, r.status_code, r.json()["error"]["code"])
        assert r.status_code == status, (label, r.text)
    r = await http.post(f"{g1.http_url}/v1/publish/users/{a}", json=body, headers=key(NARROW_KEY))
    assert r.status_code == 403
    r = await http.post(url, json={"cid": "x", "body": ""}, headers=key(BILLING_KEY))
    assert r.status_code == 422
    r = await http.post(
        f"{g1.http_url}/v1/publish/conversations/123456789", json=body, headers=key(BILLING_KEY)
    )
    assert r.status_code == 404
    assert await messages.latest_seq(pools, int(conv)) == 0


async def test_the_python_publisher(
    stack: Stack, g1: Proc, g2: Proc, http: httpx.AsyncClient
) -> None:
    a = uid("a")
    conv = await create_group(http, stack, g1, a, [])
    client = await AgoraClient.connect(g2.ws_url, stack.token(a))
    await client.sub(conv)
    pub = Publisher(g1.http_url, BILLING_KEY)
    sent = await asyncio.to_thread(pub.to_conversation, conv, "from a bot", "bot-1")
    (got,) = await collect(client, conv, 1, 15)
    assert got["id"] == sent["id"] and got["service"] is True
    with pytest.raises(PublishError) as exc:
        await asyncio.to_thread(Publisher(g1.http_url, NARROW_KEY).to_conversation, conv, "x")
    assert (exc.value.status, exc.value.code) == (403, "forbidden")
    await client.close()
