"""Traffic for the namespace cluster, run on its load-generator host (bench/cluster.py).

    ip netns exec agc-loadgen python -m bench.clusterload --out R.json --stop-file S \
        --gateway ws://10.77.0.10:8000/v1/ws --gateway ws://10.77.0.11:8000/v1/ws

Makes `--convs` two-member group conversations (until each physical shard database holds
at least `--per-db` of them), connects both members of each with agora_client's
ReconnectingClient (every gateway in its list, a different first one per user, so a
closed connection moves to another gateway and resubscribes with `since`), and has one
member of each send a message every `--interval-ms` (same cid on every retry) until it
gets SIGUSR1. Then it waits until every member has every acknowledged message, or
`--drain-s` passes, and writes what was acked and what each member received (with wall
clock times) to `--out`, for the caller to check against storage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from agora_client.resilient import ReconnectingClient
from bench.common import wait_until
from core.settings import Settings
from gateway.auth import make_token
from storage.ids import shard_of_id
from storage.shards import ShardMap


async def _make_convs(
    http_url: str, settings: Settings, per_db: int, tag: str
) -> list[tuple[int, int, str, str]]:
    """(conv, physical db, sender, receiver) with at least per_db conversations per db."""
    shard_map = ShardMap.from_settings(settings)
    dbs = len(settings.shard_dsns)
    out: list[tuple[int, int, str, str]] = []
    count = dict.fromkeys(range(dbs), 0)
    async with httpx.AsyncClient(timeout=20) as http:
        for i in range(per_db * dbs * 20):
            if min(count.values()) >= per_db:
                break
            sender, receiver = f"{tag}-s{i}", f"{tag}-r{i}"
            token = make_token(settings.jwt_secret, sender, None, 3600)
            r = await http.post(
                f"{http_url}/v1/conversations",
                json={"kind": "group", "members": [receiver], "title": "load"},
                headers={"Authorization": f"Bearer {token}"},
            )
            r.raise_for_status()
            conv = int(r.json()["id"])
            db = shard_map.physical(shard_of_id(conv))
            if count[db] < per_db:
                count[db] += 1
                out.append((conv, db, sender, receiver))
    if min(count.values()) < per_db:
        raise RuntimeError(f"could not place {per_db} conversations on every database: {count}")
    return out


class Member:
    def __init__(self, user: str, urls: list[str], secret: str) -> None:
        self.user = user
        self.client = ReconnectingClient(urls, make_token(secret, user, None, 3600))
        self.received: dict[int, list[float]] = {}  # message id -> wall times received
        self.gaps = 0

    async def run(self) -> None:
        while True:
            frame = await self.client.next_event(timeout=3600)
            if frame.get("t") == "msg":
                self.received.setdefault(int(frame["id"]), []).append(time.time())
            elif frame.get("t") == "gap":
                self.gaps += 1


async def _sender(
    member: Member, conv: int, interval_s: float, stop: asyncio.Event, acked: dict[str, Any]
) -> None:
    n = 0
    while not stop.is_set():
        cid = f"{conv}-{n}"
        sent = time.time()
        ack = await member.client.send(str(conv), f"m{n}", cid=cid, timeout=120)
        acked[cid] = {"id": int(ack["id"]), "sent": sent, "acked": time.time()}
        n += 1
        await asyncio.sleep(interval_s)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings.from_env(dict(os.environ))
    urls: list[str] = args.gateway
    http_url = urls[0].replace("ws://", "http://").removesuffix("/v1/ws")
    convs = await _make_convs(http_url, settings, args.per_db, args.tag)
    members: dict[str, Member] = {}
    for i, (_conv, _db, sender, receiver) in enumerate(convs):
        for j, user in enumerate((sender, receiver)):
            turn = (2 * i + j) % len(urls)
            members[user] = Member(user, urls[turn:] + urls[:turn], settings.jwt_secret)
    for m in members.values():
        await m.client.start()
    for conv, _db, sender, receiver in convs:
        await members[sender].client.subscribe(str(conv))
        await members[receiver].client.subscribe(str(conv))
    readers = [asyncio.create_task(m.run()) for m in members.values()]
    await asyncio.to_thread(Path(args.ready_file).write_text, "ready")
    acked: dict[int, dict[str, Any]] = {conv: {} for conv, *_ in convs}
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, stop.set)
    await asyncio.gather(
        *(
            _sender(members[s], conv, args.interval_ms / 1000, stop, acked[conv])
            for conv, _db, s, _r in convs
        )
    )

    def complete() -> bool:
        return all(
            a["id"] in members[u].received
            for conv, _db, s, r in convs
            for a in acked[conv].values()
            for u in (s, r)
        )

    await wait_until(complete, args.drain_s, 0.2)
    for task in readers:
        task.cancel()
    for m in members.values():
        with contextlib.suppress(Exception):
            await m.client.close()
    return {
        "convs": [
            {
                "conv": conv,
                "db": db,
                "members": [s, r],
                "acked": acked[conv],
                "received": {u: members[u].received for u in (s, r)},
            }
            for conv, db, s, r in convs
        ],
        "connects": {u: m.client.connects for u, m in members.items()},
        "gaps": {u: m.gaps for u, m in members.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.clusterload", description=__doc__)
    p.add_argument("--gateway", action="append", required=True)
    p.add_argument("--per-db", type=int, default=3)
    p.add_argument("--interval-ms", type=int, default=100)
    p.add_argument("--drain-s", type=float, default=30)
    p.add_argument("--tag", default="load")
    p.add_argument("--ready-file", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    result = asyncio.run(run(args))
    Path(args.out).write_bytes(orjson.dumps(result, option=orjson.OPT_NON_STR_KEYS))


if __name__ == "__main__":
    main()
