"""Admission control: refuse new WebSocket upgrades before doing any work for them.

A node refuses (and counts why) when it is draining, cut off from Redis, at its connection
limit, has too many handshakes in progress, or its event loop lags; it answers 429 to an
IP opening connections too fast. Existing connections are never touched by any of this.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass

from core.settings import Settings
from gateway.limits import BucketMap

LAG_PROBE_S = 0.1


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int  # 503 or 429
    retry_after_s: int
    reason: str


class Admission:
    def __init__(self, settings: Settings) -> None:
        self.max_connections = settings.max_connections
        self.max_handshakes = settings.max_handshakes
        self.max_lag_ms = settings.loop_lag_ms
        self.per_ip = BucketMap(settings.handshakes_per_ip_s, 4 * settings.handshakes_per_ip_s)
        self.handshakes = 0
        self.lag_ms = 0.0
        self.refused: Counter[str] = Counter()

    def check(
        self, connections: int, draining: bool, ip: str, cut_off: bool = False
    ) -> Refusal | None:
        refusal = self._check(connections, draining, ip, cut_off)
        if refusal is not None:
            self.refused[refusal.reason] += 1
        return refusal

    def _check(self, connections: int, draining: bool, ip: str, cut_off: bool) -> Refusal | None:
        if draining:
            return Refusal(503, 1, "draining")
        if cut_off:
            return Refusal(503, 2, "redis unreachable")
        if connections + self.handshakes >= self.max_connections:
            return Refusal(503, 5, "connection limit")
        if self.handshakes >= self.max_handshakes:
            return Refusal(503, 1, "handshake limit")
        if self.lag_ms > self.max_lag_ms:
            return Refusal(503, 2, "event loop lag")
        wait_ms = self.per_ip.take(ip, time.monotonic())
        if wait_ms:
            return Refusal(429, max(1, -(-wait_ms // 1000)), "per-ip handshake rate")
        return None

    async def watch_lag(self) -> None:
        """Measure how late a short sleep wakes up: the event loop's lag."""
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(LAG_PROBE_S)
            lag = (loop.time() - start - LAG_PROBE_S) * 1000
            # Rise at once, fall gradually, so one quiet probe does not reopen the gate.
            self.lag_ms = max(lag, self.lag_ms * 0.5)
