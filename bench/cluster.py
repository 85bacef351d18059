"""A small Agora cluster on this machine: every host a network namespace on a private bridge.

    python -m bench.cluster up [--gateways 3 --workers 2 --pg-hosts 2 --delay-ms 0.5]
    python -m bench.cluster cleanup          # removes every leftover of a prefix
    with Cluster(Layout(gateways=2)) as c:   # tests and bench/ use this
        c.partition("worker1", "pg2"); ...; c.heal("worker1", "pg2")

Topology (addresses in 10.77.0.0/24 by default; only these, and loopback, are used):

    root namespace --<prefix>-ctl (10.77.0.1, no delay: the harness's own control link)
         |
    <prefix>-net: bridge br0 -- veth -- <prefix>-<host> (eth0 10.77.0.10+i)

Each host runs its role's processes with `ip netns exec`: PostgreSQL clusters made with
initdb (run as the postgres user, one physical shard database each, so each holds its
share of the logical shards), Redis, the Tansu broker, gateways, fan-out and scores
workers, and the load generator's commands. Every link gets `tc netem` delay both ways
when the kernel has sch_netem (`delay_applied` says whether it did). Faults are nftables
rules inside a host's namespace (`partition`, `loss`), undone by `heal`/`clear_loss`.

Teardown is by PID (the processes this module started), then the namespaces and links are
deleted; it runs on exit of the `with`, at interpreter exit (atexit), and `cleanup` removes
whatever a killed run left behind (processes still inside our namespaces, by their PIDs
from `ip netns pids`, then the namespaces and the control link).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

PG_BIN = Path("/usr/lib/postgresql/15/bin")
DEFAULT_PREFIX = "agc"
DEFAULT_SUBNET = "10.77.0"
LOG_DIR = Path(".agora/cluster/logs")
GATEWAY_PORT = 8000
PG_PORT = 5432
REDIS_PORT = 6379
KAFKA_PORT = 9092


class ClusterError(RuntimeError):
    pass


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise ClusterError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def unavailable_reason() -> str | None:
    """Why a namespace cluster cannot be built here, or None when it can."""
    if os.geteuid() != 0:
        return f"network namespaces need root (this runs as uid {os.geteuid()})"
    for tool in ("ip", "tc", "nft", "redis-server"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    if not (PG_BIN / "initdb").exists():
        return f"no PostgreSQL 15 binaries in {PG_BIN}"
    name = f"agcprobe{os.getpid()}"
    probe = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`ip netns add` fails: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def netem_available() -> bool:
    """Whether this kernel has the netem qdisc (some VM kernels are built without it)."""
    name = f"agcnetem{os.getpid()}"
    _run("ip", "netns", "add", name)
    try:
        argv = ["ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "lo", "root"]
        ok = subprocess.run([*argv, "netem", "delay", "1ms"], capture_output=True).returncode == 0
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return ok


def cleanup(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Remove every namespace and link named with `prefix` and stop the processes inside
    those namespaces (ours by construction: nothing else runs in them). Returns what it did."""
    done: list[str] = []
    names = [line.split()[0] for line in _run("ip", "netns", "list").stdout.splitlines() if line]
    ours = [n for n in names if n.startswith(f"{prefix}-")]
    for ns in ours:
        pids = _run("ip", "netns", "pids", ns, check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
                done.append(f"killed pid {pid} in {ns}")
    for ns in ours:
        _run("ip", "netns", "del", ns, check=False)
        done.append(f"deleted netns {ns}")
    if _run("ip", "link", "show", f"{prefix}-ctl", check=False).returncode == 0:
        _run("ip", "link", "del", f"{prefix}-ctl", check=False)
        done.append(f"deleted link {prefix}-ctl")
    return done


@dataclass(frozen=True)
class Layout:
    gateways: int = 3
    workers: int = 2
    pg_hosts: int = 2
    # 0: one Redis host ("redis"); 6: a Redis Cluster of 3 masters + 3 replicas, one
    # redis-server per host ("redis1".."redis6"), Agora with AGORA_REDIS_CLUSTER=true.
    redis_cluster_nodes: int = 0
    delay_ms: float = 0.5
    prefix: str = DEFAULT_PREFIX
    subnet: str = DEFAULT_SUBNET
    logical_shards: int = 4096
    kafka_partitions: int = 8
    # fsync off: the cluster runs on a shared 2-core machine; the faults here are network
    # and process faults, not power loss. (synchronous_commit stays on: without it a
    # killed server loses commits it already confirmed, which is not a fault of Agora's.)
    pg_fsync: bool = False
    # Gateways and workers read their databases and shard map from a file per role
    # (AGORA_SHARD_FILE, `Cluster.write_shard_file`), re-read every second: a shard move
    # switches them without a restart.
    shard_files: bool = False
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Host:
    name: str
    ip: str
    ns: str


@dataclass
class Process:
    name: str
    host: Host
    popen: subprocess.Popen[bytes]
    log: Path
    stop_signal: int = signal.SIGTERM
    checked_to: int = 0  # log offset up to which `Cluster.log_problems` has looked

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 15) -> None:
        if self.alive():
            self.popen.send_signal(self.stop_signal)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(10)


