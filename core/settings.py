"""One settings object, built once from `AGORA_*` environment variables at start-up.

No other module reads the environment: composition roots call `Settings.from_env()` and pass
the object down. Every setting is declared once in `SETTINGS` with its default and meaning;
the settings table of docs/operations.md and `.env.example` are checked against that list by a test.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from core.errors import ConfigError

MAX_LOGICAL_SHARDS = 1 << 13  # the id layout has 13 bits for the logical shard
# The secret .env.example ships for the dev stack: published, so never a real one.
EXAMPLE_JWT_SECRET = "dev-only-not-a-secret-change-me-please"
MIN_HS_SECRET_BYTES = 32


def _bool(raw: str) -> bool:
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true/false")


def _int_range(lo: int, hi: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = int(raw.strip())
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi}")
        return value

    return parse


def _csv(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _algorithms(raw: str) -> tuple[str, ...]:
    algs = _csv(raw)
    allowed = {"HS256", "HS384", "HS512", "RS256", "ES256"}
    bad = [a for a in algs if a not in allowed]
    if bad or not algs:
        raise ValueError(f"allowed: {', '.join(sorted(allowed))}")
    return algs


def _origins(raw: str) -> tuple[str, ...]:
    origins = _csv(raw)
    for origin in origins:
        if origin != "*" and not re.fullmatch(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?", origin):
            raise ValueError(f"{origin!r} is not an origin (scheme://host[:port], or *)")
    return origins


def _str(raw: str) -> str:
    return raw


def _stripped(raw: str) -> str:
    return raw.strip()


_LOOPBACK_HTTP = re.compile(r"http://(127\.[0-9.]+|localhost|\[::1\])(:[0-9]{1,5})?(/.*)?")


def _jwks_url(raw: str) -> str:
    """https, or http to this machine: over plain http anyone on the path could serve
    their own key and sign tokens for any user."""
    url = raw.strip()
    if url and not (
        re.fullmatch(r"https://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/\S*)?", url)
        or _LOOPBACK_HTTP.fullmatch(url)
    ):
        raise ValueError("must be an https:// URL (plain http only to a loopback address)")
    return url


def _nonempty(raw: str) -> str:
    if not raw.strip():
        raise ValueError("must not be empty")
    return raw.strip()


def _prefix(raw: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,40}", raw):
        raise ValueError("1-40 chars of [A-Za-z0-9._-]")
    return raw


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise ValueError(f"allowed: {', '.join(allowed)}")
        return value

    return parse


_SCOPE = re.compile(r"^(conv:(\*|[0-9]{1,19})|user:(\*|[A-Za-z0-9_.:-]{1,64}))$")
_SERVICE_NAME = re.compile(r"^[a-z0-9_-]{1,32}$")

ServiceKey = tuple[str, str, tuple[str, ...]]  # (name, sha256 hex of the key, scopes)


def _service_keys(raw: str) -> tuple[ServiceKey, ...]:
    """`name:sha256hex:scope,scope;...`, scopes `conv:<id>`, `conv:*`, `user:<id>`, `user:*`."""
    out: list[ServiceKey] = []
    for entry in (e.strip() for e in raw.split(";")):
        if not entry:
            continue
        name, _, rest = entry.partition(":")
        digest, _, scopes_raw = rest.partition(":")
        scopes = tuple(s.strip() for s in scopes_raw.split(",") if s.strip())
        if not _SERVICE_NAME.match(name):
            raise ValueError(f"service name {name[:40]!r} is not [a-z0-9_-]{{1,32}}")
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ValueError(f"service {name}: the key hash must be 64 lowercase hex digits")
        bad = [s for s in scopes if not _SCOPE.match(s)]
        if bad or not scopes:
            raise ValueError(f"service {name}: scopes must be conv:<id>|conv:*|user:<id>|user:*")
        if any(k[0] == name for k in out):
            raise ValueError(f"service {name} is listed twice")
        out.append((name, digest, scopes))
    return tuple(out)


def _setting(env: str, default: str, parse: Callable[[str], Any], doc: str) -> Any:
    return field(metadata={"env": env, "default": default, "parse": parse, "doc": doc})


@dataclass(frozen=True)
class Settings:
    shard_dsns: tuple[str, ...] = _setting(
        "AGORA_SHARD_DSNS",
        "postgresql://postgres@127.0.0.1:5432/agora_shard0,"
        "postgresql://postgres@127.0.0.1:5432/agora_shard1",
        _csv,
        "Comma-separated DSNs of the physical shard databases, in order (index = physical id).",
    )
    logical_shards: int = _setting(
        "AGORA_LOGICAL_SHARDS",
        "4096",
        _int_range(1, MAX_LOGICAL_SHARDS),
        "Number of logical shards (fixed for the life of the data; at most 8192).",
    )
    shard_map: str = _setting(
        "AGORA_SHARD_MAP",
        "",
        _str,
        "Optional logical-to-physical ranges, e.g. `0-2047=0,2048-4095=1`; "
        "empty means equal contiguous ranges.",
    )
    shard_file: str = _setting(
        "AGORA_SHARD_FILE",
        "",
        _stripped,
        "Optional path of a file of `AGORA_SHARD_DSNS=` and `AGORA_SHARD_MAP=` lines that "
        "take the place of those two settings; running processes re-read it every second "
        "and switch to a changed map without a restart (moving logical shards).",
    )
    pg_pool_max: int = _setting(
        "AGORA_PG_POOL_MAX",
        "10",
        _int_range(1, 500),
        "Max connections per physical shard pool. A gateway (its send path's shard reads) and a"
        " fan-out worker (its batches) each hold one more per shard, of their own.",
    )
    pg_timeout_s: int = _setting(
        "AGORA_PG_TIMEOUT_S",
        "5",
        _int_range(1, 120),
        "Seconds to wait for a shard connection before answering `unavailable`.",
    )
    redis_url: str = _setting(
        "AGORA_REDIS_URL", "redis://127.0.0.1:6379/0", _nonempty, "Redis URL."
    )
    redis_cluster: bool = _setting(
        "AGORA_REDIS_CLUSTER",
        "false",
        _bool,
        "Talk to a Redis Cluster (AGORA_REDIS_URL names any one of its nodes): slot-safe "
        "keys for the send path and sharded pub/sub (SPUBLISH/SSUBSCRIBE) for deliveries.",
    )
    redis_pool_max: int = _setting(
        "AGORA_REDIS_POOL_MAX",
        "64",
        _int_range(1, 10_000),
        "Redis connections per process; callers wait for a free one beyond it. A gateway's "
        "route lease has 2 more of its own, which requests never hold.",
    )
    pipeline_sends: bool = _setting(
        "AGORA_PIPELINE_SENDS",
        "false",
        _bool,
        "Handle a connection's plain sends concurrently (produced in the order sent, acks "
        "matched by rid) instead of one request at a time. Off by default until it has run "
        "as long as the serial path (bench/RESULTS.md, issue 14).",
    )
    redis_timeout_s: int = _setting(
        "AGORA_REDIS_TIMEOUT_S",
        "5",
        _int_range(3, 120),
        "Seconds a Redis connect or command may take before it fails (`unavailable`); "
        "pub/sub reads are exempt.",
    )
    redis_prefix: str = _setting(
        "AGORA_REDIS_PREFIX", "agora", _prefix, "Prefix of every Redis key and channel."
    )
    kafka_bootstrap: str = _setting(
        "AGORA_KAFKA_BOOTSTRAP", "127.0.0.1:9092", _nonempty, "Kafka bootstrap servers."
    )
    kafka_topic_prefix: str = _setting(
        "AGORA_KAFKA_TOPIC_PREFIX", "agora", _prefix, "Prefix of the Kafka topic names."
    )
    kafka_partitions: int = _setting(
        "AGORA_KAFKA_PARTITIONS",
        "8",
        _int_range(1, 1024),
        "Partitions of each topic when Agora creates it.",
    )
    kafka_idempotence: bool = _setting(
        "AGORA_KAFKA_IDEMPOTENCE",
        "true",
        _bool,
        "Use Kafka's idempotent producer. Tansu 0.6 (dev/tests) does not implement "
        "InitProducerId, so the dev stack sets false; the (conversation, sender, cid) "
        "unique key still makes producer retries harmless.",
    )
    kafka_produce_line: bool = _setting(
        "AGORA_KAFKA_PRODUCE_LINE",
        "true",
        _bool,
        "Produce the send path's messages through the gateway's own produce line "
        "(gateway/produceline.py: Produce v3, acks=all, one request in flight per broker) "
        "instead of aiokafka's producer: about half the gateway CPU per message. Its "
        "records are not idempotent at the broker whatever AGORA_KAFKA_IDEMPOTENCE says: "
        "a retry may append a second copy, which the (conversation, sender, cid) unique "
        "key stores once. Any failure hands the records to aiokafka in order. Plaintext "
        "only: with TLS or SASL the send path keeps aiokafka. false: always aiokafka.",
    )
    kafka_fetch_wait_ms: int = _setting(
        "AGORA_KAFKA_FETCH_WAIT_MS",
        "500",
        _int_range(1, 10000),
        "Longest a worker's fetch waits at the broker for records. Apache Kafka answers "
        "as soon as a record arrives, so a long wait costs no latency and spares idle "
        "fetches; Tansu 0.6 (dev/tests) answers only when the wait ends, so the dev stack "
        "sets 20 (a record waits ~10 ms for its fetch).",
    )
    jwt_algorithms: tuple[str, ...] = _setting(
        "AGORA_JWT_ALGORITHMS",
        "HS256",
        _algorithms,
        "Accepted JWT algorithms (HS256/384/512, RS256, ES256). `none` is never accepted.",
    )
    jwt_secret: str = _setting(
        "AGORA_JWT_SECRET", "", _str, "HMAC secret for HS* tokens. Required for HS*."
    )
    jwt_public_key: str = _setting(
        "AGORA_JWT_PUBLIC_KEY",
        "",
        _str,
        "PEM public key for RS256/ES256 tokens (or AGORA_JWT_JWKS_URL, not both).",
    )
    jwt_jwks_url: str = _setting(
        "AGORA_JWT_JWKS_URL",
        "",
        _jwks_url,
        "JWKS endpoint (https; http only on loopback) whose keys verify RS256/ES256 tokens, "
        "chosen by the token's `kid`. Keys are fetched off the event loop; a key that "
        "disappears from the set stops verifying at the next fetch.",
    )
    jwt_jwks_lifespan_s: int = _setting(
        "AGORA_JWT_JWKS_LIFESPAN_S",
        "300",
        _int_range(5, 86_400),
        "Age after which the JWKS is fetched again (in the background; the old keys verify "
        "meanwhile and stay in use while the endpoint is down).",
    )
    jwt_jwks_min_refetch_s: int = _setting(
        "AGORA_JWT_JWKS_MIN_REFETCH_S",
        "30",
        _int_range(1, 3600),
        "At most one JWKS fetch per this many seconds per process, whatever triggers it "
        "(a token with an unknown `kid`, an expired set, a failed fetch): a flood of bogus "
        "`kid`s cannot make the gateway hammer the endpoint. A new key is seen at most this "
        "long after its first token arrives.",
    )
    jwt_audience: str = _setting(
        "AGORA_JWT_AUDIENCE",
        "",
        _stripped,
        "When set, a token must carry this `aud` (or a list holding it); empty: `aud` is "
        "not checked.",
    )
    jwt_issuer: str = _setting(
        "AGORA_JWT_ISSUER",
        "",
        _stripped,
        "When set, a token's `iss` must be exactly this; empty: `iss` is not checked.",
    )
    jwt_leeway_s: int = _setting(
        "AGORA_JWT_LEEWAY_S",
        "5",
        _int_range(0, 300),
        "Clock skew allowed on a token's `exp`: a token is accepted until exp plus this, "
        "and a WebSocket session whose token ran out is closed (4001) then, unless the "
        "client sent a newer one (`auth`).",
    )
    node_id: str = _setting(
        "AGORA_NODE_ID",
        "",
        _str,
        "Gateway node id; empty means generated per process (each worker is its own node).",
    )
    heartbeat_ms: int = _setting(
        "AGORA_HEARTBEAT_MS",
        "25000",
        _int_range(1000, 600_000),
        "Server WebSocket ping interval; a connection silent for two intervals is closed.",
    )
    max_frame_bytes: int = _setting(
        "AGORA_MAX_FRAME_BYTES",
        "65536",
        _int_range(1024, 16 * 1024 * 1024),
        "Largest client frame accepted; larger frames close with 1009.",
    )
    request_head_timeout_s: int = _setting(
        "AGORA_REQUEST_HEAD_TIMEOUT_S",
        "10",
        _int_range(1, 300),
        "Seconds an HTTP request's head (request line and headers, upgrades included) may "
        "take to arrive from the connection or its first byte; slower clients get 408.",
    )
    max_fragments: int = _setting(
        "AGORA_MAX_FRAGMENTS",
        "32",
        _int_range(1, 100_000),
        "Most WebSocket frames one client message may be split into (continuation "
        "fragments); a message in more closes with 1009.",
    )
    replay_limit: int = _setting(
        "AGORA_REPLAY_LIMIT",
        "1000",
        _int_range(1000, 100_000),
        "Most missed messages replayed over the socket on `sub` with `since`.",
    )
    route_lease_s: int = _setting(
        "AGORA_ROUTE_LEASE_S",
        "15",
        _int_range(2, 3600),
        "Lease of a gateway node's routing registration in Redis; renewed at a third of it.",
    )
    outbound_max_frames: int = _setting(
        "AGORA_OUTBOUND_MAX_FRAMES",
        "2000",
        _int_range(10, 1_000_000),
        "Frames queued for one connection before it is closed as a slow consumer (4009).",
    )
    outbound_max_bytes: int = _setting(
        "AGORA_OUTBOUND_MAX_BYTES",
        "4194304",
        _int_range(65536, 1 << 30),
        "Bytes queued for one connection before it is closed as a slow consumer (4009).",
    )
    max_connections: int = _setting(
        "AGORA_MAX_CONNECTIONS",
        "50000",
        _int_range(1, 10_000_000),
        "Connections per gateway process; above it new upgrades get 503 + Retry-After.",
    )
    max_connections_per_user: int = _setting(
        "AGORA_MAX_CONNECTIONS_PER_USER",
        "20",
        _int_range(0, 100_000),
        "WebSocket sessions one user may hold across the cluster; one more is closed with "
        "4008 right after `hello`. 0 disables.",
    )
    fanout_batch_max: int = _setting(
        "AGORA_FANOUT_BATCH_MAX",
        "2000",
        _int_range(1, 100_000),
        "Most records a fan-out worker takes from Kafka per batch.",
    )
    worker_commit_interval_ms: int = _setting(
        "AGORA_WORKER_COMMIT_INTERVAL_MS",
        "500",
        _int_range(0, 60_000),
        "Shortest time between two offset commits of a fan-out or scores worker. Commits "
        "go out in the background, one at a time, never past an unfinished record; a "
        "worker that dies redelivers at most this much, which the sequencer recognises "
        "(0: commit after every batch, still in the background). Each commit costs the "
        "worker about a third of a batch's CPU.",
    )
    worker_retry_max_ms: int = _setting(
        "AGORA_WORKER_RETRY_MAX_MS",
        "5000",
        _int_range(100, 600_000),
        "Longest wait between retries of the records a fan-out or scores worker holds "
        "(their shard, Redis or the dead-letter topic failing transiently); waits start at "
        "100 ms and double per failure, per shard.",
    )
    worker_restart_max_ms: int = _setting(
        "AGORA_WORKER_RESTART_MAX_MS",
        "30000",
        _int_range(100, 600_000),
        "Longest wait before `agora fanout`/`agora scores` restarts a worker process that "
        "exited unexpectedly; waits start at 500 ms and double while it keeps exiting "
        "within a minute of its start.",
    )
    socket_send_buffer: int = _setting(
        "AGORA_SOCKET_SEND_BUFFER",
        "0",
        _int_range(0, 64 * 1024 * 1024),
        "SO_SNDBUF of client sockets in bytes (0: kernel autotuning). A small value bounds "
        "kernel memory per connection and makes slow readers felt sooner.",
    )
    max_handshakes: int = _setting(
        "AGORA_MAX_HANDSHAKES",
        "256",
        _int_range(1, 100_000),
        "WebSocket handshakes in progress per gateway process; above it upgrades get 503.",
    )
    loop_lag_ms: int = _setting(
        "AGORA_LOOP_LAG_MS",
        "500",
        _int_range(10, 60_000),
        "Event-loop lag above which a gateway refuses new upgrades (503) until it recovers.",
    )
    handshakes_per_ip_s: int = _setting(
        "AGORA_HANDSHAKES_PER_IP_S",
        "50",
        _int_range(0, 1_000_000),
        "WebSocket handshakes per second per client IP (burst 4x); 0 disables. "
        "Over it: HTTP 429 with Retry-After.",
    )
    frames_per_s: int = _setting(
        "AGORA_FRAMES_PER_S",
        "50",
        _int_range(0, 1_000_000),
        "Client frames per second per connection (burst 2x); 0 disables.",
    )
    sends_per_s: int = _setting(
        "AGORA_SENDS_PER_S",
        "20",
        _int_range(0, 1_000_000),
        "Messages per user per second across the cluster, counted exactly in Redis by the "
        "send path's own round trip (a node-local bucket with burst 2x refuses floods "
        "before Redis); 0 disables.",
    )
    idempotency_window_s: int = _setting(
        "AGORA_IDEMPOTENCY_WINDOW_S",
        "300",
        _int_range(1, 7 * 24 * 3600),
        "How long Redis keeps a sent `cid`'s record (its message id) after the answer: sized "
        "for client retries, it bounds Redis to about rate x window records. A retry within "
        "it is answered from Redis; a later one from the shard's (conversation, sender, cid) "
        "key, with the same id (one indexed read on the shard).",
    )
    http_per_s: int = _setting(
        "AGORA_HTTP_PER_S",
        "50",
        _int_range(0, 1_000_000),
        "Authenticated HTTP requests per second per user across the cluster (burst 2x); "
        "0 disables. Over it: 429 with Retry-After.",
    )
    receipts_max_members: int = _setting(
        "AGORA_RECEIPTS_MAX_MEMBERS",
        "32",
        _int_range(0, 1000),
        "Read receipts (a `receipt` frame to every member when one reads further, and "
        "`GET /v1/conversations/{id}/receipts`) for direct conversations and groups of at "
        "most this many members; 0 turns them off. Read pointers and `unread` are kept "
        "for every size.",
    )
    presence_grace_s: int = _setting(
        "AGORA_PRESENCE_GRACE_S",
        "15",
        _int_range(1, 3600),
        "A user is offline this long after their last connection closed (on any gateway), "
        "so reconnects and drains do not flap; also how often a gateway sweeps the users "
        "of gateways that died.",
    )
    presence_max_members: int = _setting(
        "AGORA_PRESENCE_MAX_MEMBERS",
        "100",
        _int_range(0, 1000),
        "`presence` frames go to the subscribers of the direct conversations and groups "
        "of at most this many members a user is in (bigger rooms: `GET .../presence`); 0 "
        "turns the frames off.",
    )
    service_keys: tuple[ServiceKey, ...] = _setting(
        "AGORA_SERVICE_KEYS",
        "",
        _service_keys,
        "Backend services allowed to publish (`POST /v1/publish/...`), as "
        "`name:sha256hex:scope,scope` entries separated by `;`. The hash is the SHA-256 of "
        "the key the service sends (`Authorization: ApiKey <key>`; make one with "
        "`python -m gateway.servicekeys NAME`); scopes are `conv:<id>`, `conv:*`, "
        "`user:<id>`, `user:*`. Empty: no publish API.",
    )
    service_sends_per_s: int = _setting(
        "AGORA_SERVICE_SENDS_PER_S",
        "200",
        _int_range(0, 1_000_000),
        "Messages per second each service may publish, per gateway (burst 2x); 0 disables.",
    )
    feed_page_cache_ms: int = _setting(
        "AGORA_FEED_PAGE_CACHE_MS",
        "1000",
        _int_range(0, 60_000),
        "Longest a gateway serves a feed's cached first page (each read still checks the "
        "feed's stamp in Redis, so votes, posts and deletions show at once; this bounds how "
        "old a post's comment count on it can be); 0 turns the cache off.",
    )
    vote_sweep_s: int = _setting(
        "AGORA_VOTE_SWEEP_S",
        "10",
        _int_range(1, 3600),
        "Every this many seconds one gateway (a Redis lock picks it) re-produces the votes "
        "stored but not counted for longer than this (a record the broker lost or never "
        "acknowledged), at most 1000 per shard per sweep.",
    )
    drain_window_ms: int = _setting(
        "AGORA_DRAIN_WINDOW_MS",
        "10000",
        _int_range(0, 600_000),
        "On SIGTERM, clients get `reconnect` with after_ms spread over this window.",
    )
    drain_deadline_ms: int = _setting(
        "AGORA_DRAIN_DEADLINE_MS",
        "15000",
        _int_range(0, 600_000),
        "On SIGTERM, connections still open after this are closed with 1001.",
    )
    ops_token: str = _setting(
        "AGORA_OPS_TOKEN",
        "",
        _str,
        "Bearer token that lets an operator's probe read `/readyz` from another host; "
        "without it `/readyz` answers only loopback peers (others get 404).",
    )
    dev_tokens: bool = _setting(
        "AGORA_DEV_TOKENS",
        "false",
        _bool,
        "Dev mode: serve the dev-only token endpoint (anyone who reaches it can be anyone) "
        "and accept a weak or example `AGORA_JWT_SECRET`. A gateway refuses to start with "
        "it on a non-loopback address. Never enable in production.",
    )
    log_level: str = _setting("AGORA_LOG_LEVEL", "INFO", _nonempty, "Python logging level.")
    log_format: str = _setting(
        "AGORA_LOG_FORMAT",
        "json",
        _choice("json", "text"),
        "`json`: one JSON object per line with node, role and connection ids (for log "
        "shippers); `text`: the same fields on a readable line.",
    )
    metrics_port: int = _setting(
        "AGORA_METRICS_PORT",
        "0",
        _int_range(0, 65535),
        "Port of `GET /metrics` on fan-out and scores worker processes (worker i of "
        "`--workers N` uses port+i); 0 turns it off. Gateways serve /metrics on their own port.",
    )
    metrics_host: str = _setting(
        "AGORA_METRICS_HOST",
        "127.0.0.1",
        _nonempty,
        "Address the workers' `GET /metrics` binds to: loopback unless a scraper on another "
        "host needs it (`0.0.0.0`, as docker-compose.yml sets inside its network).",
    )
    cors_origins: tuple[str, ...] = _setting(
        "AGORA_CORS_ORIGINS",
        "",
        _origins,
        "Comma-separated origins (`https://app.example`) whose browser pages may call the "
        "HTTP API (CORS); `*` allows any. Empty (the default): no CORS headers, only "
        "same-origin pages. The WebSocket does not use CORS.",
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Build settings from `env` (default: the process environment).

        Raises ConfigError naming the first setting whose value does not parse.
        """
        source: Mapping[str, str] = os.environ if env is None else env
        shard_file = source.get("AGORA_SHARD_FILE", "").strip()
        if shard_file:
            source = {**source, **read_shard_file(shard_file)}
        settings = cls(**cls._parsed(source))
        settings._check()
        return settings

    @classmethod
    def _parsed(
        cls, source: Mapping[str, str], only: Iterable[str] | None = None
    ) -> dict[str, Any]:
        """Field name -> parsed value of every setting (or of those named in `only`), from
        `source` or the default; ConfigError naming the first that does not parse."""
        wanted = None if only is None else set(only)
        values: dict[str, Any] = {}
        for f in fields(cls):
            meta = f.metadata
            if wanted is not None and meta["env"] not in wanted:
                continue
            raw = source.get(meta["env"], meta["default"])
            try:
                values[f.name] = meta["parse"](raw)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"{meta['env']}={raw!r} is invalid: {exc}") from None
        return values

    def _check(self) -> None:
        # JWT keys are checked where tokens are verified (gateway.auth), so that
        # `agora migrate` and the workers do not need them.
        if not self.shard_dsns:
            raise ConfigError("AGORA_SHARD_DSNS must name at least one database")
        # The shard map against the databases (every logical shard covered once) is
        # checked by its owner, storage.shards.ShardMap.from_settings, which every
        # process runs at start (gateway/cli.py; ShardPools): core imports no layer.

    def with_shard_file(self) -> Settings:
        """These settings with AGORA_SHARD_FILE read again (a running process's reload);
        ConfigError when it cannot be read or does not parse."""
        if not self.shard_file:
            return self
        found = read_shard_file(self.shard_file)
        settings = self.with_overrides(**self._parsed(found, found))
        settings._check()
        return settings

    def with_overrides(self, **changes: Any) -> Settings:
        """A copy with some fields replaced (tests and CLI flags)."""
        from dataclasses import replace

        return replace(self, **changes)


