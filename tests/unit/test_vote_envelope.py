"""The votes topic's record: a vote row named by (post, voter), and nothing to count twice."""

from __future__ import annotations

import msgpack
import pytest

from fanout.envelope import VERSION, EnvelopeError, Vote, decode_vote, encode_vote
from storage.posts import VoteChange


def test_a_vote_record_round_trips() -> None:
    for vote in (Vote(1, "alice", 5), Vote(2**62, "ü:ser with:colons", 0), Vote(7, "", 1)):
        assert decode_vote(encode_vote(vote)) == vote


@pytest.mark.parametrize(
    "payload",
    [
        {"v": VERSION, "p": 1, "u": 1, "d": 0, "t": 5},  # a delta of the old format
        {"v": VERSION, "p": 1, "w": 3, "t": 5},  # voter not a string
        {"v": VERSION, "p": "x", "w": "a", "t": 5},
        {"v": VERSION + 1, "p": 1, "w": "a", "t": 5},
    ],
)
def test_records_that_name_no_vote_row_are_refused(payload: dict[str, object]) -> None:
    with pytest.raises(EnvelopeError):
        decode_vote(msgpack.packb(payload))


@pytest.mark.parametrize(
    ("old", "new", "up", "down"),
    [
        (0, 1, 1, 0),
        (1, -1, -1, 1),
        (-1, 0, 0, -1),
        (1, 1, 0, 0),
        (0, 0, 0, 0),
        (-1, 1, 1, -1),
    ],
)
def test_a_change_of_a_row_moves_the_counters_by_its_difference(
    old: int, new: int, up: int, down: int
) -> None:
    change = VoteChange(1, old, new)
    assert (change.up, change.down, change.changed) == (up, down, old != new)
