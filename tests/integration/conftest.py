"""Fixtures the end-to-end modules share. A module that uses `g1`/`g2` defines its own
module-scoped `stack` (its gateways first, in that order)."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from tests.faults import OwnRedis
from tests.stack import Proc, Stack


@pytest.fixture(scope="module")
def g1(stack: Stack) -> Proc:
    """The stack's first gateway."""
    return stack.procs[0]


@pytest.fixture(scope="module")
def g2(stack: Stack) -> Proc:
    """The stack's second gateway."""
    return stack.procs[1]


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=20) as client:
        yield client


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    """A Redis of the test's own (to stop, kill or restart), gone after it."""
    redis = OwnRedis()
    redis.start()
    try:
        yield redis
    finally:
        if redis.proc is not None:
            redis.proc.send_signal(signal.SIGCONT)  # a test that failed while it was stopped
        redis.kill()
