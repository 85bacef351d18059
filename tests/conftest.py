from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import settings as hypothesis_settings

from storage.ids import IdGenerator
from storage.pools import ShardPools
from storage.settings import Settings
from tests.engines import test_engines

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
