"""A lean HTTP/1.1 keep-alive load client (closed loop), for the feeds benchmark.

httpx costs about a millisecond of CPU per request; one load-generator core could then not
offer a gateway 3,000 requests/s. Each `HttpConn` is one keep-alive connection that sends a
request, reads a Content-Length (or chunked) response, and sends the next.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from collections.abc import Sequence
from typing import cast


def get_request(host: str, port: int, path: str, token: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {token}\r\n"
        "Accept: application/json\r\n\r\n"
    ).encode()


class HttpConn(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc or ConnectionResetError("closed"))

    def data_received(self, data: bytes) -> None:
        self._buf += data
        self._try_complete()

    def _try_complete(self) -> None:
        buf = self._buf
        end = buf.find(b"\r\n\r\n")
        if end < 0 or self._waiter is None or self._waiter.done():
            return
        head = bytes(buf[:end]).decode("latin-1").lower()
        status = int(head[9:12])
        body_start = end + 4
        length = -1
        chunked = False
        for line in head.split("\r\n")[1:]:
            if line.startswith("content-length:"):
                length = int(line[15:].strip())
            elif line.startswith("transfer-encoding:") and "chunked" in line:
                chunked = True
        if chunked:
            term = buf.find(b"0\r\n\r\n", body_start)
            if term < 0:
                return
            body = bytes(buf[body_start:term])
            del buf[: term + 5]
        else:
            if length < 0:
                length = 0
            if len(buf) - body_start < length:
                return
            body = bytes(buf[body_start : body_start + length])
            del buf[: body_start + length]
        self._waiter.set_result((status, body))

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        assert self.transport is not None
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return await self._waiter


async def open_conn(host: str, port: int, source_ip: str | None) -> HttpConn:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if source_ip:
        sock.bind((source_ip, 0))
    await loop.sock_connect(sock, (host, port))
    _, proto = await loop.create_connection(HttpConn, sock=sock)
    return proto


async def closed_loop(
    host: str,
    port: int,
    requests: Sequence[bytes],
    concurrency: int,
    duration: float,
    source_ips: Sequence[str],
    max_per_conn: int = 0,
) -> dict[str, object]:
    """`concurrency` connections, each sending the next of `requests` (round robin) as soon as
    the previous answer arrived, for `duration` seconds (or `max_per_conn` requests each)."""
    conns = [
        await open_conn(host, port, source_ips[i % len(source_ips)] if source_ips else None)
        for i in range(concurrency)
    ]
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    t0 = time.monotonic()
    stop_at = t0 + duration

    async def loop_one(i: int, conn: HttpConn) -> None:
        n = i
        done = 0
        while time.monotonic() < stop_at and not conn.closed:
            if max_per_conn and done >= max_per_conn:
                return
            done += 1
            raw = requests[n % len(requests)]
            n += concurrency
            start = time.monotonic()
            try:
                status, _ = await asyncio.wait_for(conn.request(raw), 30)
            except Exception as exc:
                errors[type(exc).__name__] += 1
                return
            latencies.append((time.monotonic() - start) * 1000)
            statuses[status] += 1

    await asyncio.gather(*(loop_one(i, c) for i, c in enumerate(conns)))
    elapsed = time.monotonic() - t0
    for c in conns:
        if c.transport is not None:
            c.transport.close()
    return {
        "latencies_ms": latencies,
        "statuses": dict(statuses),
        "errors": dict(errors),
        "elapsed_s": elapsed,
    }
