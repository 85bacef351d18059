"""Feed request parameters and cursors (gateway/http/feeds.py): parsing only, no I/O."""

from __future__ import annotations

import base64

import orjson
import pytest

from core.errors import BadRequest
from fanout.feeds import FEED_DEPTH, FeedCursor
from gateway.http.common import encode_cursor
from gateway.http.feeds import cursor_text, parse_cursor, parse_feed
from storage.ranking import DEFAULT_WINDOW, Feed, FeedKind, Window


def test_feeds_by_name() -> None:
    assert parse_feed("trending", None, None) == Feed(FeedKind.TRENDING, None)
    assert parse_feed("new", "cats_2", None) == Feed(FeedKind.NEW, "cats_2")
    assert parse_feed("top", None, None) == Feed(FeedKind.TOP, None, DEFAULT_WINDOW)
    assert DEFAULT_WINDOW is Window.DAY
    for window in ("day", "week", "all"):
        assert parse_feed("top", "x", window) == Feed(FeedKind.TOP, "x", Window(window))


@pytest.mark.parametrize(
    ("kind", "community", "window"),
    [
        ("hot", None, None),
        ("Trending", None, None),
        ("", None, None),
        ("top", None, "year"),
        ("top", None, "DAY"),
        ("trending", None, "day"),
        ("new", None, "all"),
        ("new", "Cats", None),
        ("new", "a-b", None),
        ("new", "x" * 65, None),
        ("new", "café", None),
    ],
)
def test_bad_feed_requests(kind: str, community: str | None, window: str | None) -> None:
    with pytest.raises(BadRequest) as err:
        parse_feed(kind, community, window)
    assert err.value.status == 400


def test_cursor_round_trip_keeps_the_rank_exact() -> None:
    for rank in (0.0, -3.0, 1234.5678901234567, 1.7e12, 5e-324):
        cursor = FeedCursor("12-1735689600000", 75, rank, 1234567890123456789)
        assert parse_cursor(cursor_text(cursor)) == cursor
    assert parse_cursor(None) is None and parse_cursor("") is None
    assert cursor_text(None) is None


def _raw(parts: object) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(parts)).decode().rstrip("=")


@pytest.mark.parametrize(
    "raw",
    [
        "garbage",
        "!!!",
        _raw({"a": 1}),
        _raw(["12-1735689600000", 1, "1.0"]),
        _raw(["../../other", 1, "1.0", "5"]),  # not a snapshot name: no key injection
        _raw(["12-1735689600000", -1, "1.0", "5"]),
        _raw(["12-1735689600000", FEED_DEPTH + 1, "1.0", "5"]),
        _raw(["12-1735689600000", True, "1.0", "5"]),
        _raw(["12-1735689600000", 1, "nan", "5"]),
        _raw(["12-1735689600000", 1, "inf", "5"]),
        _raw(["12-1735689600000", 1, "one", "5"]),
        _raw(["12-1735689600000", 1, "1.0", "0"]),
        _raw(["12-1735689600000", 1, "1.0", "x"]),
        _raw(["12-1735689600000", 1, "1.0", 5]),
        encode_cursor(1, 2),
    ],
)
def test_tampered_cursors_are_bad_requests(raw: str) -> None:
    with pytest.raises(BadRequest):
        parse_cursor(raw)
