"""Conversation members and senders for the chat benchmarks, on the lean client.

A `Member` is one subscribed connection's view of one conversation: it checks the `msg`
stream (lost, duplicated, reordered), keeps the last contiguous seq to resubscribe with
`since`, and records end-to-end latency from the send time the body carries (the sender
writes `time.time_ns()` first in the body; senders and receivers share the machine clock).
A `Sender` sends open loop at a fixed rate without waiting for acks, and counts the acks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from bench.stack import http_json
from bench.wsclient import WsClient


class Member:
    """One subscriber of one conversation, across reconnects."""

    __slots__ = (
        "ahead",
        "arrivals",
        "client",
        "conv",
        "dups",
        "errors",
        "last",
        "latencies",
        "record",
        "reorders",
        "subbed",
        "subbed_seq",
        "t_last",
        "t_recovered",
        "token",
        "user",
    )

    def __init__(self, user: str, token: str, conv: str) -> None:
        self.user = user
        self.token = token
        self.conv = conv
        self.client: SubClient | None = None
        self.last = 0  # every seq up to here was received
        self.ahead: set[int] = set()  # received beyond a hole (out of order)
        self.dups = 0
        self.reorders = 0
        self.errors: Counter[str] = Counter()
        self.subbed = False
        self.subbed_seq = 0
        self.t_recovered = 0.0
        self.t_last = 0.0  # monotonic time of the last msg frame
        self.latencies: list[int] = []  # microseconds
        self.record = False
        # (send ns, receive ns) per message while recording, if kept (bench/stages.py)
        self.arrivals: list[tuple[int, int]] | None = None

    @property
    def received(self) -> int:
        """Distinct seqs received (they start at 1)."""
        return self.last + len(self.ahead)

    def on_msg(self, seq: int, body: str, now_ns: int) -> None:
        if seq == self.last + 1:
            self.last = seq
            ahead = self.ahead
            while ahead and self.last + 1 in ahead:
                ahead.discard(self.last + 1)
                self.last += 1
        elif seq <= self.last or seq in self.ahead:
            self.dups += 1
            return
        else:
            self.ahead.add(seq)
            self.reorders += 1
        if self.record:
            sent = body[:19]
            if sent.isdigit():
                self.latencies.append((now_ns - int(sent)) // 1000)
                if self.arrivals is not None:
                    self.arrivals.append((int(sent), now_ns))


class SubRefused(RuntimeError):
    """The gateway answered `sub` with an error frame (its code says if a retry may help)."""

    def __init__(self, code: str, frame: dict[str, Any]) -> None:
        super().__init__(f"sub refused: {frame}")
        self.code = code


class SubClient(WsClient):
    """The connection of a Member: routes msg/subbed/err frames to it."""

    def __init__(
        self,
        member: Member,
        host: str,
        port: int,
        on_closed: Callable[[Member, SubClient], None] | None = None,
    ) -> None:
        super().__init__(host, port, member.token)
        self.member = member
        self.subbed_fut: asyncio.Future[dict[str, Any]] | None = None
        self._on_closed_cb = on_closed

    def subscribe(self, since: int | None) -> asyncio.Future[dict[str, Any]]:
        frame: dict[str, Any] = {"t": "sub", "conv": self.member.conv, "rid": 1}
        if since is not None:
            frame["since"] = since
        self.subbed_fut = asyncio.get_running_loop().create_future()
        self.send_json(frame)
        return self.subbed_fut

    def on_frame(self, payload: bytes) -> None:
        now = time.time_ns()
        f = orjson.loads(payload)
        t = f.get("t")
        m = self.member
        if t == "msg":
            m.on_msg(f["seq"], f["body"], now)
            m.t_last = time.monotonic()
        elif t == "subbed":
            m.subbed = True
            m.subbed_seq = f.get("seq", 0)
            if self.subbed_fut is not None and not self.subbed_fut.done():
                self.subbed_fut.set_result(f)
        elif t == "err":
            m.errors[str(f.get("code"))] += 1
            if f.get("rid") == 1 and self.subbed_fut is not None and not self.subbed_fut.done():
                self.subbed_fut.set_exception(SubRefused(str(f.get("code")), f))

    def on_closed(self) -> None:
        self.member.subbed = False
        if self.subbed_fut is not None and not self.subbed_fut.done():
            self.subbed_fut.set_exception(ConnectionError(f"closed ({self.close_code})"))
        if self._on_closed_cb is not None:
            self._on_closed_cb(self.member, self)


class Sender(WsClient):
    """Sends `send` frames for one user; counts acks per conversation."""

    def __init__(self, host: str, port: int, token: str, user: str) -> None:
        super().__init__(host, port, token)
        self.user = user
        self._rids = itertools.count(1)
        self.pending: dict[int, tuple[str, float]] = {}  # rid -> (conv, sent at)
        self.acked: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.ack_ms: list[float] = []
        self.sent = 0

    def send_msg(self, conv: str, cid: str, pad: str) -> None:
        rid = next(self._rids)
        self.pending[rid] = (conv, time.monotonic())
        self.sent += 1
        body = f"{time.time_ns()} {pad}"
        self.send_json({"t": "send", "conv": conv, "cid": cid, "body": body, "rid": rid})

    def on_frame(self, payload: bytes) -> None:
        f = orjson.loads(payload)
        t = f.get("t")
        if t == "ack" or t == "err":
            entry = self.pending.pop(f.get("rid", -1), None)
            if entry is None:
                return
            if t == "ack":
                self.acked[entry[0]] += 1
                self.ack_ms.append((time.monotonic() - entry[1]) * 1000)
            else:
                self.errors[str(f.get("code"))] += 1


def create_groups(
    base_url: str,
    token_of: Callable[[str], str],
    groups: Sequence[tuple[str, list[str]]],
    threads: int = 16,
) -> list[str]:
    """POST /v1/conversations for each (owner, members); returns their ids, in order."""

    def one(group: tuple[str, list[str]]) -> str:
        owner, members = group
        body = {"kind": "group", "members": members, "title": "bench"}
        for _ in range(20):
            status, data = http_json("POST", f"{base_url}/v1/conversations", token_of(owner), body)
            if status == 201:
                return str(data["id"])
            if status in (429, 503):
                time.sleep(0.2)
                continue
            raise RuntimeError(f"creating a group failed: {status} {data}")
        raise RuntimeError("creating a group: still refused after retries")

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, groups))


def seq_report(members: Sequence[Member], totals: dict[str, int]) -> dict[str, int]:
    """Expected vs delivered over members, given each conversation's acked total."""
    expected = sum(totals.get(m.conv, 0) for m in members)
    received = sum(min(m.received, totals.get(m.conv, 0)) for m in members)
    extra = sum(max(0, m.received - totals.get(m.conv, 0)) for m in members)
    return {
        "expected": expected,
        "delivered": received,
        "lost": expected - received,
        "duplicated": sum(m.dups for m in members),
        "reordered": sum(m.reorders for m in members),
        "beyond_acked": extra,  # accepted without an ack seen (e.g. ack lost): not an error
    }
