"""Token buckets and the abuse policy, without I/O (the clock is passed in).

A bucket holds up to `burst` tokens and refills at `rate` per second; taking a token that
is not there is a refusal, with the time until one is back (`retry_after_ms`).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenBucket:
    rate: float  # tokens per second; 0 or less disables the limit
    burst: float
    tokens: float = -1.0
    stamp: float = 0.0

    def take(self, now: float, n: float = 1.0) -> int:
        """0 if allowed, else the ms to wait before `n` tokens are available."""
        if self.rate <= 0:
            return 0
        if self.tokens < 0:  # first use: start full
            self.tokens, self.stamp = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= n:
            self.tokens -= n
            return 0
        return max(1, int((n - self.tokens) / self.rate * 1000))

    def spend(self, now: float, n: int) -> tuple[int, int]:
        """Take a token for each of `n` events, as many as there are: (how many found
        none, ms until the next token). Unlike `take`, a batch is not all-or-nothing: a
        burst of frames read at once is allowed up to the budget and refused beyond it."""
        if self.rate <= 0:
            return 0, 0
        if self.tokens < 0:
            self.tokens, self.stamp = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        covered = min(n, int(self.tokens))
        self.tokens -= covered
        refused = n - covered
        if not refused:
            return 0, 0
        return refused, max(1, int((1 - self.tokens) / self.rate * 1000))


@dataclass
class AbusePolicy:
    """Refusals are answered with `err rate_limited`; a connection refused more than
    `max_refusals` times within `window_s` is abusing and is closed (4008)."""

    max_refusals: int = 20
    window_s: float = 10.0
    _times: list[float] = field(default_factory=list)

    def refused(self, now: float, count: int = 1) -> bool:
        """Record `count` refusals; True when the connection should now be closed."""
        self._times = [t for t in self._times if now - t < self.window_s]
        self._times.extend([now] * min(count, self.max_refusals + 1))
        return len(self._times) > self.max_refusals


class BucketMap:
    """Buckets by key (IP, user), bounded: idle full buckets are dropped first."""

    def __init__(self, rate: float, burst: float, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: dict[str, TokenBucket] = {}

    def take(self, key: str, now: float, n: float = 1.0) -> int:
        if self.rate <= 0:
            return 0
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._evict(now)
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst)
        return bucket.take(now, n)

    def drain(self, key: str, now: float) -> None:
        """Empty `key`'s bucket: it refills from zero (used when the cluster says the
        user is over the limit, so a blocked spell does not bank tokens for later)."""
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket.tokens, bucket.stamp = 0.0, now

    def _evict(self, now: float) -> None:
        # A bucket that would be full again by now carries no state worth keeping.
        refill = self.burst / self.rate
        self._buckets = {k: b for k, b in self._buckets.items() if now - b.stamp < refill}
        if len(self._buckets) >= self.max_keys:
            self._buckets.clear()

    def __len__(self) -> int:
        return len(self._buckets)