SHARD_FILE_KEYS = ("AGORA_SHARD_DSNS", "AGORA_SHARD_MAP")


def read_shard_file(path: str) -> dict[str, str]:
    """The settings an AGORA_SHARD_FILE holds: `KEY=VALUE` lines of AGORA_SHARD_DSNS and
    AGORA_SHARD_MAP (both required, so a file cut short by a writer is refused rather than
    read as "equal ranges"), blank lines and `#` comments. ConfigError for anything else."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(f"AGORA_SHARD_FILE={path!r} cannot be read: {exc.strerror}") from None
    found: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or key not in SHARD_FILE_KEYS:
            raise ConfigError(
                f"AGORA_SHARD_FILE {path}, line {n}: want AGORA_SHARD_DSNS=... or "
                f"AGORA_SHARD_MAP=..., not {line[:60]!r}"
            )
        if key in found:
            raise ConfigError(f"AGORA_SHARD_FILE {path}, line {n}: {key} given twice")
        found[key] = value.strip()
    missing = [k for k in SHARD_FILE_KEYS if k not in found]
    if missing:
        raise ConfigError(f"AGORA_SHARD_FILE {path} has no {missing[0]} line")
    return found


def environ_with(overrides: Mapping[str, str]) -> dict[str, str]:
    """This process's environment with some values replaced: for a child process that
    needs different settings (the one place besides `from_env` that reads os.environ)."""
    env = dict(os.environ)
    env.update(overrides)
    return env


def describe() -> list[tuple[str, str, str]]:
    """(env name, default, meaning) for every setting, in declaration order."""
    return [(f.metadata["env"], f.metadata["default"], f.metadata["doc"]) for f in fields(Settings)]
