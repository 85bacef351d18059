"""The real engines for the test session: PostgreSQL, Redis and a private Tansu broker.

PostgreSQL and Redis are reused when reachable (and started, or installed, when not: the
same code as `agora services up`). Each session gets fresh shard databases, its own Redis
database number and key prefix, and its own memory-only Tansu on a free port.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from core.settings import Settings, describe
from devstack import services
from storage.migrate import migrate_all

PG = os.environ.get("AGORA_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
REDIS = os.environ.get("AGORA_TEST_REDIS", "redis://127.0.0.1:6379")
REDIS_DB = 15
STATE_DIR = Path(".agora/test")


_HANDED_OUT: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    """A loopback port nobody listens on, for a server started next. Drawn from below the
    kernel's ephemeral range: a port from `bind(0)` is one the kernel hands out again, to
    the next `bind(0)` or to an outgoing connection, before the server binds it (a rare
    failed start); below the range only another draw can take it, and this process never
    draws one twice."""
    low = _ephemeral_low()
    rng = secrets.SystemRandom()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12_000), low) if low > 2048 else 0
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # taken
            port = s.getsockname()[1]
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError("no free loopback port below the ephemeral range in 200 draws")


def settings_env(settings: Settings) -> dict[str, str]:
    """The AGORA_* environment that rebuilds `settings` in a child process."""
    from dataclasses import fields

    env: dict[str, str] = {}
    for f, (name, _default, _doc) in zip(fields(Settings), describe(), strict=True):
        value = getattr(settings, f.name)
        if isinstance(value, tuple):
            env[name] = ",".join(value)
        elif isinstance(value, bool):
            env[name] = "true" if value else "false"
        else:
            env[name] = str(value)
    return env


@contextmanager
def test_engines(
    redis: str | None = None,
) -> Iterator[tuple[Settings, subprocess.Popen[bytes]]]:
    """`redis`: a Redis URL to use instead of REDIS (a benchmark's own, pinned one)."""
    tag = secrets.token_hex(3)
    dsns = (f"{PG}/agora_test_{tag}_0", f"{PG}/agora_test_{tag}_1")
    kafka_port = free_port()
    settings = Settings.from_env(
        {
            "AGORA_SHARD_DSNS": ",".join(dsns),
            "AGORA_LOGICAL_SHARDS": "4096",
            "AGORA_REDIS_URL": f"{redis or REDIS}/{REDIS_DB}",
            "AGORA_REDIS_PREFIX": f"t{tag}",
            "AGORA_KAFKA_BOOTSTRAP": f"127.0.0.1:{kafka_port}",
            "AGORA_KAFKA_TOPIC_PREFIX": f"t{tag}",
            "AGORA_KAFKA_PARTITIONS": "8",
            "AGORA_KAFKA_IDEMPOTENCE": "false",
            "AGORA_KAFKA_FETCH_WAIT_MS": "20",  # Tansu answers a fetch at its wait's end
            "AGORA_JWT_SECRET": secrets.token_hex(16),
            "AGORA_ROUTE_LEASE_S": "6",
            "AGORA_HEARTBEAT_MS": "5000",
            "AGORA_PG_TIMEOUT_S": "3",
            # Every test process and server shares one PostgreSQL (max_connections 100).
            "AGORA_PG_POOL_MAX": "4",
            # Limits high enough that functional tests never trip them; the tests of the
            # limits themselves start their own nodes with low ones.
            "AGORA_SENDS_PER_S": "100000",
            "AGORA_FRAMES_PER_S": "100000",
            "AGORA_HTTP_PER_S": "100000",
            "AGORA_HANDSHAKES_PER_IP_S": "0",
            # CI shares two cores with everything; the lag guard has its own unit test.
            "AGORA_LOOP_LAG_MS": "5000",
            "AGORA_DRAIN_WINDOW_MS": "500",
            "AGORA_DRAIN_DEADLINE_MS": "1500",
        }
    )
    state = services.Started()
    log: list[str] = []
    for host, port in sorted({services._pg_address(d) for d in dsns}):
        services._ensure_postgres_running(host, port, state, log)
    services._ensure_redis(settings.redis_url, state, STATE_DIR, log)
    asyncio.run(services.ensure_databases(dsns))
    asyncio.run(migrate_all(dsns))
    tansu = services.start_tansu("127.0.0.1", kafka_port, STATE_DIR / f"tansu-{tag}.log")
    try:
        yield settings, tansu
    finally:
        tansu.kill()
        tansu.wait()
        asyncio.run(services.drop_databases(dsns))
