"""64-bit time-ordered ids with the logical shard inside (Instagram's layout).

    | 41 bits: ms since EPOCH_MS | 13 bits: logical shard | 10 bits: sequence |

An id alone tells which logical shard holds its row, and ids sort by creation time.
Pure: the clock is injected, so tests can step it backwards.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import NamedTuple

EPOCH_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z; fixed forever, ids depend on it
TIME_BITS = 41
SHARD_BITS = 13
SEQ_BITS = 10
SHARD_MASK = (1 << SHARD_BITS) - 1
SEQ_MASK = (1 << SEQ_BITS) - 1
MAX_ID = (1 << (TIME_BITS + SHARD_BITS + SEQ_BITS)) - 1
MAX_SAFE_ID = (1 << 63) - 1  # PostgreSQL bigint


class IdParts(NamedTuple):
    ms: int  # Unix ms
    shard: int
    seq: int


def compose(unix_ms: int, shard: int, seq: int) -> int:
    """Pack the parts into an id. Raises ValueError on out-of-range parts."""
    rel = unix_ms - EPOCH_MS
    if not 0 <= rel < (1 << TIME_BITS):
        raise ValueError(f"time {unix_ms} is outside the id range")
    if not 0 <= shard <= SHARD_MASK:
        raise ValueError(f"shard {shard} is outside 0..{SHARD_MASK}")
    if not 0 <= seq <= SEQ_MASK:
        raise ValueError(f"sequence {seq} is outside 0..{SEQ_MASK}")
    return (rel << (SHARD_BITS + SEQ_BITS)) | (shard << SEQ_BITS) | seq


def decompose(id_: int) -> IdParts:
    return IdParts(
        ms=(id_ >> (SHARD_BITS + SEQ_BITS)) + EPOCH_MS,
        shard=(id_ >> SEQ_BITS) & SHARD_MASK,
        seq=id_ & SEQ_MASK,
    )


def shard_of_id(id_: int) -> int:
    """The logical shard carried by an id."""
    return (id_ >> SEQ_BITS) & SHARD_MASK


def is_valid_id(id_: int) -> bool:
    return 0 < id_ <= MAX_SAFE_ID


def parse_id(text: str) -> int | None:
    """A decimal-string id from the wire, or None when it is not a valid id."""
    # isascii: str.isdigit() also accepts "²" (int() then raises) and "١٢٣" (int() says 123).
    if not isinstance(text, str) or not text.isascii() or not text.isdigit() or len(text) > 19:
        return None
    value = int(text)
    return value if is_valid_id(value) else None


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class IdGenerator:
    """Monotonic id source for one process.

    A clock that steps backwards never yields a duplicate or a smaller id: the generator
    keeps its own notion of "now" (the largest ms it has used) and, when the sequence of a
    millisecond runs out, borrows the next millisecond instead of waiting.

    Ids from two processes for the same logical shard can coincide in the same ms; rows
    created with local ids use a primary key and retry on conflict, and message ids come
    from a cluster-wide per-shard counter instead (see gateway.send).
    """

    def __init__(self, clock: Callable[[], int] = now_ms) -> None:
        self._clock = clock
        self._last_ms = 0
        self._seq = 0
        self._lock = threading.Lock()

    def next_id(self, shard: int) -> int:
        with self._lock:
            ms = self._clock()
            if ms > self._last_ms:
                self._last_ms = ms
                self._seq = 0
            else:
                self._seq += 1
                if self._seq > SEQ_MASK:
                    self._last_ms += 1
                    self._seq = 0
            return compose(self._last_ms, shard, self._seq)
