"""Where a delivery's milliseconds go, stage by stage (issue 14, target 3).

`bench.fanout --experiment stages` has every Agora process stamp each message at the
stages it passes (bench/experiment.py, `stages`: rows of (key, stage, time_ns) in
`stages.<pid>.jsonl`, the key being the send time the bench body starts with) and its
clients note when each member received each message. `attribute` joins them: per
delivery, the time from the client's send to its receipt cut at every stamp, in path order:

    sent -> gw_recv -> produced -> fetch_sent | -> fetch_answered -> taken -> pg_sent
         -> pg_answered -> stored -> published -> gw_arrived -> gw_dispatch -> gw_written
         -> received

`fetch_sent` is when the worker's fetch that brought the record was sent: the record was
produced before it only if the broker held the fetch until the record came; after it, the
record waited for that fetch to be sent (the previous one was in flight). All clocks are
the machine's (`time.time_ns`), so stages across processes subtract.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# (label, from, to): consecutive stamps; the last two are per receiving gateway.
STAGES: list[tuple[str, str, str]] = [
    ("client send -> sending gateway's send path", "sent", "gw_recv"),
    ("claim + produce until the broker's ack", "gw_recv", "produced"),
    ("produced -> the worker's fetch that took it is sent", "produced", "fetch_sent*"),
    ("that fetch at the broker (answered)", "fetch_sent*", "fetch_answered"),
    ("answered -> handed to the worker (getmany)", "fetch_answered", "taken"),
    ("taken -> its statement sent (pool acquire, tasks)", "taken", "pg_sent"),
    ("the statement and its commit (PostgreSQL)", "pg_sent", "pg_answered"),
    ("answered -> the sequencer returns", "pg_answered", "stored"),
    ("commit -> PUBLISH returned", "stored", "published"),
    ("PUBLISH returned -> receiving gateway reads it", "published", "gw_arrived"),
    ("read -> dispatch starts", "gw_arrived", "gw_dispatch"),
    ("dispatch (written to the sockets)", "gw_dispatch", "gw_written"),
    ("written -> client receives", "gw_written", "received"),
]
SENDER_STAGES = {"gw_recv", "produced", "acked"}
WORKER_STAGES = {"fetch_sent", "fetch_answered", "taken", "pg_sent", "pg_answered", "stored"}
WORKER_STAGES |= {"published"}
RECEIVER_STAGES = {"gw_arrived", "gw_dispatch", "gw_written"}


def read_rows(out_dir: Path) -> dict[int, list[tuple[str, str, int]]]:
    """Every process's stamps, by pid."""
    out: dict[int, list[tuple[str, str, int]]] = {}
    for path in out_dir.glob("stages.*.jsonl"):
        pid = int(path.name.split(".")[1])
        rows = []
        for line in path.read_text().splitlines():
            if line.strip():
                key, stage, t = json.loads(line)
                rows.append((str(key), str(stage), int(t)))
        out[pid] = rows
    return out


def attribute(
    rows_by_pid: dict[int, list[tuple[str, str, int]]],
    received: dict[int, Iterable[tuple[int, int]]],
    since_ns: int = 0,
) -> dict[str, Any]:
    """Per stage: the median and mean in ms over the deliveries whose every stamp is known,
    and how many that was. `received`: per receiving gateway's pid, (key, received ns)
    per delivery. Only messages sent at `since_ns` or later count."""
    common: dict[str, dict[str, int]] = defaultdict(dict)  # key -> stage -> t (one place)
    per_gw: dict[tuple[str, int], dict[str, int]] = defaultdict(dict)  # (key, pid) -> ...
    for pid, rows in rows_by_pid.items():
        for key, stage, t in rows:
            if stage in RECEIVER_STAGES:
                per_gw[(key, pid)].setdefault(stage, t)
            else:
                # A redelivered record is stamped again: the first pass is what was seen.
                common[key].setdefault(stage, t)
    samples: dict[str, list[float]] = defaultdict(list)
    totals: list[float] = []
    server: list[float] = []  # sent -> the receiving gateway wrote the last socket
    before_fetch = 0
    for pid, pairs in received.items():
        for key_ns, recv in pairs:
            if key_ns < since_ns:
                continue
            key = str(key_ns)
            t = {**common.get(key, {}), **per_gw.get((key, pid), {})}
            t["sent"], t["received"] = key_ns, recv
            if any(s not in t for s in (*SENDER_STAGES, *WORKER_STAGES, *RECEIVER_STAGES)):
                continue
            # The record waited for its fetch to be sent, or the fetch waited for it.
            t["fetch_sent*"] = max(t["fetch_sent"], t["produced"])
            before_fetch += t["fetch_sent"] < t["produced"]
            for label, a, b in STAGES:
                samples[label].append((t[b] - t[a]) / 1e6)
            totals.append((recv - key_ns) / 1e6)
            server.append((t["gw_written"] - key_ns) / 1e6)
    n = len(totals)
    out: dict[str, Any] = {"deliveries": n, "stages": []}
    if not n:
        return out
    for label, _, _ in STAGES:
        xs = samples[label]
        out["stages"].append(
            {
                "stage": label,
                "p50_ms": round(statistics.median(xs), 2),
                "p99_ms": _p99(xs),
                "mean_ms": round(statistics.fmean(xs), 2),
            }
        )
    out["total"] = {
        "p50_ms": round(statistics.median(totals), 2),
        "p99_ms": _p99(totals),
        "mean_ms": round(statistics.fmean(totals), 2),
    }
    # The server's part alone: until the receiving gateway's dispatch of the message had
    # written every local socket (an upper bound for each delivery of it), so without the
    # load generator's reading. Its p99 against the total's says whose the tail is.
    out["server"] = {
        "p50_ms": round(statistics.median(server), 2),
        "p99_ms": _p99(server),
        "mean_ms": round(statistics.fmean(server), 2),
    }
    # Records the fetch found already there when it was sent vs those it waited for.
    out["fetch_waited_for_record"] = round(before_fetch / n, 3)
    return out


def _p99(xs: list[float]) -> float:
    ordered = sorted(xs)
    return round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 2)


def render(result: dict[str, Any]) -> list[str]:
    """Markdown lines: one table of the stages."""
    if not result.get("deliveries"):
        return ["(no delivery had every stamp)"]
    lines = ["| stage | p50 ms | p99 ms | mean ms |", "|---|---:|---:|---:|"]
    for s in result["stages"]:
        lines.append(f"| {s['stage']} | {s['p50_ms']} | {s.get('p99_ms', '')} | {s['mean_ms']} |")
    srv = result.get("server")
    if srv:
        lines.append(
            f"| client send -> every local socket written | {srv['p50_ms']} | {srv['p99_ms']} "
            f"| {srv['mean_ms']} |"
        )
    tot = result["total"]
    lines.append(
        f"| **client send -> client receives** | **{tot['p50_ms']}** "
        f"| **{tot.get('p99_ms', '')}** | **{tot['mean_ms']}** |"
    )
    lines.append("")
    lines.append(
        f"{result['deliveries']:,} deliveries with every stamp; the fetch that took a record "
        f"was sent before the record was produced for {result['fetch_waited_for_record']:.0%}."
    )
    return lines
