"""fanout.kafka.creation_errors: aiokafka answers CreateTopics with an error code per topic
instead of raising, so ensure_topics reads them (pure: the answer's `topic_errors`)."""

from __future__ import annotations

from fanout.kafka import creation_errors


def test_created_and_already_existing_topics_are_no_error() -> None:
    answer = [
        ("p.messages", 0, None),
        ("p.votes", 36, "Topic with this name already exists."),  # another process won
    ]
    assert creation_errors(answer) == []


def test_any_other_code_is_an_error_with_its_message() -> None:
    answer = [
        ("p.messages", 0, None),
        ("p.votes", 38, "Replication factor must be larger than 0."),
        ("p.messages.dlq", 37, None),  # v0 answers have no message
        ("p.votes.dlq", 17),
    ]
    assert creation_errors(answer) == [
        "p.votes: error 38 (Replication factor must be larger than 0.)",
        "p.messages.dlq: error 37 (no message)",
        "p.votes.dlq: error 17 (no message)",
    ]
