"""core.settings: one Settings object from AGORA_* variables, failing loudly on bad ones."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from core.errors import ConfigError
from core.settings import MAX_LOGICAL_SHARDS, Settings, describe

ROOT = Path(__file__).resolve().parents[2]
OPERATIONS = ROOT / "docs" / "operations.md"
ENV_EXAMPLE = ROOT / ".env.example"


def test_defaults() -> None:
    s = Settings.from_env({})
    assert s.shard_dsns == (
        "postgresql://postgres@127.0.0.1:5432/agora_shard0",
        "postgresql://postgres@127.0.0.1:5432/agora_shard1",
    )
    assert s.logical_shards == 4096
    assert s.shard_map == ""
    assert s.pg_pool_max == 10
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.kafka_bootstrap == "127.0.0.1:9092"
    assert s.kafka_partitions == 8
    assert s.kafka_idempotence is True
    assert s.kafka_produce_line is True
    assert s.jwt_algorithms == ("HS256",)
    assert s.dev_tokens is False
    assert s.heartbeat_ms == 25_000


def test_every_default_parses_to_the_field_value() -> None:
    s = Settings.from_env({})
    for f, (env, default, _doc) in zip(fields(Settings), describe(), strict=True):
        assert f.metadata["env"] == env
        assert getattr(s, f.name) == f.metadata["parse"](default), env


def test_describe_lists_each_setting_once_with_a_meaning() -> None:
    rows = describe()
    names = [name for name, _, _ in rows]
    assert len(rows) == len(fields(Settings))
    assert len(set(names)) == len(names)
    for name, default, doc in rows:
        assert re.fullmatch(r"AGORA_[A-Z0-9_]+", name), name
        assert isinstance(default, str)
        assert doc.strip(), name


def test_from_env_reads_only_the_mapping_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGORA_LOGICAL_SHARDS", "abc")
    assert Settings.from_env({}).logical_shards == 4096
    with pytest.raises(ConfigError, match="AGORA_LOGICAL_SHARDS"):
        Settings.from_env()


def test_from_env_parses_values() -> None:
    s = Settings.from_env(
        {
            "AGORA_SHARD_DSNS": " postgresql://a/x , postgresql://b/y ,,postgresql://c/z",
            "AGORA_LOGICAL_SHARDS": " 12 ",
            "AGORA_SHARD_MAP": "0-5=2,6-11=0",
            "AGORA_KAFKA_IDEMPOTENCE": "off",
            "AGORA_KAFKA_PRODUCE_LINE": "false",
            "AGORA_DEV_TOKENS": "YES",
            "AGORA_JWT_ALGORITHMS": "HS512, RS256",
            "AGORA_REDIS_PREFIX": "t.a-b_c",
            "AGORA_KAFKA_FETCH_WAIT_MS": " 20 ",
        }
    )
    assert s.shard_dsns == ("postgresql://a/x", "postgresql://b/y", "postgresql://c/z")
    assert s.logical_shards == 12
    assert s.shard_map == "0-5=2,6-11=0"
    assert s.kafka_idempotence is False
    assert s.kafka_produce_line is False
    assert s.dev_tokens is True
    assert s.jwt_algorithms == ("HS512", "RS256")
    assert s.redis_prefix == "t.a-b_c"
    assert s.kafka_fetch_wait_ms == 20


def test_bounds_are_inclusive() -> None:
    one = "postgresql://a/x"
    assert (
        Settings.from_env({"AGORA_LOGICAL_SHARDS": "1", "AGORA_SHARD_DSNS": one}).logical_shards
        == 1
    )
    top = Settings.from_env({"AGORA_LOGICAL_SHARDS": str(MAX_LOGICAL_SHARDS)})
    assert top.logical_shards == MAX_LOGICAL_SHARDS == 8192


BAD_VALUES = [
    ("AGORA_LOGICAL_SHARDS", "0"),
    ("AGORA_LOGICAL_SHARDS", "-1"),
    ("AGORA_LOGICAL_SHARDS", "9000"),
    ("AGORA_LOGICAL_SHARDS", "8193"),
    ("AGORA_LOGICAL_SHARDS", "abc"),
    ("AGORA_LOGICAL_SHARDS", ""),
    ("AGORA_LOGICAL_SHARDS", "4096.0"),
    ("AGORA_KAFKA_IDEMPOTENCE", "maybe"),
    ("AGORA_KAFKA_PRODUCE_LINE", "sometimes"),
    ("AGORA_KAFKA_FETCH_WAIT_MS", "0"),
    ("AGORA_KAFKA_FETCH_WAIT_MS", "10001"),
    ("AGORA_REDIS_CLUSTER", "sometimes"),
    ("AGORA_PIPELINE_SENDS", "maybe"),
    ("AGORA_KAFKA_IDEMPOTENCE", ""),
    ("AGORA_DEV_TOKENS", "2"),
    ("AGORA_JWT_ALGORITHMS", "none"),
    ("AGORA_JWT_ALGORITHMS", "HS256,none"),
    ("AGORA_JWT_ALGORITHMS", "hs256"),
    ("AGORA_JWT_ALGORITHMS", ""),
    ("AGORA_JWT_ALGORITHMS", " , "),
    ("AGORA_SHARD_DSNS", ""),
    ("AGORA_SHARD_DSNS", " , ,"),
    ("AGORA_SHARD_FILE", "/nonexistent/agora-shards"),
    ("AGORA_PG_POOL_MAX", "0"),
    ("AGORA_PG_TIMEOUT_S", "121"),
    ("AGORA_REDIS_URL", "  "),
    ("AGORA_REDIS_PREFIX", "has space"),
    ("AGORA_REDIS_PREFIX", ""),
    ("AGORA_REDIS_PREFIX", "x" * 41),
    ("AGORA_KAFKA_BOOTSTRAP", ""),
    ("AGORA_KAFKA_TOPIC_PREFIX", "a/b"),
    ("AGORA_KAFKA_PARTITIONS", "0"),
    ("AGORA_HEARTBEAT_MS", "999"),
    ("AGORA_MAX_FRAME_BYTES", "1023"),
    ("AGORA_MAX_FRAGMENTS", "0"),
    ("AGORA_JWT_LEEWAY_S", "-1"),
    ("AGORA_JWT_JWKS_URL", "http://idp.example/jwks"),
    ("AGORA_JWT_JWKS_LIFESPAN_S", "4"),
    ("AGORA_JWT_JWKS_MIN_REFETCH_S", "0"),
    ("AGORA_REDIS_TIMEOUT_S", "1"),
    ("AGORA_REQUEST_HEAD_TIMEOUT_S", "0"),
    ("AGORA_MAX_CONNECTIONS_PER_USER", "-1"),
    ("AGORA_REPLAY_LIMIT", "999"),
    ("AGORA_ROUTE_LEASE_S", "1"),
    ("AGORA_OUTBOUND_MAX_FRAMES", "9"),
    ("AGORA_OUTBOUND_MAX_BYTES", "65535"),
    ("AGORA_MAX_CONNECTIONS", "0"),
    ("AGORA_FANOUT_BATCH_MAX", "100001"),
    ("AGORA_WORKER_COMMIT_INTERVAL_MS", "60001"),
    ("AGORA_WORKER_RETRY_MAX_MS", "99"),
    ("AGORA_WORKER_RESTART_MAX_MS", "600001"),
    ("AGORA_LOG_LEVEL", ""),
    ("AGORA_LOG_FORMAT", "xml"),
    ("AGORA_METRICS_PORT", "65536"),
    ("AGORA_METRICS_PORT", "-1"),
    ("AGORA_METRICS_HOST", " "),
    ("AGORA_CORS_ORIGINS", "app.example"),
    ("AGORA_CORS_ORIGINS", "https://app.example/path"),
    ("AGORA_CORS_ORIGINS", "https://ok.example,ftp://files.example"),
    ("AGORA_MAX_HANDSHAKES", "0"),
    ("AGORA_LOOP_LAG_MS", "5"),
    ("AGORA_HANDSHAKES_PER_IP_S", "-1"),
    ("AGORA_FRAMES_PER_S", "x"),
    ("AGORA_SENDS_PER_S", "-5"),
    ("AGORA_HTTP_PER_S", "1e3"),
    ("AGORA_IDEMPOTENCY_WINDOW_S", "0"),
    ("AGORA_RECEIPTS_MAX_MEMBERS", "1001"),
    ("AGORA_SERVICE_KEYS", "bot:abc:conv:*"),
    ("AGORA_SERVICE_SENDS_PER_S", "-1"),
    ("AGORA_PRESENCE_GRACE_S", "0"),
    ("AGORA_PRESENCE_MAX_MEMBERS", "1001"),
    ("AGORA_DRAIN_WINDOW_MS", "-1"),
    ("AGORA_DRAIN_DEADLINE_MS", "600001"),
    ("AGORA_SOCKET_SEND_BUFFER", "-1"),
    ("AGORA_REDIS_POOL_MAX", "0"),
    ("AGORA_FEED_PAGE_CACHE_MS", "-1"),
    ("AGORA_FEED_PAGE_CACHE_MS", "60001"),
    ("AGORA_FEED_PAGE_CACHE_MS", "0.5"),
    ("AGORA_VOTE_SWEEP_S", "0"),
    ("AGORA_VOTE_SWEEP_S", "3601"),
    ("AGORA_VOTE_SWEEP_S", "1.5"),
]


@pytest.mark.parametrize(("env", "value"), BAD_VALUES)
def test_bad_value_raises_config_error_naming_the_setting(env: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        Settings.from_env({env: value})
    assert env in str(err.value)


def test_every_setting_has_a_bad_value_case() -> None:
    # Keeps the table above honest as settings are added: each one that can be wrong is
    # listed (free-form strings are the only exception).
    free_form = {
        "AGORA_SHARD_MAP",
        "AGORA_JWT_SECRET",
        "AGORA_JWT_PUBLIC_KEY",
        "AGORA_JWT_AUDIENCE",
        "AGORA_JWT_ISSUER",
        "AGORA_NODE_ID",
        "AGORA_OPS_TOKEN",
    }
    covered = {env for env, _ in BAD_VALUES} | free_form
    assert {name for name, _, _ in describe()} <= covered


def test_with_overrides_replaces_only_what_is_named() -> None:
    s = Settings.from_env({})
    t = s.with_overrides(logical_shards=64, redis_prefix="other")
    assert (t.logical_shards, t.redis_prefix) == (64, "other")
    assert (s.logical_shards, s.redis_prefix) == (4096, "agora")
    assert t.shard_dsns == s.shard_dsns


def test_settings_are_immutable() -> None:
    s = Settings.from_env({})
    with pytest.raises(AttributeError):
        s.logical_shards = 1  # type: ignore[misc]


@pytest.mark.parametrize("path", [OPERATIONS, ENV_EXAMPLE], ids=lambda p: p.name)
def test_docs_mention_every_setting(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    missing = [name for name, _, _ in describe() if not re.search(rf"\b{name}\b", text)]
    assert not missing, f"{path.name} does not mention {missing}"


def test_cors_origins_and_metrics_host() -> None:
    defaults = Settings.from_env({})
    assert defaults.cors_origins == ()  # CORS off unless configured
    assert defaults.metrics_host == "127.0.0.1"  # worker metrics not exposed by default
    s = Settings.from_env({"AGORA_CORS_ORIGINS": "https://app.example, http://localhost:5173,*"})
    assert s.cors_origins == ("https://app.example", "http://localhost:5173", "*")


async def test_the_workers_consumer_waits_as_long_as_the_setting_says() -> None:
    # Production (Apache Kafka, whose long poll answers when a record arrives) keeps the
    # long default; the dev stack and the tests ask Tansu for a short one.
    from fanout.kafka import make_consumer

    assert Settings.from_env({}).kafka_fetch_wait_ms == 500
    for wait in (20, 500):
        settings = Settings.from_env({"AGORA_KAFKA_FETCH_WAIT_MS": str(wait)})
        consumer = make_consumer(settings, "t.messages", "t.fanout")
        assert consumer._fetch_max_wait_ms == wait  # what its fetcher is built with
