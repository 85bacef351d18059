"""The real stack for a benchmark: engines from tests/engines.py, Agora processes like
tests/stack.py, but with the gateway processes pinned to the servers' core.

Affinity is set in the child before exec (`preexec_fn`), so every thread the gateway
starts later inherits it. PostgreSQL, Redis, Tansu and the fan-out workers are left to the
scheduler: they are part of the system under test, not of one process's budget. With
`server_cpus` (the fan-out bench's `--pin-server-core`), the whole server side but
PostgreSQL goes onto those cores: the gateways, the fan-out workers, the private Tansu (every
thread it has) and a private Redis started for the run; PostgreSQL (shared by the sessions
on this machine, so not ours to pin) stays unpinned and its CPU is read apart
(`BenchStack.postgres_pid`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench.common import (
    child_pids,
    metric_samples,
    pin_threads,
    proc_cpu_s,
    proc_rss_kib,
    proc_sched_s,
    sample_value,
)
from core.settings import Settings
from gateway.auth import make_token
from tests.engines import STATE_DIR as ENGINE_STATE_DIR
from tests.engines import free_port, settings_env, test_engines
from tests.stack import Proc, check_procs, wait_http

LOG_DIR = Path(".agora/bench/logs")
ALL_CPUS = set(range(os.cpu_count() or 1))

# Production-like defaults for the benchmarks (tests/engines.py tunes for fast tests).
BENCH_ENV = {
    "AGORA_HEARTBEAT_MS": "25000",
    "AGORA_LOG_LEVEL": "WARNING",
}


CONSUMER_COUNTERS = (
    "agora_consumer_batches_total",
    "agora_consumer_records_total",
    "agora_consumer_commits_total",
    "agora_consumer_batch_seconds_sum",
)


@dataclass
class BenchProc(Proc):
    """tests.stack.Proc (urls, alive, stop, kill) plus what the benchmarks read of it."""

    _worker: int | None = field(default=None, init=False, repr=False)
    metrics_port: int = 0  # a worker's /metrics (0: none)

    def consumer_counts(self) -> dict[str, float]:
        """A worker's consumer counters (batches, records, commits, batch seconds), summed
        over labels; empty when it serves no /metrics."""
        if not self.metrics_port:
            return {}
        out: dict[str, float] = {}
        for line in metric_samples(f"http://127.0.0.1:{self.metrics_port}/metrics") or ():
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name in CONSUMER_COUNTERS:
                out[name] = out.get(name, 0.0) + sample_value(line)
        return out

    @property
    def pid(self) -> int:
        """The process doing the work. `agora fanout`/`agora scores` are supervisors that
        run their worker in a child (fanout/supervisor.py): measuring or profiling the
        supervisor would read an idle process, so for them this is the child."""
        if self._worker is None or not os.path.exists(f"/proc/{self._worker}"):
            kids = child_pids(self.popen.pid)
            self._worker = kids[0] if kids else None
        return self._worker or self.popen.pid

    def rss_kib(self) -> int:
        return proc_rss_kib(self.pid)

    def cpu_s(self) -> float:
        return proc_cpu_s(self.pid)

    def sched_s(self) -> tuple[float, float]:
        """(on-CPU s, runnable-but-waiting s): the second is starvation by neighbours."""
        return proc_sched_s(self.pid)


def _affinity(cpus: set[int] | None) -> Callable[[], None] | None:
    if not cpus:
        return None

    def apply() -> None:
        os.sched_setaffinity(0, cpus)

    return apply


@dataclass
class BenchStack:
    settings: Settings
    gateway_cpus: set[int] | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    procs: list[BenchProc] = field(default_factory=list)
    experiment: str = ""  # bench.experiment patches applied to every Agora process
    broker: subprocess.Popen[bytes] | None = None  # the private Tansu (its PID is measured)
    # Where the fan-out workers run: the scheduler's choice, or the servers' core(s).
    worker_cpus: set[int] | None = None
    redis: subprocess.Popen[bytes] | None = None  # a private Redis (pinned mode only)
    postgres_pid: int = 0  # the postmaster of the shards' PostgreSQL (0: not found)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGORA_")}
        env.update(settings_env(self.settings))
        env.update(BENCH_ENV)
        env.update(self.extra_env)
        return env

    def _spawn(
        self,
        name: str,
        args: list[str],
        port: int | None,
        cpus: set[int] | None,
        env: dict[str, str] | None = None,
    ) -> BenchProc:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        path = LOG_DIR / f"{name}.log"
        launcher = ["-m", "gateway.cli"]
        if self.experiment:
            launcher = ["-m", "bench.experiment", self.experiment, "--"]
        with open(path, "ab") as log:  # the child keeps its own descriptor
            start = log.tell()
            popen = subprocess.Popen(
                [sys.executable, *launcher, *args],
                env={**self.env(), **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_affinity(cpus),
            )
        proc = BenchProc(name, popen, port, log_path=path, log_start=start)
        self.procs.append(proc)
        return proc

    def gateway(self, name: str) -> BenchProc:
        port = free_port()
        proc = self._spawn(name, ["gateway", "--port", str(port)], port, self.gateway_cpus)
        wait_http(f"{proc.http_url}/healthz", proc, 60)
        return proc

    def fanout(self, name: str) -> BenchProc:
        """A fan-out worker; its /metrics (batches, records, commits) on `metrics_port`."""
        port = free_port()
        env = {"AGORA_METRICS_PORT": str(port)}
        proc = self._spawn(name, ["fanout"], None, self.worker_cpus or ALL_CPUS, env)
        proc.metrics_port = port
        return proc

    def token(self, user: str, ttl: int = 3600) -> str:
        return make_token(self.settings.jwt_secret, user, None, ttl)

    def stop_all(self) -> None:
        for p in self.procs:
            p.stop(30)  # past the drain deadline (15 s by default): a timeout is a bug


@contextlib.contextmanager
def private_redis(cpus: set[int] | None) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A Redis of our own (no persistence, like the shared one), on `cpus`; its URL."""
    port = free_port()
    ENGINE_STATE_DIR.mkdir(parents=True, exist_ok=True)
    log_path = LOG_DIR / f"redis-{port}.log"
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [
                *("redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", ""),
                *("--appendonly", "no", "--dir", str(ENGINE_STATE_DIR.resolve())),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_affinity(cpus),
        )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                subprocess.run(
                    ["redis-cli", "-p", str(port), "ping"], check=True, capture_output=True
                )
                break
            except subprocess.CalledProcessError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"redis did not start; see {log_path}") from None
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}", proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _data_directory(dsn: str) -> str:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        return str(await conn.fetchval("SELECT current_setting('data_directory')"))
    finally:
        await conn.close()


