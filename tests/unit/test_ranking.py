"""storage.ranking: the feed formulas, feed membership and the shard merge. No I/O."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from storage.ids import EPOCH_MS, MAX_SAFE_ID
from storage.ranking import (
    DAY_MS,
    HOT_DECAY_MS,
    HOT_DECAY_S,
    MEMBER_WIDTH,
    Feed,
    FeedKind,
    Window,
    all_feeds_of_community,
    feeds_of_post,
    hot,
    member,
    member_id,
    merge_ranked,
    position_after,
    rank,
)

NOW = EPOCH_MS + 400 * DAY_MS
counts = st.integers(min_value=0, max_value=10_000_000)
times = st.integers(min_value=EPOCH_MS, max_value=EPOCH_MS + 60 * 365 * DAY_MS)


# -- the hot rank -------------------------------------------------------------------------------


def test_constants_are_reddits() -> None:
    assert HOT_DECAY_S == 45_000
    assert HOT_DECAY_MS == 45_000_000


@pytest.mark.parametrize(
    ("up", "down", "expected"),
    [
        (0, 0, 0.0),
        (1, 0, 0.0),  # log10(1): the first vote only breaks the tie with 0
        (0, 1, 0.0),
        (10, 0, 1.0),
        (0, 10, -1.0),
        (100, 0, 2.0),
        (150, 50, 2.0),
        (50, 150, -2.0),
        (1000, 1, math.log10(999)),
    ],
)
def test_hot_at_the_epoch_is_the_signed_log_of_the_net_score(
    up: int, down: int, expected: float
) -> None:
    assert hot(up, down, EPOCH_MS) == pytest.approx(expected, abs=1e-12)


def test_hot_age_term_is_one_per_45000_seconds() -> None:
    assert hot(0, 0, EPOCH_MS + HOT_DECAY_MS) == 1.0
    assert hot(0, 0, EPOCH_MS + 10 * HOT_DECAY_MS) == 10.0
    assert hot(0, 0, EPOCH_MS + HOT_DECAY_MS // 2) == 0.5
    # Ten times the votes are worth exactly 12.5 hours of youth.
    assert hot(100, 0, EPOCH_MS) == pytest.approx(hot(10, 0, EPOCH_MS + HOT_DECAY_MS))


def test_hot_is_the_documented_formula_exactly() -> None:
    rng = random.Random(1)
    for _ in range(2000):
        up, down = rng.randint(0, 10**6), rng.randint(0, 10**6)
        created = rng.randint(EPOCH_MS, NOW)
        s = up - down
        sign = 1 if s > 0 else -1 if s < 0 else 0
        seconds = (created - EPOCH_MS) / 1000
        expected = sign * math.log10(max(abs(s), 1)) + seconds / 45000
        assert hot(up, down, created) == pytest.approx(expected, rel=1e-15, abs=1e-12)


@given(up=counts, down=counts, created=times)
def test_hot_grows_with_net_votes_and_with_youth(up: int, down: int, created: int) -> None:
    assert hot(up + 1, down, created) >= hot(up, down, created)
    assert hot(up, down + 1, created) <= hot(up, down, created)
    assert hot(up, down, created + 1000) > hot(up, down, created)


@given(up=counts, down=counts, created=times)
def test_hot_is_antisymmetric_in_the_votes(up: int, down: int, created: int) -> None:
    age = (created - EPOCH_MS) / HOT_DECAY_MS
    assert hot(up, down, created) - age == pytest.approx(-(hot(down, up, created) - age))


def test_a_younger_post_needs_fewer_votes() -> None:
    old = hot(1000, 0, NOW - DAY_MS)  # 3 orders of magnitude, a day old
    assert hot(100, 0, NOW) > old  # 24 h = 1.92 orders: 100 votes now beat 1000 yesterday
    assert hot(10, 0, NOW) < old


# -- ranks per feed kind ------------------------------------------------------------------------


def test_rank_per_kind() -> None:
    assert rank(FeedKind.NEW, 5, 1, NOW) == float(NOW)
    assert rank(FeedKind.TOP, 5, 1, NOW) == 4.0
    assert rank(FeedKind.TOP, 1, 5, NOW) == -4.0
    assert rank(FeedKind.TRENDING, 5, 1, NOW) == hot(5, 1, NOW)


def test_new_rank_is_exact_as_a_redis_score() -> None:
    # Redis scores are doubles: ms timestamps stay exact integers for millennia.
    for ms in (EPOCH_MS, NOW, EPOCH_MS + (1 << 41) - 1):
        assert int(rank(FeedKind.NEW, 0, 0, ms)) == ms


# -- feeds and windows --------------------------------------------------------------------------


def test_a_window_belongs_to_top_only() -> None:
    with pytest.raises(ValueError):
        Feed(FeedKind.TOP, None)
    with pytest.raises(ValueError):
        Feed(FeedKind.NEW, None, Window.DAY)
    with pytest.raises(ValueError):
        Feed(FeedKind.TRENDING, "x", Window.ALL)
    assert Feed(FeedKind.TOP, "x", Window.WEEK).window is Window.WEEK


@pytest.mark.parametrize(
    ("window", "age_ms", "inside"),
    [
        (Window.DAY, 0, True),
        (Window.DAY, DAY_MS, True),
        (Window.DAY, DAY_MS + 1, False),
        (Window.WEEK, 7 * DAY_MS, True),
        (Window.WEEK, 7 * DAY_MS + 1, False),
        (Window.ALL, 10_000 * DAY_MS, True),
    ],
)
def test_window_edges(window: Window, age_ms: int, inside: bool) -> None:
    feed = Feed(FeedKind.TOP, None, window)
    assert feed.admits(NOW - age_ms, NOW) is inside


def test_feeds_of_post_by_age() -> None:
    fresh = feeds_of_post("cats", NOW, NOW)
    assert len(fresh) == 10 and len(set(fresh)) == 10
    assert set(fresh) == set(all_feeds_of_community("cats"))
    for scope in (None, "cats"):
        assert Feed(FeedKind.NEW, scope) in fresh
        assert Feed(FeedKind.TRENDING, scope) in fresh
    older = set(feeds_of_post("cats", NOW - 2 * DAY_MS, NOW))
    assert Feed(FeedKind.TOP, "cats", Window.DAY) not in older
    assert Feed(FeedKind.TOP, None, Window.WEEK) in older
    ancient = set(feeds_of_post("cats", NOW - 30 * DAY_MS, NOW))
    assert {f.window for f in ancient if f.kind is FeedKind.TOP} == {Window.ALL}


# -- members, merge, positions ------------------------------------------------------------------


@given(a=st.integers(1, MAX_SAFE_ID), b=st.integers(1, MAX_SAFE_ID))
def test_members_sort_like_their_ids(a: int, b: int) -> None:
    assert len(member(a)) == MEMBER_WIDTH
    assert member_id(member(a)) == a and member_id(member(a).encode()) == a
    assert (member(a) < member(b)) == (a < b)


ranked_lists = st.lists(
    st.tuples(st.floats(-1e6, 1e6, allow_nan=False), st.integers(1, 10**12)),
    max_size=40,
    unique_by=lambda entry: entry[1],
)


@given(parts=st.lists(ranked_lists, max_size=5), limit=st.integers(0, 100))
def test_merge_is_the_top_of_the_union(parts: list[list[tuple[float, int]]], limit: int) -> None:
    seen: set[int] = set()
    shards = []
    for part in parts:  # ids are unique across shards: the shard is inside the id
        part = [entry for entry in part if entry[1] not in seen]
        seen.update(entry[1] for entry in part)
        shards.append(sorted(part, reverse=True))
    union = sorted((entry for part in shards for entry in part), reverse=True)
    assert merge_ranked(shards, limit) == union[:limit]


def test_merge_breaks_rank_ties_by_the_larger_id() -> None:
    assert merge_ranked([[(1.0, 5), (1.0, 2)], [(1.0, 9), (0.0, 7)]], 10) == [
        (1.0, 9),
        (1.0, 5),
        (1.0, 2),
        (0.0, 7),
    ]


@given(entries=ranked_lists, data=st.data())
def test_position_after_resumes_right_after_the_key(
    entries: list[tuple[float, int]], data: st.DataObject
) -> None:
    entries = sorted(entries, reverse=True)
    if entries:  # a read that returned entries[i] last goes on with entries[i + 1]
        i = data.draw(st.integers(0, len(entries) - 1))
        assert position_after(entries, entries[i]) == i + 1
    key = data.draw(st.tuples(st.floats(-1e6, 1e6, allow_nan=False), st.integers(1, 10**12)))
    n = position_after(entries, key)
    assert all(e >= key for e in entries[:n]) and all(e < key for e in entries[n:])
