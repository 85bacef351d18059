"""Which offsets a worker commits: past what it took, never past what it still holds; and
aiokafka's ERROR records of the commit failures it handles, lowered to WARNING."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Iterator

import aiokafka.consumer.group_coordinator as group_coordinator
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from core.settings import Settings
from fanout.consumer import (
    COORDINATOR_LOGGER,
    HANDLED_COMMIT_FAILURES,
    Committer,
    HandledCommitFailures,
    Worker,
    commit_offsets,
    lower_handled_commit_failures,
    run_consumer_process,
)

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


@pytest.fixture
def lowered() -> Iterator[logging.Logger]:
    """aiokafka's coordinator logger with the filter installed (twice: once is kept), and
    without it again after the test."""
    logger = logging.getLogger(COORDINATOR_LOGGER)
    lower_handled_commit_failures()
    lower_handled_commit_failures()
    added = [f for f in logger.filters if isinstance(f, HandledCommitFailures)]
    assert len(added) == 1
    yield logger
    logger.removeFilter(added[0])


def _error_messages(source: str, prefix: str) -> set[str]:
    """The format strings of the `log.error(...)` calls in `source` that start with
    `prefix` (adjacent literals are one constant once parsed)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "error"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and node.args[0].value.startswith(prefix)
        ):
            found.add(node.args[0].value)
    return found


def test_the_lowered_messages_are_the_installed_aiokafkas_commit_errors() -> None:
    # Matched by their exact format strings: if an aiokafka upgrade rewords one, or logs
    # a new commit failure at ERROR, this says so instead of the filter quietly missing it.
    errors = _error_messages(inspect.getsource(group_coordinator), "OffsetCommit failed")
    assert errors - HANDLED_COMMIT_FAILURES == {
        "OffsetCommit failed for group %s - %s",  # group authorization: stays ERROR
        "OffsetCommit failed for unauthorized topics %s",  # topic authorization: stays
        # Only before a rebalance with auto-commit, which no consumer of Agora's enables.
        "OffsetCommit failed before join, ignoring: %s",
    }
    assert errors >= HANDLED_COMMIT_FAILURES


def test_handled_commit_failures_are_warnings_and_other_errors_stay(
    lowered: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=COORDINATOR_LOGGER)
    tp = TopicPartition("t.messages", 3)
    # As aiokafka logs them (group_coordinator._do_commit_offsets).
    lowered.error(
        "OffsetCommit failed for group %s due to group error (%s), will rejoin",
        "g",
        "[Error 25] UnknownMemberIdError: g",
    )
    lowered.error(
        "OffsetCommit failed for group %s on partition %s with offset %s: %s",
        "g",
        tp,
        7,
        "UnknownTopicOrPartitionError",
    )
    lowered.error("OffsetCommit failed for group %s - %s", "g", "GroupAuthorizationFailedError")
    lowered.error("Heartbeat failed: %r", "x")
    lowered.error({"not": "a string"})  # a message of any type passes untouched
    lowered.info("OffsetCommit failed for group %s on partition %s with offset %s: %s", 1, 2, 3, 4)
    got = [(r.levelname, r.levelno, r.getMessage()) for r in caplog.records]
    assert got == [
        (
            "WARNING",
            logging.WARNING,
            "OffsetCommit failed for group g due to group error "
            "([Error 25] UnknownMemberIdError: g), will rejoin",
        ),
        (
            "WARNING",
            logging.WARNING,
            f"OffsetCommit failed for group g on partition {tp} with offset 7: "
            "UnknownTopicOrPartitionError",
        ),
        ("ERROR", logging.ERROR, "OffsetCommit failed for group g - GroupAuthorizationFailedError"),
        ("ERROR", logging.ERROR, "Heartbeat failed: 'x'"),
        ("ERROR", logging.ERROR, "{'not': 'a string'}"),
        ("INFO", logging.INFO, "OffsetCommit failed for group 1 on partition 2 with offset 3: 4"),
    ]


def test_the_filter_is_on_the_coordinators_logger_only(
    lowered: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    # The same text from another aiokafka logger is not a commit failure of ours.
    caplog.set_level(logging.INFO)
    logging.getLogger("aiokafka").error(
        "OffsetCommit failed for group %s on partition %s with offset %s: %s", 1, 2, 3, 4
    )
    assert [r.levelname for r in caplog.records] == ["ERROR"]


async def test_a_worker_process_lowers_them_before_it_reaches_the_broker() -> None:
    # The composition root of both workers installs the filter first thing: here it waits
    # for a broker that never answers, with the filter already in place.
    logger = logging.getLogger(COORDINATOR_LOGGER)
    before = list(logger.filters)
    for f in before:
        logger.removeFilter(f)
    settings = Settings.from_env(
        {"AGORA_JWT_SECRET": "x" * 32, "AGORA_KAFKA_BOOTSTRAP": "127.0.0.1:9"}
    )

    def never(*_: object) -> Worker:
        raise AssertionError("no broker, so no worker")

    task = asyncio.create_task(run_consumer_process(settings, "t.messages", "g", never, "t"))
    try:
        deadline = time.monotonic() + 10
        while not any(isinstance(f, HandledCommitFailures) for f in logger.filters):
            assert not task.done() and time.monotonic() < deadline, "no filter installed"
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for f in list(logger.filters):
            logger.removeFilter(f)
        for f in before:
            logger.addFilter(f)
