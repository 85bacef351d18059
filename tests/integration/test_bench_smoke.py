"""CI-sized runs of every benchmark in bench/ (small N, a few seconds of load each), so the
scripts cannot rot. Each runs as its own process, exactly as documented in bench/RESULTS.md
(but writing to a temporary directory and leaving RESULTS.md alone), and its results JSON
is checked for the keys the report needs and for zero lost messages. The full-size runs
are documented commands, not CI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.engines

ROOT = Path(__file__).resolve().parents[2]


def run_bench(module: str, name: str, tmp_path: Path, *args: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", module, *args, "--out", str(tmp_path), "--results-md", ""]
    # Not under coverage (scripts/test): a benchmark traced line by line measures the
    # tracer, and costs CI minutes for paths the functional tests cover anyway.
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    print(proc.stdout[-3000:])
    print(proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    data: dict[str, Any] = json.loads((tmp_path / f"{name}.json").read_text())
    for key in ("bench", "command", "machine", "conditions", "params", "summary", "targets"):
        assert key in data, key
    assert {"nproc", "mem_total_mib", "python", "kernel"} <= set(data["machine"])
    assert data["machine"]["nproc"] >= 1 and data["machine"]["mem_total_mib"] > 0
    assert data["bench"] == name.split("-")[0] or data["bench"] == name, data["bench"]
    for target in data["targets"].values():
        assert isinstance(target["target"], str) and target["target"]
    return data


def check_distribution(d: dict[str, Any], count: int | None = None) -> None:
    """A latency summary that describes real samples: ordered, non-negative, counted."""
    assert 0 <= d["p50"] <= d["p95"] <= d["p99"] <= d.get("max", d["p99"]), d
    if "count" in d:
        assert d["count"] > 0 if count is None else d["count"] == count, d


def test_storm_smoke(tmp_path: Path) -> None:
    data = run_bench(
        "bench.storm", "storm", tmp_path, "--clients", "300", "--inflight", "50", "--hold", "1"
    )
    s = data["summary"]
    assert s["connected"] == 300 and s["failed"] == 0, s["failures"]
    assert s["survivors"] == 300 and s["gateway_alive"] is True
    check_distribution(s["connect_ms"], 300)
    assert 0 < s["connect_ms"]["max"] < 60_000
    assert s["conns_per_s"] > 0 and s["rss_after_kib"] >= s["rss_before_kib"] > 0
    # 300 connections cost something, and far less than a MiB each.
    assert 0 < s["rss_per_conn_kib"] < 1024
    assert s["gateway_fds_after"] >= s["gateway_fds_before"] + 300


def test_storm_gateways_smoke(tmp_path: Path) -> None:
    """--gateways: the clients spread evenly, each gateway holds and answers its share."""
    data = run_bench(
        "bench.storm",
        "storm",
        tmp_path,
        *("--clients", "301", "--inflight", "50", "--hold", "1", "--gateways", "2"),
    )
    s = data["summary"]
    assert s["connected"] == 301 and s["failed"] == 0, s["failures"]
    assert s["survivors"] == 301 and s["gateway_alive"] is True
    check_distribution(s["connect_ms"], 301)
    gws = s["per_gateway"]
    assert [g["connected"] for g in gws] == [151, 150]
    assert [g["answered_ping"] for g in gws] == [151, 150]
    assert len({g["pid"] for g in gws}) == len({g["port"] for g in gws}) == 2
    for g in gws:
        assert g["fds_after"] >= g["fds_before"] + g["connected"] and g["alive"] is True
        assert 0 < g["rss_before_kib"] <= g["rss_after_kib"]
    assert s["rss_end_of_hold_kib"] == sum(g["rss_end_of_hold_kib"] for g in gws)
    assert s["loadgen_cpu_s_storm"] > 0 and s["gateway_cpu_s_storm"] > 0
    assert list(s["timeline_utc"]) == ["storm", "storm_end", "hold", "check", "close", "close_end"]
    assert s["gateway_problems_before_close"] == []
    assert all("logged_in_teardown" in g for g in gws)


def test_reconnect_smoke(tmp_path: Path) -> None:
    data = run_bench(
        "bench.reconnect",
        "reconnect",
        tmp_path,
        *("--clients", "120", "--members", "30", "--rate", "40", "--jitter-ms", "300"),
        *("--pre", "1", "--post", "1", "--fanout-workers", "1"),
    )
    s = data["summary"]
    assert s["subscribed_before_kill"] == 120
    assert s["recovered"] == 120 and 0 < s["all_recovered_s"] < 60
    check_distribution(s["recovery_s"], 120)
    assert s["recovery_s"]["max"] <= s["all_recovered_s"] + 0.01
    assert 0 < s["acked"] <= s["sent"] and s["unacked"] == s["sent"] - s["acked"]
    assert s["delivered"] == s["expected"] > 0
    assert s["lost"] == 0 and s["duplicated"] == 0 and s["reordered"] == 0


def test_fanout_smoke(tmp_path: Path) -> None:
    data = run_bench(
        "bench.fanout",
        "fanout",
        tmp_path,
        *("--convs", "4", "--members", "4", "--senders", "4", "--rates", "20,40"),
        *("--duration", "2", "--warmup-rate", "20", "--warmup-duration", "1"),
    )
    s = data["summary"]
    assert s["subscribed"] == 16
    assert s["lost"] == 0 and s["duplicated"] == 0 and s["reordered"] == 0
    steps = [x for x in data["steps"] if not x["warmup"]]
    assert [x["rate"] for x in steps] == [20.0, 40.0]
    for step in steps:
        assert step["acked"] > 0 and step["delivered"] == step["expected"] > 0
        check_distribution(step["latency_ms"])
        assert step["latency_ms"]["p99"] < 30_000
        assert step["deliveries_per_s"] > 0
    assert s["max_deliveries_per_s"] == max(x["deliveries_per_s"] for x in steps)


def test_fanout_pinned_smoke(tmp_path: Path) -> None:
    """Issue 14's mode: the server side on one core, CPU-seconds per component, py-spy on
    every Agora process."""
    data = run_bench(
        "bench.fanout",
        "fanout-pinned",
        tmp_path,
        *("--pin-server-core", "0", "--convs", "4", "--members", "4", "--senders", "4"),
        *("--rates", "20", "--duration", "2", "--warmup-rate", "20", "--warmup-duration", "1"),
        "--profile-all",
    )
    s = data["summary"]
    assert data["pinned"] is True and data["params"]["body_bytes"] == 64
    assert s["subscribed"] == 16
    assert s["lost"] == 0 and s["duplicated"] == 0 and s["reordered"] == 0
    (step,) = [x for x in data["steps"] if not x["warmup"]]
    assert step["delivered"] == step["expected"] > 0
    check_distribution(step["ack_ms"])
    cpu = step["cpu_s"]
    # Every component did work, PostgreSQL's backends included; the total is their sum.
    for part in ("gateway A", "gateway B", "fan-out worker", "broker (Tansu)", "PostgreSQL"):
        assert cpu[part] > 0, (part, cpu)
    assert cpu["Redis"] >= 0
    parts = sum(v for k, v in cpu.items() if k not in ("server total", "load generator"))
    assert abs(cpu["server total"] - parts) < 0.05
    assert step["consumer"]["records_total"] >= step["acked"]
    assert set(data["profiles"]) == {"gateway-a", "gateway-b", "fanout-0"}
    for prof in data["profiles"].values():
        assert prof.get("samples", 0) > 0 or "error" in prof, prof


def test_fanout_room_smoke(tmp_path: Path) -> None:
    data = run_bench(
        "bench.fanout",
        "fanout-room",
        tmp_path,
        *("--room", "200", "--senders", "2", "--rates", "5", "--duration", "2"),
        *("--warmup-rate", "2", "--warmup-duration", "1"),
    )
    s = data["summary"]
    assert s["mode"] == "room" and s["subscribed"] == 200 and s["members"] == 200
    assert s["lost"] == 0 and s["duplicated"] == 0 and s["reordered"] == 0
    assert s["max_deliveries_per_s"] > 0
    steps = [x for x in data["steps"] if not x["warmup"]]
    assert steps and all(x["delivered"] == x["expected"] > 0 for x in steps)
    room = data["targets"]["room_50k"]
    assert room["best_deliveries_per_s"] == s["max_deliveries_per_s"]


def test_feeds_smoke(tmp_path: Path) -> None:
    data = run_bench(
        "bench.feeds",
        "feeds",
        tmp_path,
        *("--posts", "40", "--votes", "40", "--duration", "1", "--cold-rounds", "2"),
        *("--concurrency", "4"),
    )
    assert data["summary"]["seed"]["posts"] == 40
    assert data["summary"]["seed"]["vote_statuses"] == {"200": 40}
    assert data["summary"]["scores_worker_alive"] is True
    for kind in ("trending", "new", "top"):
        k = data["kinds"][kind]
        assert k["cached"]["requests"] > 0
        assert set(k["cached"]["statuses"]) == {"200"}, k["cached"]["statuses"]
        assert k["cold"]["latency_ms"]["count"] == 2
        check_distribution(k["cold"]["latency_ms"], 2)
        assert data["summary"][kind] > 0  # requests per second from the cache
    trending = data["targets"]["trending_3k"]
    assert trending["rps"] == data["summary"]["trending"] and trending["p99_ms"] > 0


def test_soak_smoke(tmp_path: Path) -> None:
    data = run_bench(
        "bench.soak",
        "soak",
        tmp_path,
        *("--minutes", "0.75", "--interval", "15", "--rate", "20"),
        *("--convs", "4", "--members", "4", "--senders", "4"),
        *("--warmup-minutes", "0", "--warmup-s", "3", "--drain", "30"),
    )
    s = data["summary"]
    assert s["subscribed"] == 16 and s["senders"] == 4
    assert s["acked"] > 0 and s["delivered"] == s["expected"] > 0
    assert s["lost"] == 0 and s["duplicated"] == 0 and s["reordered"] == 0
    assert data["targets"]["lost_0"]["reached"]
    assert set(data["targets"]) == {"lost_0", "p99_stable", "rss_flat", "redis_flat"}
    rows = data["rows"]
    assert [r["minute"] for r in rows] == [0.25, 0.5, 0.75]
    processes = ("gateway A", "gateway B", "fan-out worker 0", "broker (Tansu)", "Redis")
    processes += ("PostgreSQL", "load generator")
    for r in rows:
        assert r["acked"] > 0 and r["deliveries"] > 0
        assert 0 < r["latency_ms"]["p50"] <= r["latency_ms"]["p99"]
        for label in processes:
            assert r["procs"][label]["rss_mib"] > 0, label
        assert r["procs"]["PostgreSQL"]["procs"] > 1  # the postmaster and its children
        assert r["procs"]["gateway A"]["cpu"] > 0 and r["procs"]["fan-out worker 0"]["cpu"] > 0
        assert r["redis"]["used_memory_mib"] > 0 and r["redis"]["keys"] > 0
        assert r["broker_log_records"] >= 0  # -1: the reading failed
    for name in ("p50 ms", "p99 ms", "gateway A MiB", "broker (Tansu) CPU", "redis keys"):
        assert "per_minute" in data["slopes"][name], name


def test_broker_smoke(tmp_path: Path) -> None:
    data = run_bench(
        "bench.broker",
        "broker",
        tmp_path,
        *("--seconds", "20", "--interval", "5", "--rate", "50", "--consume-from", "3"),
    )
    rows = data["rows"]
    assert len(rows) == 4
    assert rows[-1]["produced"] >= 900 and rows[-1]["log_records"] >= 900
    assert rows[-1]["consumed"] > 0
    assert all(r["broker_cpu_s"] >= 0 and r["broker_rss_mib"] > 0 for r in rows)
    s = data["summary"]
    # What the broker was asked is on record, whatever it answered.
    asked = {"retention.ms", "retention.bytes", "segment.ms", "segment.bytes"}
    assert set(s["configs_returned"]) <= asked
    assert "broker_alive_after" in s["delete_records"]
    assert isinstance(s["retention_applied"], bool)
    assert "bounded" in data["targets"]


def test_faults_smoke(tmp_path: Path) -> None:
    data = run_bench(
        "bench.faults",
        "faults",
        tmp_path,
        *("--scenarios", "redis-restart,read-only", "--rate", "40", "--convs", "4"),
        *("--members", "3", "--warmup", "1", "--baseline", "3", "--after", "6"),
    )
    s = data["summary"]
    assert s["lost"] == 0 and s["duplicated"] == 0
    assert all(t["reached"] for t in data["targets"].values()), data["targets"]
    rows = {r["scenario"]: r for r in data["scenarios"]}
    assert set(rows) == {"redis-restart", "read-only"}
    for r in rows.values():
        assert r["acked"] > 100 and r["stored"] == r["acked"]
        assert r["baseline_ms"]["count"] > 0 and r["baseline_ms"]["p50"] > 0
        assert r["fault_s"] >= 1
        assert "recovery_s" in r and "p99" in r["during_ms"]
    # Redis down: sends were answered `unavailable` and retried with the same cid.
    assert rows["redis-restart"]["retried_sends"] > 0
    for r in rows.values():  # every ack's id is its stored row's; the line produced
        assert r["id_mismatch"] == 0 and r["inversions_first_try"] == 0, r["examples"]
        assert r["produce_line"]["records_total"] > 0


def test_faults_broker_stall_smoke(tmp_path: Path) -> None:
    """The broker stops answering for longer than the produce line's request timeout:
    the line hands what it had in flight to aiokafka (gateway/produceline.py), and
    nothing acked is lost, doubled, stored under another id or out of send order."""
    data = run_bench(
        "bench.faults",
        "faults",
        tmp_path,
        *("--scenarios", "broker-stall", "--rate", "40", "--convs", "4"),
        *("--members", "3", "--warmup", "1", "--baseline", "3", "--after", "6"),
    )
    (row,) = data["scenarios"]
    assert row["produce_line"]["handed_over_total"] > 0, row["produce_line"]
    assert row["lost"] == 0 and row["duplicated"] == 0 and row["stored"] == row["acked"] > 100
    assert row["id_mismatch"] == 0 and row["inversions_first_try"] == 0, row["examples"]
    assert all(t["reached"] for t in data["targets"].values()), data["targets"]


def test_faults_worker_kill_smoke(tmp_path: Path) -> None:
    """The kill of the supervised worker: its supervisor logs the child's exit at ERROR,
    which is the fault itself; the run must not fail on it (it did, after every number
    was in: bench_stack fails a run on an undeclared ERROR line)."""
    data = run_bench(
        "bench.faults",
        "faults",
        tmp_path,
        *("--scenarios", "worker-kill", "--rate", "40", "--convs", "4"),
        *("--members", "3", "--warmup", "1", "--baseline", "3", "--after", "6"),
    )
    (row,) = data["scenarios"]
    assert row["scenario"] == "worker-kill" and row["worker_restarts"] == 1, row
    assert row["lost"] == 0 and row["duplicated"] == 0 and row["stored"] == row["acked"] > 100


def test_sequencer_smoke(tmp_path: Path) -> None:
    data = run_bench(
        "bench.sequencer",
        "sequencer",
        tmp_path,
        *("--batches", "10", "--rounds", "2", "--warmup", "2", "--sizes", "1,3"),
    )
    rows = {(r["size"], r["path"]): r for r in data["rows"]}
    assert set(rows) == {(s, p) for s in (1, 3) for p in ("transaction", "one statement")}
    for r in rows.values():
        assert r["batches"] == 20
        assert r["client_cpu_ms"] > 0 and r["pg_cpu_ms"] > 0 and r["wall_ms"] > 0
    assert "cheaper" in data["targets"]


def test_sends_smoke() -> None:
    """bench.sends prints one JSON line (no results file): lone sends, all acked."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_")}
    cmd = [sys.executable, "-m", "bench.sends", "--sends", "60", "--warmup", "20", "--rate", "100"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["acked"] == 60 and out["errors"] == 0, out
    assert out["us_per_send"]["gateway"] > 0 and out["ack_ms_p50"] > 0, out
