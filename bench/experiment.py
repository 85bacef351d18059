"""Run an Agora process with proposed fixes applied at run time, to measure them before
anyone changes the code (the benchmarks' `--experiment NAME[,NAME]`).

    python -m bench.experiment gc,attach-batch -- gateway --port 8000

Nothing here is used in production: each patch is a measured proposal for the owners of
gateway/, fanout/ and storage/ (see bench/RESULTS.md, "Proposed fixes").

- `gc`: after start-up imports, `gc.freeze()` and a higher gen-0 threshold, so the cyclic
  collector stops re-walking every long-lived connection object (with 20,000 connections
  a full collection walks millions of objects and stalls the event loop).
- `attach-batch`: `Node.attach` registers new users' routes in one Redis pipeline per
  event-loop tick instead of one round trip per connection (it still waits for it).
- `pg-noreset`: asyncpg pools release connections without the `RESET ALL; UNLISTEN *; ...`
  round trip (a `ROLLBACK` still ends any open transaction).
- `no-wire-metrics`: the per-frame metrics middleware is bypassed (to price it).
- `timing`: the send, access, subscribe and attach awaits are timed; totals are written
  to $BENCH_TIMING_OUT.<pid>.json every 2 s (where a slow ack waits).
- `frame-once`: uvicorn's send writes a message's WebSocket frame bytes built once per
  message object instead of serializing a frame per recipient.
- `direct-push`: `Connection.push` writes the frame straight to the socket when nothing is
  queued and the socket is writable (no writer-task wake-up, no ASGI send chain per
  frame); the bounded queue is used only under backpressure.
- `tracemalloc`: SIGUSR1 takes a baseline snapshot, the next SIGUSR1 writes the top
  allocation sites since then to $BENCH_TRACEMALLOC_OUT (where per-connection memory goes).
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys
import tracemalloc
from collections.abc import Callable
from typing import Any

PATCHES: dict[str, Callable[[], None]] = {}


def patch(name: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
    def register(fn: Callable[[], None]) -> Callable[[], None]:
        PATCHES[name] = fn
        return fn

    return register


@patch("gc")
def _gc() -> None:
    import gateway.app
    import gateway.server  # noqa: F401

    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


@patch("attach-batch")
def _attach_batch() -> None:
    from gateway.connection import Connection
    from gateway.node import Node

    pending: dict[int, tuple[set[str], asyncio.Future[None]]] = {}

    async def flush(node: Node) -> None:
        users, fut = pending.pop(id(node))
        try:
            await node.routes.update(node.id, add_users=sorted(users))
            fut.set_result(None)
        except Exception as exc:
            fut.set_exception(exc)

    async def attach(self: Node, conn: Connection) -> None:
        self.connections.add(conn)
        none_left = getattr(self, "_none_left", None)
        if none_left is not None:
            none_left.clear()
        first = not self.user_conns[conn.user]
        self.user_conns[conn.user].add(conn)
        if not first:
            return
        entry = pending.get(id(self))
        if entry is None:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry = pending[id(self)] = (set(), fut)
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(flush(self)))
        entry[0].add(conn.user)
        await asyncio.shield(entry[1])

    Node.attach = attach  # type: ignore[method-assign]


@patch("pg-noreset")
def _pg_noreset() -> None:
    import asyncpg

    original = asyncpg.create_pool

    async def _no_reset(conn: Any) -> None:
        return None

    def create_pool(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("reset", _no_reset)
        return original(*args, **kwargs)

    asyncpg.create_pool = create_pool


@patch("no-wire-metrics")
def _no_wire_metrics() -> None:
    from gateway import metrics

    async def passthrough(self: Any, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)

    metrics.WireMetrics.__call__ = passthrough  # type: ignore[method-assign]


@patch("tracemalloc")
def _tracemalloc() -> None:
    tracemalloc.start(1)
    state: dict[str, tracemalloc.Snapshot] = {}
    out = os.environ.get("BENCH_TRACEMALLOC_OUT", "tracemalloc.txt")

    def on_signal(_signum: int, _frame: object) -> None:
        snap = tracemalloc.take_snapshot()
        if "base" not in state:
            state["base"] = snap
            return
        stats = snap.compare_to(state["base"], "lineno")
        total = sum(s.size_diff for s in stats)
        with open(out, "w") as f:
            f.write(f"total {total} bytes\n")
            for s in stats[:40]:
                f.write(f"{s.size_diff}\t{s.count_diff}\t{s.traceback}\n")

    signal.signal(signal.SIGUSR1, on_signal)


@patch("timing")
def _timing() -> None:
    """Time the awaits of the send and subscribe paths; every 2 s the totals are written to
    $BENCH_TIMING_OUT.<pid>.json (JSON: name -> [count, total ms, max ms, over-100-ms count])."""
    import functools
    import json
    import time

    from gateway import node, send

    stats: dict[str, list[float]] = {}

    def timed(name: str, fn: Any) -> Any:
        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                ms = (time.perf_counter() - t) * 1000
                st = stats.setdefault(name, [0, 0.0, 0.0, 0])
                st[0] += 1
                st[1] += ms
                st[2] = max(st[2], ms)
                st[3] += ms > 100

        return wrapper

    sp = send.SendPath
    sp.send = timed("send (total)", sp.send)  # type: ignore[method-assign]
    sp._claim_or_get = timed("send: redis claim", sp._claim_or_get)  # type: ignore[method-assign]
    sp._produce = timed("send: kafka produce + redis set", sp._produce)  # type: ignore[method-assign]
    from gateway.access import Access

    Access.check = timed("access check", Access.check)  # type: ignore[method-assign]
    node.Node.subscribe = timed("subscribe (total)", node.Node.subscribe)  # type: ignore[method-assign]
    node.Node.attach = timed("attach", node.Node.attach)  # type: ignore[method-assign]
    out = os.environ.get("BENCH_TIMING_OUT", "timing") + f".{os.getpid()}.json"
    loop_started = False

    def dump() -> None:
        with open(out, "w") as f:
            json.dump({"pid": os.getpid(), "stats": stats}, f)

    original_start = node.Node.start

    async def start(self: Any) -> None:
        nonlocal loop_started
        await original_start(self)
        if not loop_started:
            loop_started = True

            async def every() -> None:
                while True:
                    await asyncio.sleep(2)
                    dump()

            self._tasks.append(asyncio.create_task(every()))

    node.Node.start = start  # type: ignore[method-assign]


def _frame_cache() -> Callable[[str | bytes], bytes]:
    """Server frames are unmasked, so a message's frame bytes are the same for every
    recipient: build them once per message object (the node already encodes once)."""
    cache: dict[int, tuple[object, bytes]] = {}

    def frame_of(data: str | bytes) -> bytes:
        hit = cache.get(id(data))
        if hit is not None and hit[0] is data:
            return hit[1]
        if isinstance(data, str):
            payload, head = data.encode(), 0x81
        else:
            payload, head = data, 0x82
        n = len(payload)
        if n < 126:
            header = bytes((head, n))
        elif n < 65536:
            header = bytes((head, 126)) + n.to_bytes(2, "big")
        else:
            header = bytes((head, 127)) + n.to_bytes(8, "big")
        frame = header + payload
        if len(cache) >= 1024:
            cache.clear()
        cache[id(data)] = (data, frame)  # holding `data` keeps its id from being reused
        return frame

    return frame_of


def _uvicorn_ready(proto: Any) -> bool:
    from websockets.protocol import State

    return bool(
        proto.handshake_complete
        and not proto.close_sent
        and not proto.disconnected
        and proto.initial_response is None
        and proto.writable.is_set()
        and proto.conn.state is State.OPEN
        and not proto.transport.is_closing()
    )


@patch("frame-once")
def _frame_once() -> None:
    from uvicorn.protocols.websockets import websockets_sansio_impl as impl

    frame_of = _frame_cache()
    original = impl.WebSocketsSansIOProtocol.send

    async def send(self: Any, message: Any) -> None:
        if message["type"] == "websocket.send" and _uvicorn_ready(self):
            data = message.get("text")
            if data is None:
                data = message.get("bytes")
            if data is not None:
                self.transport.write(frame_of(data))
                return
        await original(self, message)

    impl.WebSocketsSansIOProtocol.send = send  # type: ignore[method-assign]


def _protocol_of(websocket: Any) -> Any:
    """The uvicorn protocol under a Starlette WebSocket (through the send wrappers)."""
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    fn = getattr(websocket, "_send", None)
    for _ in range(8):
        owner = getattr(fn, "__self__", None)
        if isinstance(owner, WebSocketsSansIOProtocol):
            return owner
        cells = getattr(fn, "__closure__", None) or ()
        nxt = None
        for cell in cells:
            value = cell.cell_contents
            if callable(value) and getattr(value, "__name__", "") in ("send", "send_counted"):
                nxt = value
                break
        if nxt is None:
            return None
        fn = nxt
    return None


@patch("direct-push")
def _direct_push() -> None:
    """Connection.push writes the frame straight to the socket when nothing is queued and
    the socket is writable; it queues (bounded, 4009 beyond) only under backpressure."""
    from gateway.connection import Connection

    frame_of = _frame_cache()
    original = Connection.push
    protos: dict[int, Any] = {}

    def push(self: Connection, data: bytes | str) -> None:
        if self.close_code is None and not self._queue:
            proto: Any = protos.get(self.id)
            if proto is None:
                proto = protos[self.id] = _protocol_of(self.websocket) or False
            if proto is not False and _uvicorn_ready(proto):
                proto.transport.write(frame_of(data))
                self.sent_frames += 1
                return
        original(self, data)

    Connection.push = push  # type: ignore[method-assign]


def main() -> None:
    argv = sys.argv[1:]
    if "--" not in argv:
        raise SystemExit("usage: python -m bench.experiment NAME[,NAME...] -- AGORA ARGS")
    split = argv.index("--")
    names = [n for spec in argv[:split] for n in spec.split(",") if n]
    for name in names:
        if name not in PATCHES:
            raise SystemExit(f"unknown experiment {name!r}; known: {', '.join(PATCHES)}")
        PATCHES[name]()
    from gateway.cli import main as agora

    raise SystemExit(agora(argv[split + 1 :]))


if __name__ == "__main__":
    main()
