"""What every benchmark shares: the machine's description, CPU pinning, file limits,
percentiles, process RSS/CPU readings, and writing results (JSON + bench/RESULTS.md)."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
RESULTS_MD = BENCH_DIR / "RESULTS.md"

# Source addresses for the load generator: many 127.0.0.x so that tens of thousands of
# connections to one gateway port never run out of ephemeral ports (one 4-tuple each).
# Only loopback: nothing here may ever target another address.
SOURCE_IPS = tuple(f"127.0.0.{i}" for i in range(2, 18))


def cpu_sets() -> tuple[set[int] | None, set[int] | None]:
    """(gateway cpus, load generator cpus): the first core for the servers under test,
    the last for the load generator; None when the machine has a single core."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None, None
    if len(cpus) < 2:
        return None, None
    return {cpus[0]}, {cpus[-1]}


def pin(cpus: set[int] | None) -> None:
    """Pin the calling process (and the threads it starts later) to `cpus`."""
    if cpus:
        try:
            os.sched_setaffinity(0, cpus)
        except OSError:
            pass


def raise_nofile() -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit as far as allowed (children inherit it)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for want in (1_048_576, 200_000, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)


async def wait_until(pred: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll `pred` until it holds or `timeout` passes; whether it held."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(interval)


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """count, mean, p50, p95, p99, max (nearest rank); zeros for an empty sample."""
    if not values:
        return {"count": 0, "mean": 0.0, "p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0}
    s = sorted(values)
    n = len(s)

    def rank(q: float) -> float:
        return float(s[min(n - 1, max(0, int(q * n + 0.999999) - 1))])

    return {
        "count": n,
        "mean": round(sum(s) / n, 3),
        "p50": round(rank(0.50), 3),
        "p95": round(rank(0.95), 3),
        "p99": round(rank(0.99), 3),
        "max": round(float(s[-1]), 3),
    }


def _meminfo_kib(field: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def machine() -> dict[str, Any]:
    cpu_model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu_model,
        "mem_total_mib": _meminfo_kib("MemTotal") // 1024,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "kernel": platform.release(),
        "nofile": [soft, hard],
        "git": _git_rev(),
    }


def _git_rev() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=BENCH_DIR.parent,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=BENCH_DIR.parent,
        ).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def conditions() -> dict[str, Any]:
    """When, and how busy the machine was (others may be running tests meanwhile)."""
    load1, load5, load15 = os.getloadavg()
    return {
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "loadavg": [round(load1, 2), round(load5, 2), round(load15, 2)],
    }


def proc_rss_kib(pid: int) -> int:
    """VmRSS of a process, KiB (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def proc_pss_kib(pid: int) -> int:
    """Proportional set size, KiB: shared pages split between the processes that map them,
    so a sum over processes (PostgreSQL's backends share its buffers) counts them once."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def child_pids(parent: int) -> list[int]:
    """The processes whose parent is `parent` (one scan of /proc)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        if int(raw[raw.rindex(")") + 2 :].split()[1]) == parent:
            out.append(int(name))
    return out


def parent_pid(pid: int) -> int:
    """The parent of `pid` (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except OSError:
        return 0
    return int(raw[raw.rindex(")") + 2 :].split()[1])


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ys over xs (0.0 for fewer than two distinct xs)."""
    n = len(xs)
    if n < 2 or n != len(ys):
        return 0.0
    mx = sum(xs) / n
    my = sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return 0.0
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


_TICKS = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except OSError:
        return 0.0
    parts = raw[raw.rindex(")") + 2 :].split()
    return (int(parts[11]) + int(parts[12])) / _TICKS


def proc_cpu_split_s(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process (0, 0 when it is gone). On loopback the
    system part of a socket write includes the receiver's TCP processing (softirq)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except OSError:
        return 0.0, 0.0
    parts = raw[raw.rindex(")") + 2 :].split()
    return int(parts[11]) / _TICKS, int(parts[12]) / _TICKS


def proc_sched_s(pid: int) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) over all of a process's
    threads, from schedstat: the second says how much a neighbour starved it."""
    run = wait = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0, 0.0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                parts = f.read().split()
            run += int(parts[0])
            wait += int(parts[1])
        except (OSError, IndexError, ValueError):
            continue
    return run / 1e9, wait / 1e9


def command_line() -> str:
    return ".venv/bin/python -m " + " ".join([_module_name(), *sys.argv[1:]])


def _module_name() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name:
        return str(spec.name)
    return Path(sys.argv[0]).stem


def write_results(
    name: str,
    data: dict[str, Any],
    markdown: str,
    out_dir: Path = RESULTS_DIR,
    results_md: Path | None = RESULTS_MD,
) -> Path:
    """bench/results/<name>.json, a line in history.jsonl, and the bench's RESULTS.md block."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    with open(out_dir / "history.jsonl", "a") as f:
        f.write(json.dumps({"bench": name, **_headline(data)}) + "\n")
    if results_md is not None:
        update_results_md(results_md, name, markdown)
    return path


def _headline(data: dict[str, Any]) -> dict[str, Any]:
    keep = ("command", "conditions", "summary", "targets")
    return {k: data[k] for k in keep if k in data}


def update_results_md(path: Path, name: str, block: str) -> None:
    """Replace the text between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` (appending
    the pair at the end when absent); everything else in the file is left alone."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    body = f"{start}\n{block.rstrip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _m: body, text)
    else:
        text = text.rstrip() + f"\n\n{body}\n"
    path.write_text(text)


def history(name: str, out_dir: Path = RESULTS_DIR, last: int = 8) -> list[dict[str, Any]]:
    """The last runs of one benchmark (from history.jsonl), oldest first."""
    path = out_dir / "history.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("bench") == name:
            rows.append(row)
    return rows[-last:]


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        out.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return "\n".join(out)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.2f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def machine_line(m: dict[str, Any], c: dict[str, Any]) -> str:
    return (
        f"{c['time']}, load {c['loadavg'][0]}/{c['loadavg'][1]}/{c['loadavg'][2]}; "
        f"{m['nproc']} cores ({m['cpu']}), {m['mem_total_mib']:,} MiB, "
        f"Python {m['python']}, Linux {m['kernel']}, nofile {m['nofile'][0]}, git {m['git']}"
    )


def verdict(ok: bool) -> str:
    return "**reached**" if ok else "**not reached**"


def _classify(pid: int, comm: str) -> str:
    if comm.startswith("python"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return comm
        if "gateway.cli gateway" in cmd:
            return "agora gateway (other)"
        if "gateway.cli fanout" in cmd or "gateway.cli scores" in cmd:
            return "agora worker (other)"
        if "multiprocessing" in cmd or " bench." in cmd or "-m bench" in cmd:
            return "load generator"
        if "pytest" in cmd:
            return "pytest (other sessions)"
        return "python (other)"
    if comm.startswith("postgres"):
        return "postgres"
    return comm


def core_ticks() -> dict[str, list[int]]:
    """Per core, the /proc/stat tick counters (user nice system idle iowait irq softirq
    steal)."""
    out: dict[str, list[int]] = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *ticks = line.split()
                out[name] = [int(t) for t in ticks[:8]]
    return out


def core_shares(
    before: dict[str, list[int]], after: dict[str, list[int]]
) -> dict[str, dict[str, float]]:
    """Per core, the share of the interval it was busy (not idle or iowait), and the share
    it spent in interrupts and softirqs. The softirq share matters on loopback: a socket
    write runs the receiving socket's TCP processing in softirq on the writer's core (work
    a real network does on the receiver's machine), counted in the writer's system time
    (tick accounting) or ksoftirqd's."""
    out: dict[str, dict[str, float]] = {}
    for name, t1 in after.items():
        t0 = before.get(name)
        if t0 is None:
            continue
        d = [b - a for a, b in zip(t0, t1, strict=True)]
        total = sum(d) or 1
        out[name] = {
            "busy": round((total - d[3] - d[4]) / total, 3),
            "irq": round((d[5] + d[6]) / total, 3),
        }
    return out


def cpu_snapshot() -> dict[int, tuple[str, float]]:
    """CPU seconds of every process on the machine: pid -> (class, seconds)."""
    out: dict[int, tuple[str, float]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        try:
            with open(f"/proc/{pid}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        comm = raw[raw.index("(") + 1 : raw.rindex(")")]
        parts = raw[raw.rindex(")") + 2 :].split()
        out[pid] = (_classify(pid, comm), (int(parts[11]) + int(parts[12])) / _TICKS)
    return out


def cpu_by_process(
    before: dict[int, tuple[str, float]],
    after: dict[int, tuple[str, float]],
    seconds: float,
    labels: dict[int, str] | None = None,
) -> dict[str, float]:
    """Share of one core (1.0 = a whole core) each class of process used between two
    snapshots; `labels` names our own processes by pid. Shows what else loaded the machine."""
    labels = labels or {}
    use: dict[str, float] = {}
    for pid, (cls, cpu) in after.items():
        prev = before.get(pid, (cls, 0.0))[1]
        name = labels.get(pid, cls)
        use[name] = use.get(name, 0.0) + max(0.0, cpu - prev)
    ranked = sorted(use.items(), key=lambda kv: -kv[1])
    return {
        k: round(v / max(seconds, 1e-6), 2) for k, v in ranked if v / max(seconds, 1e-6) >= 0.01
    }


def result_name(base: str, experiment: str) -> str:
    """bench/results/<name>.json and the RESULTS.md block: one per benchmark and experiment."""
    return f"{base}@{experiment}" if experiment else base


def experiment_note(data: dict[str, Any]) -> str:
    exp = data.get("params", {}).get("experiment")
    return f" — with experiment `{exp}` (bench/experiment.py)" if exp else ""


def read_timing(out_dir: Path, pids: dict[int, str]) -> dict[str, Any]:
    """The `timing` experiment's per-process await totals (bench/experiment.py), by label:
    name -> {count, mean_ms, max_ms, over_100ms}."""
    out: dict[str, Any] = {}
    for pid, label in pids.items():
        path = out_dir / f"timing.{pid}.json"
        if not path.exists():
            continue
        stats = json.loads(path.read_text()).get("stats", {})
        out[label] = {
            name: {
                "count": int(c),
                "mean_ms": round(total / max(1, c), 2),
                "max_ms": round(mx, 1),
                "over_100ms": int(slow),
            }
            for name, (c, total, mx, slow) in stats.items()
        }
    return out


def timing_env(out_dir: Path) -> dict[str, str]:
    out_dir.mkdir(parents=True, exist_ok=True)
    return {"BENCH_TIMING_OUT": str(out_dir.resolve() / "timing")}


def pin_threads(pid: int, cpus: set[int]) -> int:
    """Pin every thread a running process has now (threads it starts later inherit the
    affinity of the thread that starts them); how many were pinned."""
    n = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tids:
        try:
            os.sched_setaffinity(int(tid), cpus)
            n += 1
        except OSError:
            continue
    return n


def descendants(snapshot_pids: Iterable[int], root: int) -> set[int]:
    """`root` and every process below it, among `snapshot_pids` (one /proc read each)."""
    parents = {pid: parent_pid(pid) for pid in snapshot_pids}
    out = {root}
    grew = True
    while grew:
        grew = False
        for pid, ppid in parents.items():
            if ppid in out and pid not in out:
                out.add(pid)
                grew = True
    return out


def cpu_seconds_by(
    before: dict[int, tuple[str, float]],
    after: dict[int, tuple[str, float]],
    groups: dict[str, set[int]],
) -> dict[str, float]:
    """CPU-seconds (user + system) each named group of pids used between two snapshots
    (`cpu_snapshot`); a process started in between counts from zero."""
    out: dict[str, float] = {}
    for name, pids in groups.items():
        total = 0.0
        for pid in pids:
            if pid in after:
                total += max(0.0, after[pid][1] - before.get(pid, ("", 0.0))[1])
        out[name] = round(total, 2)
    return out


def metric_samples(url: str, prefixes: tuple[str, ...] = ("",)) -> list[str] | None:
    """The sample lines (no `#` comments) of one /metrics page that start with one of
    `prefixes`; None when the page cannot be read (a process that is gone or busy)."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    return [x for x in text.splitlines() if x.startswith(prefixes) and not x.startswith("#")]


def sample_value(line: str) -> float:
    """The value of one Prometheus sample line (its last field)."""
    return float(line.rsplit(" ", 1)[1])
