"""Redis is bounded by rate x window (issue 18 point 3): every key Agora writes has a TTL
or belongs to a fixed-size family, and what a message and a connection cost in Redis is
measured here (MEMORY USAGE on the real keys) and written to
.agora/test/artifacts/redis-memory.json; docs/operations.md quotes the figures.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections import defaultdict
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from agora_client import AgoraClient
from core.settings import Settings
from fanout.routing import ROUTE_TTL_S
from tests.faults import OwnRedis
from tests.integration.helpers import create_group, uid
from tests.stack import Stack

pytestmark = pytest.mark.engines

SENDS = 400
CONNECTIONS = 40
WINDOW_S = 300
OUT = Path(".agora/test/artifacts/redis-memory.json")

# Keys that may live without a TTL, because there is a fixed number of them.
UNBOUNDED_BY_TTL = {"epoch", "idseq", "feed-stats", "revocations"}


def write_figures(figures: dict[str, object]) -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(figures, indent=2) + "\n")


def family(key: str, prefix: str) -> str:
    """`<prefix>:route:c:42` -> `route:c`; `<prefix>:feed:{new:*}:ready` -> `feed:ready`."""
    rest = key[len(prefix) + 1 :]
    if rest.startswith("feed:"):
        tail = re.sub(r"^feed:\{[^}]*\}", "", rest)
        return "feed" + (":" + tail.lstrip(":").split(":")[0] if tail else "")
    if rest.startswith("route:"):
        return ":".join(rest.split(":")[:2])
    return rest.split(":")[0]


async def usage(r: aioredis.Redis, prefix: str) -> dict[str, list[tuple[str, int, int]]]:
    """family -> [(key, bytes, ttl)] for every key of `prefix`."""
    out: dict[str, list[tuple[str, int, int]]] = defaultdict(list)
    async for raw in r.scan_iter(match=f"{prefix}:*", count=1000):
        key = raw.decode()
        size = await r.memory_usage(key, samples=0)
        ttl = await r.ttl(key)
        if size is None or ttl == -2:  # expired between SCAN and MEMORY USAGE or TTL
            continue
        out[family(key, prefix)].append((key, int(size), int(ttl)))
    return out


async def test_every_key_is_bounded_and_the_bytes_per_message_and_connection(
    settings: Settings, own_redis: OwnRedis, http: httpx.AsyncClient
) -> None:
    s = Stack(
        settings,
        extra_env={
            "AGORA_REDIS_URL": own_redis.url,
            "AGORA_IDEMPOTENCY_WINDOW_S": str(WINDOW_S),
        },
    )
    prefix = settings.redis_prefix
    r = aioredis.Redis.from_url(own_redis.url)
    clients: list[AgoraClient] = []
    try:
        g = s.gateway("rb-g")
        s.fanout("rb-f")

        # M connections, each of its own user, each subscribed to its own conversation.
        for i in range(CONNECTIONS):
            user = uid(f"rb{i}")
            conv = await create_group(http, s, g, user, [])
            c = await AgoraClient.connect(g.ws_url, s.token(user))
            await c.sub(conv)
            clients.append(c)
        connected = await usage(r, prefix)
        mem_connected = int((await r.info("memory"))["used_memory"])

        # N messages from one sender, each with a uuid cid as clients make them.
        user0 = uid("rbs")
        conv_s = await create_group(http, s, g, user0, [])
        c0 = await AgoraClient.connect(g.ws_url, s.token(user0))
        clients.append(c0)
        for _ in range(SENDS):
            await c0.send(conv_s, "x" * 40, cid=uuid.uuid4().hex)
        sent = await usage(r, prefix)
        mem_sent = int((await r.info("memory"))["used_memory"])

        # A post and a feed read, so the feed families exist too.
        hdr = {"Authorization": f"Bearer {s.token(user0)}"}
        resp = await http.post(
            f"{g.http_url}/v1/posts",
            json={"title": "t", "body": "b", "community": "rb"},
            headers=hdr,
        )
        assert resp.status_code in (200, 201), resp.text
        for kind in ("new", "trending", "top"):
            resp = await http.get(f"{g.http_url}/v1/feeds/{kind}", headers=hdr)
            assert resp.status_code == 200, resp.text
        everything = await usage(r, prefix)

        # Every key has a TTL, or belongs to a family with a fixed number of keys.
        unbounded = {
            key
            for fam, entries in everything.items()
            if fam not in UNBOUNDED_BY_TTL
            for key, _size, ttl in entries
            if ttl < 0
        }
        assert not unbounded, f"keys without a TTL: {sorted(unbounded)[:10]}"
        assert len(everything.get("idseq", [])) <= settings.logical_shards
        assert len(everything.get("epoch", [])) == 1
        for fam in ("route:c", "route:u"):
            assert everything[fam], fam
            assert all(0 < ttl <= ROUTE_TTL_S for _k, _s, ttl in everything[fam])
        idem = sent["idem"]
        assert len(idem) == SENDS
        assert all(0 < ttl <= WINDOW_S for _k, _s, ttl in idem)

        def mean(entries: list[tuple[str, int, int]]) -> float:
            return sum(size for _k, size, _t in entries) / max(1, len(entries))

        per_conn_keys = (
            sum(size for _k, size, _t in connected["route:u"])
            + sum(size for _k, size, _t in connected["route:c"])
        ) / CONNECTIONS
        figures = {
            "sends": SENDS,
            "connections": CONNECTIONS,
            "idempotency_record_bytes": round(mean(idem)),
            "idempotency_key_example": idem[0][0],
            "used_memory_per_message": round((mem_sent - mem_connected) / SENDS),
            "user_route_set_bytes": round(mean(connected["route:u"])),
            "conv_route_set_bytes": round(mean(connected["route:c"])),
            "route_bytes_per_connection": round(per_conn_keys),
            "families": {
                fam: {"keys": len(e), "bytes": sum(x[1] for x in e)}
                for fam, e in sorted(everything.items())
            },
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_figures(figures)
        print(json.dumps(figures, indent=2))
        # The point of the window: records are small and few (rate x window of them).
        assert figures["idempotency_record_bytes"] < 200
    finally:
        for c in clients:
            await c.close()
        s.stop_all()
        await r.aclose()