def _postmaster(dsn: str) -> int:
    """The PID of the PostgreSQL serving `dsn` (its first line of postmaster.pid)."""
    try:
        data_dir = asyncio.run(_data_directory(dsn))
        return int(Path(data_dir, "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


@contextlib.contextmanager
def bench_stack(
    gateway_cpus: set[int] | None,
    extra_env: dict[str, str] | None = None,
    experiment: str = "",
    server_cpus: set[int] | None = None,
) -> Iterator[BenchStack]:
    """Fresh engines (shard databases, Redis prefix, private Tansu) and a stack on them.
    With `server_cpus`: a private Redis and the broker pinned there, the workers too."""
    with contextlib.ExitStack() as engines:
        redis = None
        redis_url: str | None = None
        if server_cpus:
            redis_url, redis = engines.enter_context(private_redis(server_cpus))
        settings, tansu = engines.enter_context(test_engines(redis_url))
        if server_cpus:
            pin_threads(tansu.pid, server_cpus)
        stack = BenchStack(
            settings,
            server_cpus or gateway_cpus,
            dict(extra_env or {}),
            experiment=experiment,
            broker=tansu,
            worker_cpus=server_cpus,
            redis=redis,
            postgres_pid=_postmaster(settings.shard_dsns[0]),
        )
        try:
            yield stack
        finally:
            stack.stop_all()
        # Like tests/stack.py: a process that crashed or logged an unhandled error makes
        # the run fail (CI's smoke runs of the benchmarks included), not a quiet number.
        report = check_procs(list(stack.procs))
        if report:
            raise RuntimeError(report)


def http_json(
    method: str, url: str, token: str, body: dict[str, Any] | None = None, timeout: float = 30
) -> tuple[int, Any]:
    """One blocking HTTP call with a JSON body; (status, parsed body or None)."""
    data = orjson.dumps(body) if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            return resp.status, orjson.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            return exc.code, raw.decode(errors="replace")


def unique_tag() -> str:
    return secrets.token_hex(3)
