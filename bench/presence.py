"""Presence cost per connect: a storm of users connecting while in rooms of a given size.

The claim to check (docs/architecture.md, presence): coming online costs Redis work in
proportion to the user's conversations, never to their members. So the same storm is run
with every user in one big room (up to 1,000 members, a group's maximum) and in small
ones, and Redis's own command counters (INFO commandstats, private engines: only this
stack talks to them) are read before and after.

    .venv/bin/python -m bench.presence --users 2000 --room 1000
    .venv/bin/python -m bench.presence --users 2000 --room 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import redis.asyncio as aioredis

from agora_client import AgoraClient
from bench.stack import bench_stack, http_json, unique_tag


async def commandstats(url: str) -> dict[str, int]:
    r = aioredis.from_url(url)
    try:
        info = await r.info("commandstats")
    finally:
        await r.aclose()
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()}


async def storm(ws_url: str, tokens: list[str], inflight: int) -> tuple[list[AgoraClient], float]:
    gate = asyncio.Semaphore(inflight)
    clients: list[AgoraClient] = []

    async def one(token: str) -> None:
        async with gate:
            clients.append(await AgoraClient.connect(ws_url, token, timeout=60))

    started = time.monotonic()
    await asyncio.gather(*(one(t) for t in tokens))
    return clients, time.monotonic() - started


def run(users: int, room: int, inflight: int) -> dict[str, Any]:
    with bench_stack(None, {"AGORA_HANDSHAKES_PER_IP_S": "0"}) as stack:
        gw = stack.gateway("pres-g1")
        tag = unique_tag()
        names = [f"p{tag}-{i}" for i in range(users)]
        for start in range(0, users, room):  # rooms of `room` members
            group = names[start : start + room]
            status, body = http_json(
                "POST",
                f"{gw.http_url}/v1/conversations",
                stack.token(group[0]),
                {"kind": "group", "members": group[1:], "title": "room"},
            )
            assert status == 201, body
        redis_url = stack.settings.redis_url

        async def measure() -> dict[str, Any]:
            await asyncio.sleep(2)  # the gateway's own start-up traffic settles
            before = await commandstats(redis_url)
            clients, took = await storm(gw.ws_url, [stack.token(n) for n in names], inflight)
            await asyncio.sleep(3)  # presence transitions run after the hello
            after = await commandstats(redis_url)
            for c in clients:
                await c.close()
            delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
            delta = {k: v for k, v in sorted(delta.items(), key=lambda kv: -kv[1]) if v}
            total = sum(delta.values())
            return {
                "users": users,
                "room_members": room,
                "connect_s": round(took, 2),
                "redis_commands": total,
                "redis_commands_per_connect": round(total / users, 2),
                "by_command_per_connect": {k: round(v / users, 2) for k, v in delta.items()},
            }

        return asyncio.run(measure())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--room", type=int, default=1000)
    parser.add_argument("--inflight", type=int, default=100)
    args = parser.parse_args()
    print(json.dumps(run(args.users, min(args.room, 1000), args.inflight), indent=2))


if __name__ == "__main__":
    main()