class Cluster:
    """The cluster of `layout`; `up()` (or `with`) builds it, `down()` removes it all."""

    def __init__(self, layout: Layout | None = None) -> None:
        self.layout = layout or Layout()
        self.prefix = self.layout.prefix
        self.hosts: dict[str, Host] = {}
        self.procs: list[Process] = []
        self.expected_exits: set[int] = set()  # PIDs a test stopped or killed on purpose
        self.delay_applied = False
        self.workdir = Path(tempfile.mkdtemp(prefix=f"agora-{self.prefix}-"))
        self.settings_env: dict[str, str] = {}
        # Per role ("gateway", "worker"): settings only that role's processes get.
        self.role_env: dict[str, dict[str, str]] = {"gateway": {}, "worker": {}}
        self._up = False
        self._loss: dict[str, int] = {}

    # -- names -----------------------------------------------------------------------------
    def _host_names(self) -> list[str]:
        lay = self.layout
        names = [f"gw{i + 1}" for i in range(lay.gateways)]
        names += [f"worker{i + 1}" for i in range(lay.workers)]
        names += [f"pg{i + 1}" for i in range(lay.pg_hosts)]
        n = self.layout.redis_cluster_nodes
        redis = [f"redis{i + 1}" for i in range(n)] if n else ["redis"]
        return [*names, *redis, "broker", "loadgen"]

    def ip(self, host: str) -> str:
        return self.hosts[host].ip

    def gateway_urls(self) -> list[str]:
        return [f"ws://{h.ip}:{GATEWAY_PORT}/v1/ws" for h in self.gateways()]

    def gateways(self) -> list[Host]:
        return [h for n, h in self.hosts.items() if n.startswith("gw")]

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> Cluster:
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    def up(self) -> None:
        reason = unavailable_reason()
        if reason:
            raise ClusterError(reason)
        cleanup(self.prefix)  # a previous run killed before its teardown
        routes = _run("ip", "route", "show", f"{self.layout.subnet}.0/24").stdout.strip()
        if routes:
            raise ClusterError(
                f"{self.layout.subnet}.0/24 is already routed ({routes}): another cluster "
                "runs; give this one another Layout.subnet"
            )
        atexit.register(self.down)
        self._up = True
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self._network()
        self._postgres()
        self._redis()
        self._broker()
        self._prepare()
        for gw in self.gateways():
            self.start_gateway(gw.name)
        for name in self.hosts:
            if name.startswith("worker"):
                self.start_worker(name, "fanout")
                self.start_worker(name, "scores")

    def down(self) -> None:
        if not self._up:
            return
        self._up = False
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.stop(10)
        cleanup(self.prefix)
        shutil.rmtree(self.workdir, ignore_errors=True)
        atexit.unregister(self.down)

    # -- the network -----------------------------------------------------------------------
    def _network(self) -> None:
        p, lay = self.prefix, self.layout
        net = f"{p}-net"
        _run("ip", "netns", "add", net)
        self._in(net, "ip", "link", "set", "lo", "up")
        self._in(net, "ip", "link", "add", "br0", "type", "bridge")
        self._in(net, "ip", "link", "set", "br0", "up")
        # The control link: the harness in the root namespace reaches every host.
        _run("ip", "link", "add", f"{p}-ctl", "type", "veth", "peer", "name", f"{p}-ctlb")
        _run("ip", "link", "set", f"{p}-ctlb", "netns", net)
        self._in(net, "ip", "link", "set", f"{p}-ctlb", "master", "br0", "up")
        _run("ip", "addr", "add", f"{lay.subnet}.1/24", "dev", f"{p}-ctl")
        _run("ip", "link", "set", f"{p}-ctl", "up")
        self.delay_applied = lay.delay_ms > 0 and netem_available()
        for name in self._host_names():
            self.add_host(name)

    def add_host(self, name: str) -> Host:
        """A new namespace on the bridge (also after `up`: a host added to a running cluster)."""
        p, lay = self.prefix, self.layout
        i = len(self.hosts)
        ns, net = f"{p}-{name}", f"{p}-net"
        host = Host(name, f"{lay.subnet}.{10 + i}", ns)
        self.hosts[name] = host
        _run("ip", "netns", "add", ns)
        self._in(ns, "ip", "link", "set", "lo", "up")
        outer, inner = f"{p}{i}b", f"{p}{i}h"
        _run("ip", "link", "add", inner, "type", "veth", "peer", "name", outer)
        _run("ip", "link", "set", outer, "netns", net)
        _run("ip", "link", "set", inner, "netns", ns)
        self._in(ns, "ip", "link", "set", inner, "name", "eth0")
        self._in(ns, "ip", "addr", "add", f"{host.ip}/24", "dev", "eth0")
        self._in(ns, "ip", "link", "set", "eth0", "up")
        self._in(net, "ip", "link", "set", outer, "master", "br0", "up")
        if self.delay_applied:
            delay = f"{lay.delay_ms}ms"
            self._in(ns, "tc", "qdisc", "add", "dev", "eth0", "root", "netem", "delay", delay)
            self._in(net, "tc", "qdisc", "add", "dev", outer, "root", "netem", "delay", delay)
        self._nft_base(ns)
        return host

    def _in(self, ns: str, *argv: str) -> subprocess.CompletedProcess[str]:
        return _run("ip", "netns", "exec", ns, *argv)

    def _nft_base(self, ns: str) -> None:
        """A table per host with an (empty) set of cut-off peers and a loss chain."""
        rules = """
table inet agora {
  set cut { type ipv4_addr; }
  chain input { type filter hook input priority 0; policy accept;
    ip saddr @cut drop
  }
  chain output { type filter hook output priority 0; policy accept;
    ip daddr @cut drop
  }
}
"""
        self._nft(ns, rules)

    def _nft(self, ns: str, script: str) -> None:
        proc = subprocess.run(
            ["ip", "netns", "exec", ns, "nft", "-f", "-"],
            input=script,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if proc.returncode != 0:
            raise ClusterError(f"nft in {ns}: {proc.stderr.strip()}")

    # -- faults ----------------------------------------------------------------------------
    def partition(self, a: str, b: str) -> None:
        """Cut every packet between hosts a and b (both ways; rules in a's namespace)."""
        self._nft(self.hosts[a].ns, f"add element inet agora cut {{ {self.ip(b)} }}\n")

    def heal(self, a: str, b: str) -> None:
        self._nft(self.hosts[a].ns, f"delete element inet agora cut {{ {self.ip(b)} }}\n")

    def loss(self, host: str, percent: int) -> None:
        """Drop `percent` % of the packets on host's link, both ways, at random."""
        ns = self.hosts[host].ns
        self.clear_loss(host)
        rules = f"""
table inet agoraloss {{
  chain input {{ type filter hook input priority -1; policy accept;
    iifname "eth0" numgen random mod 100 < {percent} drop
  }}
  chain output {{ type filter hook output priority -1; policy accept;
    oifname "eth0" numgen random mod 100 < {percent} drop
  }}
}}
"""
        self._nft(ns, rules)
        self._loss[host] = percent

    def clear_loss(self, host: str) -> None:
        if self._loss.pop(host, None) is not None:
            self._nft(self.hosts[host].ns, "delete table inet agoraloss\n")

    # -- processes -------------------------------------------------------------------------
    def spawn(
        self,
        host: str,
        name: str,
        argv: list[str],
        env: dict[str, str] | None = None,
        user: str | None = None,
    ) -> Process:
        """Start argv inside host's namespace; its output goes to LOG_DIR/<name>.log."""
        h = self.hosts[host]
        prefix = ["ip", "netns", "exec", h.ns]
        if user:
            prefix += ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups"]
        log_path = LOG_DIR / f"{name}.log"
        start = log_path.stat().st_size if log_path.exists() else 0
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                [*prefix, *argv],
                env=env if env is not None else dict(os.environ),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        proc = Process(name, h, popen, log_path, checked_to=start)
        self.procs.append(proc)
        return proc

    def agora_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGORA_")}
        env.update(self.settings_env)
        env.update(extra or {})
        return env

    def start_gateway(self, host: str, extra: dict[str, str] | None = None) -> Process:
        env = self.agora_env({"AGORA_NODE_ID": host, **self.role_env["gateway"], **(extra or {})})
        argv = [sys.executable, "-m", "gateway.cli", "gateway", "--host", "0.0.0.0"]
        proc = self.spawn(host, host, [*argv, "--port", str(GATEWAY_PORT)], env)
        _wait_http(f"http://{self.ip(host)}:{GATEWAY_PORT}/healthz", proc, 40)
        return proc

    def start_worker(self, host: str, kind: str) -> Process:
        name = f"{host}-{kind}"
        log = LOG_DIR / f"{name}.log"
        offset = log.stat().st_size if log.exists() else 0
        env = self.agora_env(self.role_env["worker"])
        proc = self.spawn(host, name, [sys.executable, "-m", "gateway.cli", kind], env)
        _wait_log(proc, log, offset, b"worker started", 40)
        return proc

    def crashed(self) -> list[str]:
        """Processes that exited without the harness stopping them: each a crash."""
        return [
            f"{p.name} (pid {p.pid}) exited with {p.popen.returncode}"
            for p in self.procs
            if not p.alive() and p.pid not in self.expected_exits
        ]

    def log_problems(self, expected: tuple[str, ...] = ()) -> list[str]:
        """ERROR/CRITICAL lines and tracebacks Agora's processes logged since the last call
        (tests/stack.py's rule), except those matching an `expected` pattern."""
        from tests.stack import bad_log_lines

        patterns = [re.compile(p) for p in expected]
        found: list[str] = []
        for proc in self.procs:
            if "gateway.cli" not in proc.popen.args:  # the engines log in their own ways
                continue
            with open(proc.log, "rb") as f:
                f.seek(proc.checked_to)
                data = f.read()
            end = data.rfind(b"\n") + 1
            proc.checked_to += end
            lines = data[:end].decode(errors="replace").splitlines()
            found += [f"{proc.name}: {bad}" for bad in bad_log_lines(lines, patterns)]
        return found

    def stop(self, proc: Process, kill: bool = False) -> None:
        self.expected_exits.add(proc.pid)
        proc.kill() if kill else proc.stop()

    def kill_host(self, host: str) -> None:
        """SIGKILL every process in host's namespace (a host crash: PostgreSQL's backends
        die with its postmaster), by their PIDs."""
        for proc in self.procs:
            if proc.host.name == host:
                self.expected_exits.add(proc.pid)
        pids = _run("ip", "netns", "pids", self.hosts[host].ns, check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        for proc in self.procs:
            if proc.host.name == host and proc.alive():
                proc.popen.wait(10)

    def find(self, name: str) -> Process:
        live = [p for p in self.procs if p.name == name and p.alive()]
        if not live:
            raise ClusterError(f"no live process {name}")
        return live[-1]

    # -- engines ---------------------------------------------------------------------------
    def pg_hosts(self) -> list[Host]:
        return [h for n, h in self.hosts.items() if n.startswith("pg")]

    def _postgres(self) -> None:
        for host in self.pg_hosts():
            self.init_postgres(host.name)

    def init_postgres(self, name: str) -> Process:
        """initdb a PostgreSQL cluster on host `name` (as the postgres user) and start it."""
        host = self.hosts[name]
        data = self.workdir / name
        data.mkdir()
        shutil.chown(self.workdir, "postgres")
        shutil.chown(data, "postgres", "postgres")
        os.chmod(self.workdir, 0o755)
        _run(
            "setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups",
            str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres",
            "--auth=trust", "-E", "UTF8", "--no-sync",
        )  # fmt: skip
        conf = {
            "listen_addresses": f"'{host.ip}'",
            "port": str(PG_PORT),
            "unix_socket_directories": f"'{data}'",
            "max_connections": "200",
            "fsync": "on" if self.layout.pg_fsync else "off",
            "full_page_writes": "on" if self.layout.pg_fsync else "off",
            "shared_buffers": "64MB",
            "wal_level": "logical",  # a shard move copies with logical replication
        }
        with open(data / "postgresql.conf", "a") as f:
            f.writelines(f"{k} = {v}\n" for k, v in conf.items())
        with open(data / "pg_hba.conf", "a") as f:
            f.write(f"host all all {self.layout.subnet}.0/24 trust\n")
        return self.start_postgres(name)

    def start_postgres(self, host: str) -> Process:
        data = self.workdir / host
        argv = [str(PG_BIN / "postgres"), "-D", str(data)]
        proc = self.spawn(host, f"{host}-postgres", argv, {"LANG": "C"}, user="postgres")
        proc.stop_signal = signal.SIGINT  # fast shutdown (SIGTERM waits for every client)
        _wait_port(self.ip(host), PG_PORT, proc, 30)
        return proc

    def redis_hosts(self) -> list[str]:
        return [n for n in self.hosts if n == "redis" or n.startswith("redis")]

    def _redis(self) -> None:
        for host in self.redis_hosts():
            self.start_redis(host)
        if self.layout.redis_cluster_nodes:
            nodes = [f"{self.ip(h)}:{REDIS_PORT}" for h in self.redis_hosts()]
            _run("redis-cli", "--cluster", "create", *nodes, "--cluster-replicas", "1",
                 "--cluster-yes")  # fmt: skip
            deadline = time.monotonic() + 30
            while not all("cluster_state:ok" in self.redis_cli(h, "cluster", "info")
                          for h in self.redis_hosts()):  # fmt: skip
                if time.monotonic() > deadline:
                    raise ClusterError("the Redis Cluster did not reach cluster_state:ok")
                time.sleep(0.2)

    def redis_cli(self, host: str, *args: str) -> str:
        return _run("redis-cli", "-h", self.ip(host), "-p", str(REDIS_PORT), *args,
                    check=False).stdout  # fmt: skip

    def redis_masters(self) -> list[str]:
        """Hosts whose redis-server is a master now, per the first reachable node."""
        by_ip = {h.ip: n for n, h in self.hosts.items()}
        for host in self.redis_hosts():
            lines = self.redis_cli(host, "cluster", "nodes").splitlines()
            if lines:
                return sorted(
                    by_ip[line.split()[1].split(":")[0]]
                    for line in lines
                    if "master" in line.split()[2] and "fail" not in line.split()[2]
                )
        return []

    def start_redis(self, host: str = "redis") -> Process:
        h = self.hosts[host]
        data = self.workdir / host
        data.mkdir(exist_ok=True)
        argv = ["redis-server", "--bind", h.ip, "--port", str(REDIS_PORT)]
        argv += ["--save", "", "--appendonly", "no", "--protected-mode", "no"]
        if self.layout.redis_cluster_nodes:
            # nodes.conf survives a kill: the node rejoins the cluster (as a replica when
            # its replica was promoted meanwhile).
            argv += ["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"]
            argv += ["--cluster-config-file", str(data / "nodes.conf")]
        proc = self.spawn(host, host, [*argv, "--dir", str(data)])
        _wait_port(h.ip, REDIS_PORT, proc, 15)
        return proc

    def partition_redis(self, host: str) -> None:
        """Cut `host` off from every Redis host."""
        for r in self.redis_hosts():
            self.partition(host, r)

    def heal_redis(self, host: str) -> None:
        for r in self.redis_hosts():
            self.heal(host, r)

    def _broker(self) -> None:
        from devstack.services import tansu_binary

        host = self.hosts["broker"]
        url = f"tcp://{host.ip}:{KAFKA_PORT}"
        argv = [str(tansu_binary()), "broker", "--listener-url", url]
        proc = self.spawn("broker", "tansu", [*argv, "--advertised-listener-url", url])
        _wait_port(host.ip, KAFKA_PORT, proc, 20)

    def dsns(self) -> tuple[str, ...]:
        return tuple(
            f"postgresql://postgres@{h.ip}:{PG_PORT}/agora_shard{i}"
            for i, h in enumerate(self.pg_hosts())
        )

    def _prepare(self) -> None:
        """Settings for every process, shard databases made and migrated, topics made."""
        import secrets

        from core.settings import Settings
        from devstack import services
        from fanout.kafka import ensure_topics
        from storage.migrate import migrate_all
        from tests.engines import settings_env

        lay = self.layout
        env = {
            "AGORA_SHARD_DSNS": ",".join(self.dsns()),
            "AGORA_LOGICAL_SHARDS": str(lay.logical_shards),
            "AGORA_REDIS_URL": f"redis://{self.ip(self.redis_hosts()[0])}:{REDIS_PORT}/0",
            "AGORA_REDIS_CLUSTER": "true" if lay.redis_cluster_nodes else "false",
            "AGORA_KAFKA_BOOTSTRAP": f"{self.ip('broker')}:{KAFKA_PORT}",
            "AGORA_KAFKA_PARTITIONS": str(lay.kafka_partitions),
            "AGORA_KAFKA_IDEMPOTENCE": "false",  # Tansu has no InitProducerId
            "AGORA_KAFKA_FETCH_WAIT_MS": "20",  # Tansu answers a fetch at its wait's end
            "AGORA_JWT_SECRET": secrets.token_hex(16),
            # /readyz answers a loopback peer or this token: the harness asks from the
            # root namespace, over the control link (`readyz`).
            "AGORA_OPS_TOKEN": secrets.token_hex(16),
            "AGORA_PG_POOL_MAX": "8",
            "AGORA_HANDSHAKES_PER_IP_S": "0",  # every client comes from the loadgen host
            "AGORA_LOOP_LAG_MS": "5000",  # two cores shared by the whole cluster
            **lay.env,
        }
        settings = Settings.from_env(env)
        self.settings = settings
        self.settings_env = settings_env(settings)
        dsns = settings.shard_dsns
        asyncio.run(services.ensure_databases(dsns))
        asyncio.run(migrate_all(dsns))
        asyncio.run(ensure_topics(settings))
        if lay.shard_files:
            for role in ("gateway", "worker"):
                self.write_shard_file(role, dsns, settings.shard_map)
                self.role_env[role]["AGORA_SHARD_FILE"] = str(self.shard_file(role))

    def shard_file(self, role: str) -> Path:
        """The AGORA_SHARD_FILE of a role's processes (with `Layout.shard_files`)."""
        return self.workdir / f"shards-{role}.env"

    def write_shard_file(self, role: str, dsns: tuple[str, ...], shard_map: str) -> None:
        """Databases and map for a role's running processes, which take them within a
        second: written to a temporary name and renamed, so never read half-written."""
        path = self.shard_file(role)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(f"AGORA_SHARD_DSNS={','.join(dsns)}\nAGORA_SHARD_MAP={shard_map}\n")
        os.replace(tmp, path)

    def readyz(self, host: str) -> tuple[int, dict[str, Any]]:
        """A gateway's `GET /readyz`: its status code and body (the body of a 503 too: it
        still says which `shard_map` the gateway routes by)."""
        url = f"http://{self.ip(host)}:{GATEWAY_PORT}/readyz"
        auth = {"Authorization": f"Bearer {self.settings.ops_token}"}
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=auth), timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def token(self, user: str, ttl: int = 3600) -> str:
        from gateway.auth import make_token

        return make_token(self.settings.jwt_secret, user, None, ttl)

    def describe(self) -> dict[str, Any]:
        return {
            "hosts": {n: h.ip for n, h in self.hosts.items()},
            "delay_ms_each_way": self.layout.delay_ms if self.delay_applied else 0,
            "delay_note": None if self.delay_applied else "kernel without sch_netem: no delay",
            "processes": {p.name: p.pid for p in self.procs if p.alive()},
        }


def _wait_port(host: str, port: int, proc: Process, seconds: float) -> None:
    from devstack.services import port_open

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not proc.alive():
            raise ClusterError(f"{proc.name} exited; see {proc.log}")
        if port_open(host, port):
            return
        time.sleep(0.1)
    raise ClusterError(f"{proc.name} did not open {host}:{port} in {seconds}s; see {proc.log}")


def _wait_http(url: str, proc: Process, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not proc.alive():
            raise ClusterError(f"{proc.name} exited; see {proc.log}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as resp:
            if resp.status == 200:
                return
        time.sleep(0.1)
    raise ClusterError(f"{proc.name} not ready at {url} in {seconds}s; see {proc.log}")


def _wait_log(proc: Process, log: Path, offset: int, marker: bytes, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not proc.alive():
            raise ClusterError(f"{proc.name} exited; see {log}")
        with open(log, "rb") as f:
            f.seek(offset)
            if marker in f.read():
                return
        time.sleep(0.1)
    raise ClusterError(f"{proc.name} did not log {marker!r} in {seconds}s; see {log}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="build the cluster, print it, keep it until Ctrl-C")
    up.add_argument("--gateways", type=int, default=3)
    up.add_argument("--workers", type=int, default=2)
    up.add_argument("--pg-hosts", type=int, default=2)
    up.add_argument("--delay-ms", type=float, default=0.5)
    up.add_argument("--prefix", default=DEFAULT_PREFIX)
    up.add_argument("--subnet", default=DEFAULT_SUBNET, help="first three octets of a /24")
    up.add_argument("--redis-cluster", action="store_true", help="3 masters + 3 replicas")
    clean = sub.add_parser("cleanup", help="remove every leftover of a prefix")
    clean.add_argument("--prefix", default=DEFAULT_PREFIX)
    args = parser.parse_args(argv)
    if args.cmd == "cleanup":
        for line in cleanup(args.prefix):
            print(line)
        return 0
    layout = Layout(
        gateways=args.gateways,
        workers=args.workers,
        pg_hosts=args.pg_hosts,
        redis_cluster_nodes=6 if args.redis_cluster else 0,
        delay_ms=args.delay_ms,
        prefix=args.prefix,
        subnet=args.subnet,
    )
    with Cluster(layout) as cluster:
        print(json.dumps(cluster.describe(), indent=2), flush=True)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    return 0


if __name__ == "__main__":
    sys.exit(main())
