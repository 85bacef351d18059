"""Which offsets a worker commits: past what it took, never past what it still holds."""

from __future__ import annotations

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from fanout.consumer import Committer, commit_offsets

A, B, C = (TopicPartition("t", i) for i in range(3))


def test_nothing_held_commits_past_the_last_record() -> None:
    assert commit_offsets({A: 9, B: 4}, []) == {A: 10, B: 5}


def test_a_held_record_stops_its_partition_only() -> None:
    assert commit_offsets({A: 9, B: 4}, [(A, 7), (A, 3)]) == {A: 3, B: 5}


def test_held_records_of_a_partition_without_new_records_keep_it_where_it_was() -> None:
    assert commit_offsets({}, [(C, 12)]) == {C: 12}
    assert commit_offsets({}, []) == {}


async def test_nothing_to_commit_asks_the_broker_nothing(caplog: pytest.LogCaptureFixture) -> None:
    # A consumer never started: any commit request fails (no group, no coordinator), and
    # the committer logs that it failed.
    consumer = AIOKafkaConsumer(bootstrap_servers="127.0.0.1:9", group_id="g")
    commits = Committer(consumer, 0)
    try:
        commits.request({}, [])
        await commits.flush(5)
        assert "commit failed" not in caplog.text and commits.sent == 0
        commits.request({A: 9}, [])
        await commits.flush(5)
        assert "commit failed" in caplog.text
    finally:
        await consumer.stop()
