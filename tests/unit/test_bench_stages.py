"""bench/stages.py: the stamps of a delivery joined into stages that add up to it."""

from __future__ import annotations

import json
from pathlib import Path

from bench.stages import attribute, read_rows, render

MS = 1_000_000
KEY = 1_700_000_000_000_000_000  # the send time a bench body starts with (ns)


Rows = list[tuple[str, str, int]]


def _stamps(key: int, produced: int, fetch_sent: int) -> tuple[Rows, Rows]:
    """A sending gateway's and a worker's stamps of one message (ms after its send)."""
    k = str(key)
    return [
        (k, "gw_recv", key + 1 * MS),
        (k, "produced", key + produced * MS),
        (k, "acked", key + (produced + 1) * MS),
    ], [
        (k, "fetch_sent", key + fetch_sent * MS),
        (k, "fetch_answered", key + 10 * MS),
        (k, "taken", key + 11 * MS),
        (k, "pg_sent", key + 12 * MS),
        (k, "pg_answered", key + 14 * MS),
        (k, "stored", key + 15 * MS),
        (k, "published", key + 16 * MS),
    ]


def test_stages_add_up_to_the_delivery_and_the_fetch_wait_is_split(tmp_path: Path) -> None:
    sender_a, worker_a = _stamps(KEY, produced=3, fetch_sent=5)  # waited for its fetch
    sender_b, worker_b = _stamps(KEY + 1, produced=3, fetch_sent=2)  # the fetch waited
    receiver = [
        (str(k), stage, k + at * MS)
        for k in (KEY, KEY + 1)
        for stage, at in (("gw_arrived", 17), ("gw_dispatch", 18), ("gw_written", 19))
    ]
    for pid, rows in ((10, sender_a + sender_b + receiver), (20, worker_a + worker_b)):
        (tmp_path / f"stages.{pid}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "stages.30.jsonl").write_text("")  # a process that stamped nothing
    received = {10: [(KEY, KEY + 20 * MS), (KEY + 1, KEY + 1 + 20 * MS), (KEY - 5, 0)]}
    result = attribute(read_rows(tmp_path), received, since_ns=KEY)
    assert result["deliveries"] == 2
    by = {s["stage"]: s for s in result["stages"]}
    assert by["produced -> the worker's fetch that took it is sent"]["mean_ms"] == 1.0
    assert by["that fetch at the broker (answered)"]["mean_ms"] == 6.0
    assert by["the statement and its commit (PostgreSQL)"]["p50_ms"] == 2.0
    assert round(sum(s["mean_ms"] for s in result["stages"]), 2) == result["total"]["mean_ms"]
    assert result["total"]["p50_ms"] == 20.0
    assert result["fetch_waited_for_record"] == 0.5
    # The server's part ends when the receiving gateway has written every local socket.
    assert result["server"] == {"p50_ms": 19.0, "p99_ms": 19.0, "mean_ms": 19.0}
    assert result["total"]["p99_ms"] == 20.0
    lines = render(result)
    assert "| client send -> every local socket written | 19.0 | 19.0 | 19.0 |" in lines
    assert "| **client send -> client receives** | **20.0** | **20.0** | **20.0** |" in lines


def test_the_tail_of_the_server_and_of_the_client_apart(tmp_path: Path) -> None:
    """100 messages: the gateway wrote each at 19 ms; the client read one of them 60 ms
    after that (its own backlog): the total's p99 is the client's, the server's is not."""
    keys = [KEY + i for i in range(100)]
    rows: Rows = []
    for k in keys:
        sender, worker = _stamps(k, produced=3, fetch_sent=5)
        rows += sender + worker
        rows += [(str(k), s, k + at * MS) for s, at in (("gw_arrived", 17), ("gw_dispatch", 18))]
        rows.append((str(k), "gw_written", k + 19 * MS))
    (tmp_path / "stages.1.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    received = {1: [(k, k + (80 if i == 99 else 20) * MS) for i, k in enumerate(keys)]}
    result = attribute(read_rows(tmp_path), received)
    assert result["server"]["p99_ms"] == 19.0
    assert result["total"]["p99_ms"] == 80.0
    by = {s["stage"]: s for s in result["stages"]}
    assert by["written -> client receives"]["p99_ms"] == 61.0


def test_a_delivery_missing_a_stamp_is_left_out(tmp_path: Path) -> None:
    sender, worker = _stamps(KEY, produced=3, fetch_sent=5)
    rows = sender + [r for r in worker if r[1] != "stored"]
    (tmp_path / "stages.1.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    result = attribute(read_rows(tmp_path), {1: [(KEY, KEY + 20 * MS)]})
    assert result == {"deliveries": 0, "stages": []}
    assert render(result) == ["(no delivery had every stamp)"]
