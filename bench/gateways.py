"""Several gateway processes under one benchmark: how clients are spread over them (and
over source addresses and load-generator processes) so that no process runs out of file
descriptors and no (source ip, gateway port) pair runs out of ephemeral ports, and what
the benchmark reads of every gateway at once (RSS, PSS, CPU, open descriptors).

On this machine RLIMIT_NOFILE is 20,000 per process and cannot be raised, so 100,000
connections need at least six gateway processes and as many load-generator processes.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from bench.common import proc_cpu_s, proc_pss_kib, proc_rss_kib

FD_RESERVE = 100  # descriptors a process needs besides its client sockets
CLIENTS_PER_PROC = 5000  # load-generator processes: one per 5,000 clients by default


def ephemeral_ports() -> int:
    """How many local ports connect() may choose from (net.ipv4.ip_local_port_range)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
        return hi - lo + 1
    except (OSError, ValueError):
        return 28_232  # Linux's default range, 32768-60999


@dataclass(frozen=True)
class Plan:
    """Where each client goes: `slots[i]` = (gateway index, source-ip index) of client i;
    client i runs in load-generator process i % procs."""

    gateways: int
    procs: int
    slots: list[tuple[int, int]]
    per_gateway: int  # most clients on one gateway
    per_proc: int  # most clients in one load-generator process
    per_tuple: int  # most clients sharing one (source ip, gateway port)

    def for_proc(self, w: int) -> list[tuple[int, int]]:
        return self.slots[w :: self.procs]


def plan(clients: int, gateways: int, source_ips: int, procs: int, nofile: int) -> Plan:
    """Client i goes to gateway i % gateways from source ip (i // gateways) % source_ips,
    so each gateway sees every source address equally. `procs` 0: enough load-generator
    processes for the fd limit (at least one per CLIENTS_PER_PROC clients). Raises
    ValueError, saying which limit, when a gateway, a load-generator process or a 4-tuple
    space would be over its limit."""
    if gateways < 1 or source_ips < 1:
        raise ValueError("--gateways and --source-ips must be at least 1")
    room = nofile - FD_RESERVE
    procs = procs or max(2, math.ceil(clients / CLIENTS_PER_PROC), math.ceil(clients / room))
    slots = [(i % gateways, (i // gateways) % source_ips) for i in range(clients)]
    per_gateway = math.ceil(clients / gateways)
    per_proc = math.ceil(clients / procs)
    per_tuple = max(Counter(slots).values(), default=0)
    problems = []
    if per_gateway > room:
        problems.append(
            f"{per_gateway} clients per gateway > {room} (RLIMIT_NOFILE {nofile} minus "
            f"{FD_RESERVE}): use --gateways {math.ceil(clients / room)} or more"
        )
    if per_proc > room:
        problems.append(
            f"{per_proc} clients per load-generator process > {room}: use --procs "
            f"{math.ceil(clients / room)} or more"
        )
    ports = ephemeral_ports()
    if per_tuple > ports:
        problems.append(
            f"{per_tuple} connections from one source ip to one gateway > {ports} ephemeral "
            "ports: use more --source-ips or --gateways"
        )
    if problems:
        raise ValueError("; ".join(problems))
    return Plan(gateways, procs, slots, per_gateway, per_proc, per_tuple)


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


@dataclass(frozen=True)
class Reading:
    """One gateway process at one moment."""

    rss_kib: int
    pss_kib: int  # shared pages (libraries, the interpreter) split between processes
    cpu_s: float
    fds: int


def read(pids: Sequence[int], pss: bool = False) -> list[Reading]:
    """A reading of every process (PSS only when asked: smaps_rollup walks every mapping)."""
    return [
        Reading(proc_rss_kib(p), proc_pss_kib(p) if pss else 0, proc_cpu_s(p), fd_count(p))
        for p in pids
    ]


def log_levels(text: str) -> dict[str, int]:
    """How many WARNING and ERROR lines a gateway's JSON log holds (by level)."""
    out: dict[str, int] = {}
    for level in ("WARNING", "ERROR"):
        n = text.count(f'"level":"{level}"')
        if n:
            out[level] = n
    return out


def cpu_s(pids: Sequence[int]) -> float:
    """CPU seconds (user + system) of the processes together."""
    return sum(proc_cpu_s(p) for p in pids)
