from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import settings as hypothesis_settings

from core.settings import Settings
from storage.ids import IdGenerator
from storage.pools import ShardPools
from tests.engines import test_engines
from tests.stack import check_procs


def _fail_on_process_problems() -> None:
    report = check_procs()
    if report:
        pytest.fail(report, pytrace=False)


# Crashes and unhandled errors of the Agora processes fail the test (tests/stack.py). One
# check per scope: after each test, then after a module's (and the session's) fixtures
# are torn down, which stops the stacks they own: autouse fixtures are set up first within
# their scope, so they are torn down last.
@pytest.fixture(autouse=True)
def _agora_processes_checked_per_test() -> Iterator[None]:
    yield
    _fail_on_process_problems()


@pytest.fixture(autouse=True, scope="module")
def _agora_processes_checked_per_module() -> Iterator[None]:
    yield
    _fail_on_process_problems()


@pytest.fixture(autouse=True, scope="session")
def _agora_processes_checked_per_session() -> Iterator[None]:
    yield
    _fail_on_process_problems()


# Property tests assert outcomes, never speed: on a loaded 2-core machine hypothesis's
# default 200 ms deadline per example fails them for timing alone.
hypothesis_settings.register_profile("agora", deadline=None)
hypothesis_settings.load_profile("agora")


@pytest.fixture(scope="session")
def engines() -> Iterator[Any]:
    with test_engines() as (settings, tansu):
        yield settings, tansu


@pytest.fixture(scope="session")
def settings(engines: Any) -> Settings:
    s: Settings = engines[0]
    return s


@pytest.fixture(scope="session")
async def pools(settings: Settings) -> AsyncIterator[ShardPools]:
    p = ShardPools(settings)
    yield p
    await p.close()


@pytest.fixture(scope="session")
async def redis_client(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(settings.redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def ids() -> IdGenerator:
    return IdGenerator()
