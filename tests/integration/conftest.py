"""Fixtures the end-to-end modules share. A module that uses `g1`/`g2` defines its own
module-scoped `stack` (its gateways first, in that order)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

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
