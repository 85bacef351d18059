"""A real Redis Cluster for tests: 3 masters and 3 replicas of Debian's redis-server on
loopback ports, made with `redis-cli --cluster create`, stopped by PID afterwards."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from devstack.services import port_open

NODES = 6
BUS_OFFSET = 10000  # Redis Cluster's bus port is the client port + 10000


def unavailable_reason() -> str | None:
    for tool in ("redis-server", "redis-cli"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    return None


def _free_ports(count: int) -> list[int]:
    """`count` ports whose bus ports (+10000) are free too."""
    ports: list[int] = []
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port + BUS_OFFSET < 65536 and port not in ports and not port_open("127.0.0.1", port):
            with contextlib.suppress(OSError), socket.socket() as bus:
                bus.bind(("127.0.0.1", port + BUS_OFFSET))
                ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError("no free port pairs for a Redis Cluster")


@dataclass
class RedisClusterProcs:
    ports: list[int]
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}"

    def cli(self, port: int, *args: str) -> str:
        out = subprocess.run(
            ["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=30
        )
        return out.stdout

    def masters(self) -> list[int]:
        lines = self.cli(self.ports[0], "cluster", "nodes").splitlines()
        return sorted(
            int(line.split()[1].split("@")[0].rsplit(":", 1)[1])
            for line in lines
            if "master" in line.split()[2] and "fail" not in line.split()[2]
        )

    def kill(self, port: int) -> None:
        proc = self.procs[port]
        proc.kill()
        proc.wait(10)


@contextlib.contextmanager
def redis_cluster(state_dir: Path) -> Iterator[RedisClusterProcs]:
    ports = _free_ports(NODES)
    rc = RedisClusterProcs(ports)
    try:
        for port in ports:
            data = (state_dir / f"redis-cluster-{port}").resolve()  # redis chdirs to it
            data.mkdir(parents=True, exist_ok=True)
            log = open(data / "redis.log", "ab")  # noqa: SIM115 - owned by the child
            argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1"]
            argv += ["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"]
            argv += ["--cluster-config-file", str(data / "nodes.conf")]
            rc.procs[port] = subprocess.Popen(
                [*argv, "--save", "", "--appendonly", "no", "--dir", str(data)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 15
        while not all(port_open("127.0.0.1", p) for p in ports):
            if time.monotonic() > deadline:
                raise RuntimeError("redis cluster nodes did not start")
            time.sleep(0.05)
        nodes = [f"127.0.0.1:{p}" for p in ports]
        create = subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *nodes,
                "--cluster-replicas",
                "1",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if create.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create: {create.stdout}{create.stderr}")
        deadline = time.monotonic() + 30
        while "cluster_state:ok" not in rc.cli(ports[0], "cluster", "info"):
            if time.monotonic() > deadline:
                raise RuntimeError("redis cluster did not reach cluster_state:ok")
            time.sleep(0.1)
        yield rc
    finally:
        for proc in rc.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        for port in ports:
            shutil.rmtree(state_dir / f"redis-cluster-{port}", ignore_errors=True)
