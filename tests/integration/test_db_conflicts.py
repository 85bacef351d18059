"""A database conflict a retry gets past (a deadlock, a serialization failure: SQLSTATE
class 40) is `unavailable` to the client, over HTTP and over the WebSocket, never an
`internal` error: nothing of the request was committed and the same request may be sent
again. Forced with triggers that raise the SQLSTATE for the test's own rows only."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import httpx
import pytest

from agora_client import AgoraClient, ServerError
from core.settings import Settings
from storage.pools import ShardPools
from tests.integration.helpers import auth, collect, create_group, uid
from tests.stack import Proc, Stack

pytestmark = pytest.mark.engines


@pytest.fixture(scope="module")
def stack(settings: Settings) -> Iterator[Stack]:
    s = Stack(settings)
    try:
        s.gateway("dbc-g1")
        s.fanout("dbc-f1")
        yield s
    finally:
        s.stop_all()


@asynccontextmanager
async def raising(pools: ShardPools, table: str, when: str, errcode: str) -> AsyncIterator[None]:
    """While open, every insert or update of `table` rows matching `when` (a condition on
    NEW) fails with `errcode`, on every physical shard."""
    name = f"t_conflict_{secrets.token_hex(4)}"
    for physical in range(pools.physical_count):
        async with pools.connection(physical) as conn:
            await conn.execute(
                f"""CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$
                    BEGIN
                      RAISE EXCEPTION 'forced by the test' USING ERRCODE = '{errcode}';
                    END $$"""
            )
            await conn.execute(
                f"CREATE TRIGGER {name} BEFORE INSERT OR UPDATE ON {table} FOR EACH ROW"
                f" WHEN ({when}) EXECUTE FUNCTION {name}()"
            )
    try:
        yield
    finally:
        for physical in range(pools.physical_count):
            async with pools.connection(physical) as conn:
                await conn.execute(f"DROP FUNCTION {name}() CASCADE")


@pytest.mark.parametrize("errcode", ["40P01", "40001"])
async def test_a_post_that_loses_a_conflict_is_unavailable_and_its_retry_is_created(
    stack: Stack, g1: Proc, http: httpx.AsyncClient, pools: ShardPools, errcode: str
) -> None:
    author = uid("dbc")
    community = f"c{secrets.token_hex(4)}"
    post = {"title": "a conflict", "body": "", "community": community}
    async with raising(pools, "posts", f"NEW.community = '{community}'", errcode):
        r = await http.post(f"{g1.http_url}/v1/posts", json=post, headers=auth(stack, author))
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "unavailable", r.text
        assert errcode in r.json()["error"]["message"]
        assert r.headers["Retry-After"]
    r = await http.post(f"{g1.http_url}/v1/posts", json=post, headers=auth(stack, author))
    assert r.status_code == 201, r.text
    r = await http.get(
        f"{g1.http_url}/v1/feeds/new?community={community}", headers=auth(stack, author)
    )
    assert [p["title"] for p in r.json()["items"]] == ["a conflict"]  # once


async def test_a_read_pointer_that_loses_a_conflict_is_unavailable_then_taken(
    stack: Stack, g1: Proc, http: httpx.AsyncClient, pools: ShardPools
) -> None:
    owner = uid("dbc")
    conv = await create_group(http, stack, g1, owner, [])
    client = await AgoraClient.connect(g1.ws_url, stack.token(owner))
    try:
        await client.sub(conv)
        await client.send(conv, "read me")
        (got,) = await collect(client, conv, 1, 15)
        async with raising(pools, "members", f"NEW.conv_id = {conv}", "40P01"):
            with pytest.raises(ServerError) as caught:
                await client.read(conv, got["seq"])
            assert caught.value.code == "unavailable"
        await client.read(conv, got["seq"])  # the retry is taken
        assert (await client.ping())["t"] == "pong"
    finally:
        await client.close()
