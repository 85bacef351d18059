"""When to reconnect, and how long to wait: docs/protocol.md's close codes as a pure function.

The same rules as the browser client (gateway/static/agora.js: `reconnectDelay`), kept
pure so they are tested without sockets or clocks.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

NORMAL = 1000
GOING_AWAY = 1001
ABNORMAL = 1006  # no close frame: the connection dropped, or the node died
TOO_LARGE = 1009
INTERNAL = 1011
TRY_AGAIN_LATER = 1013
UNAUTHORIZED = 4001
PROTOCOL_ERROR = 4002
RATE_LIMITED = 4008
SLOW_CONSUMER = 4009

# The client must change before coming back (docs/protocol.md: "fix the client"), or the
# server meant it (1000). 4001 waits for a new token instead (see `Backoff.delay`).
FINAL = frozenset({NORMAL, TOO_LARGE, PROTOCOL_ERROR})
# The smallest Retry-After the server sends: a refusal is never retried sooner.
MIN_REFUSAL_DELAY_S = 1.0


@dataclass(frozen=True)
class Backoff:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**attempt))."""

    base_s: float = 0.5
    cap_s: float = 30.0

    def jitter(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        ceiling = min(self.cap_s, self.base_s * (1 << min(attempt, 30)))
        return rand() * ceiling

    def delay(
        self,
        close_code: int | None,
        attempt: int,
        *,
        retry_after_s: float | None = None,
        refused: bool = False,
        rand: Callable[[], float] = random.random,
    ) -> float | None:
        """Seconds to wait before the next attempt; None means do not reconnect (yet).

        `close_code` is None when the handshake itself failed; `refused` when it failed
        with an HTTP refusal (503/429), whose `retry_after_s` is a floor, never shortened.
        """
        if close_code in FINAL or close_code == UNAUTHORIZED:
            return None
        wait = self.jitter(attempt, rand)
        if retry_after_s is not None:
            return max(wait, retry_after_s)
        if refused or close_code in (TRY_AGAIN_LATER, RATE_LIMITED):
            return max(wait, MIN_REFUSAL_DELAY_S)
        return wait
