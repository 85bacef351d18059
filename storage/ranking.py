"""Feed ranking: which feeds exist, what a post's rank is in each, and how shards merge.

Pure functions, no I/O. Every place that ranks a post uses these (the feed rebuild from
PostgreSQL, the scores worker, post creation), so a feed rebuilt from the shards holds
exactly the ranks the incremental updates wrote.

Ranks, always sorted descending, ties broken by the larger id (the newer post):

- `new`:      the post's creation time in ms (from its id).
- `top`:      the net score, up - down; windows `day` and `week` hold only posts created
              within the last 24 h / 7 days, `all` every post.
- `trending`: Reddit's hot rank,

                  sign(s) * log10(max(|s|, 1)) + t / 45000

              with s = up - down and t = seconds from the id epoch (2024-01-01T00:00:00Z,
              storage/ids.py) to the post's creation. The log makes the first 10 votes
              count as much as the next 90; every 45,000 s (12.5 h) of age is worth one
              order of magnitude of votes, so a post must get ten times the net score of
              one 12.5 h younger to rank beside it. A rank never changes with the clock,
              only with votes, so it can be stored in a sorted set and updated per vote
              batch. The same function is SQL `agora_hot` (storage/migrations/0002).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from storage.ids import EPOCH_MS

HOT_DECAY_S = 45_000  # seconds of age worth one order of magnitude of net score
HOT_DECAY_MS = HOT_DECAY_S * 1000
HOT_EPOCH_MS = EPOCH_MS  # t = 0: the id epoch, so SQL can rank from the id alone
DAY_MS = 86_400_000
# Sorted-set members are ids padded to the widest id: Redis orders equal scores by member
# bytes, which for fixed-width decimal strings is numeric order (the id tie-break).
MEMBER_WIDTH = 19


class FeedKind(StrEnum):
    TRENDING = "trending"
    NEW = "new"
    TOP = "top"


class Window(StrEnum):
    DAY = "day"
    WEEK = "week"
    ALL = "all"

    @property
    def span_ms(self) -> int | None:
        return {Window.DAY: DAY_MS, Window.WEEK: 7 * DAY_MS, Window.ALL: None}[self]


DEFAULT_WINDOW = Window.DAY


@dataclass(frozen=True, slots=True)
class Feed:
    """One ranked list: a kind, a scope (None = every community) and, for top, a window."""

    kind: FeedKind
    community: str | None
    window: Window | None = None

    def __post_init__(self) -> None:
        if (self.kind is FeedKind.TOP) != (self.window is not None):
            raise ValueError("a window belongs to top feeds, and every top feed has one")

    def window_start_ms(self, now_ms: int) -> int | None:
        """Oldest creation time (ms) a post may have to be in this feed now; None: any."""
        span = self.window.span_ms if self.window is not None else None
        return None if span is None else now_ms - span

    def admits(self, created_ms: int, now_ms: int) -> bool:
        start = self.window_start_ms(now_ms)
        return start is None or created_ms >= start


def hot(up: int, down: int, created_ms: int) -> float:
    """Reddit's hot rank (see the module docstring). Equals SQL agora_hot bit for bit: the
    same IEEE operations in the same order (an exact int-to-float division, then log10)."""
    s = up - down
    sign = (s > 0) - (s < 0)
    return sign * math.log10(max(abs(s), 1)) + (created_ms - HOT_EPOCH_MS) / HOT_DECAY_MS


def rank(kind: FeedKind, up: int, down: int, created_ms: int) -> float:
    """A post's rank in a feed of `kind` (higher first)."""
    if kind is FeedKind.NEW:
        return float(created_ms)
    if kind is FeedKind.TOP:
        return float(up - down)
    return hot(up, down, created_ms)


def feeds_of_post(community: str, created_ms: int, now_ms: int) -> list[Feed]:
    """Every feed a live post belongs to now: each kind, globally and in its community."""
    out: list[Feed] = []
    for scope in (None, community):
        out.append(Feed(FeedKind.NEW, scope))
        out.append(Feed(FeedKind.TRENDING, scope))
        for window in Window:
            feed = Feed(FeedKind.TOP, scope, window)
            if feed.admits(created_ms, now_ms):
                out.append(feed)
    return out


def all_feeds_of_community(community: str) -> list[Feed]:
    """Every feed a post of `community` may be in, whatever its age (for removals)."""
    out: list[Feed] = []
    for scope in (None, community):
        out.append(Feed(FeedKind.NEW, scope))
        out.append(Feed(FeedKind.TRENDING, scope))
        out.extend(Feed(FeedKind.TOP, scope, window) for window in Window)
    return out


def member(post_id: int) -> str:
    """The sorted-set member of a post id (fixed width: see MEMBER_WIDTH)."""
    return f"{post_id:0{MEMBER_WIDTH}d}"


def member_id(raw: bytes | str) -> int:
    return int(raw)


Ranked = tuple[float, int]  # (rank, post id); order: descending by both


def merge_ranked(parts: Iterable[Sequence[Ranked]], limit: int) -> list[Ranked]:
    """Merge per-shard lists, each sorted descending by (rank, id), into the top `limit`.

    Post ids are unique across shards (the logical shard is inside the id), so the order is
    total and the result does not depend on which shard answered first.
    """
    merged = heapq.merge(*parts, reverse=True)
    out: list[Ranked] = []
    for item in merged:
        if len(out) >= limit:
            break
        out.append(item)
    return out


def position_after(entries: Sequence[Ranked], key: Ranked) -> int:
    """How many of `entries` (sorted descending) a read that ended at `key` has passed: those
    that rank above it, or tie on rank with an id at least as large (the key itself). Used
    to resume a read in a new snapshot right after the last entry it returned."""
    return sum(1 for entry in entries if entry >= key)
