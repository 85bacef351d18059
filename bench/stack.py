"""The real stack for a benchmark: engines from tests/engines.py, Agora processes like
tests/stack.py, but with the gateway processes pinned to the servers' core.

Affinity is set in the child before exec (`preexec_fn`), so every thread the gateway
starts later inherits it. PostgreSQL, Redis, Tansu and the fan-out workers are left to the
scheduler: they are part of the system under test, not of one process's budget.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench.common import child_pids, proc_cpu_s, proc_rss_kib, proc_sched_s
from core.settings import Settings
from gateway.auth import make_token
from tests.engines import free_port, settings_env, test_engines
from tests.stack import Proc, check_procs, wait_http

LOG_DIR = Path(".agora/bench/logs")
ALL_CPUS = set(range(os.cpu_count() or 1))

# Production-like defaults for the benchmarks (tests/engines.py tunes for fast tests).
BENCH_ENV = {
    "AGORA_HEARTBEAT_MS": "25000",
    "AGORA_LOG_LEVEL": "WARNING",
}


@dataclass
class BenchProc(Proc):
    """tests.stack.Proc (urls, alive, stop, kill) plus what the benchmarks read of it."""

    _worker: int | None = field(default=None, init=False, repr=False)

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

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGORA_")}
        env.update(settings_env(self.settings))
        env.update(BENCH_ENV)
        env.update(self.extra_env)
        return env

    def _spawn(
        self, name: str, args: list[str], port: int | None, cpus: set[int] | None
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
                env=self.env(),
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
        return self._spawn(name, ["fanout"], None, ALL_CPUS)

    def token(self, user: str, ttl: int = 3600) -> str:
        return make_token(self.settings.jwt_secret, user, None, ttl)

    def stop_all(self) -> None:
        for p in self.procs:
            p.stop(30)  # past the drain deadline (15 s by default): a timeout is a bug


@contextlib.contextmanager
def bench_stack(
    gateway_cpus: set[int] | None,
    extra_env: dict[str, str] | None = None,
    experiment: str = "",
) -> Iterator[BenchStack]:
    """Fresh engines (shard databases, Redis prefix, private Tansu) and a stack on them."""
    with test_engines() as (settings, tansu):
        stack = BenchStack(
            settings, gateway_cpus, dict(extra_env or {}), experiment=experiment, broker=tansu
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
