"""tests/stack.py's crash and error check, on real child processes (no engines): what it
reports, what it lets through, and that it names the process and shows its log."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import orjson

from tests.stack import Proc, bad_log_lines, check_procs


def child(tmp_path: Path, name: str, code: str) -> Proc:
    path = tmp_path / f"{name}.log"
    with open(path, "ab") as log:
        popen = subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT)
    return Proc(name, popen, log_path=path)


def wait_for_output(proc: Proc, text: str) -> None:
    deadline = time.monotonic() + 10
    while text not in proc.log_text():
        assert proc.alive() and time.monotonic() < deadline, proc.log_text()
        time.sleep(0.01)


def line(level: str, msg: str, **extra: str) -> str:
    return orjson.dumps({"level": level, "logger": "agora.x", "msg": msg, **extra}).decode()


def test_error_lines_and_tracebacks_are_found_unless_expected() -> None:
    import re

    lines = [
        line("INFO", "fine"),
        line("WARNING", "a warning is not a failure"),
        line("ERROR", "shard 1 unavailable"),
        line("INFO", "handled", exc="Traceback (most recent call last):\n  ValueError"),
        line("CRITICAL", "gone"),
        "Traceback (most recent call last):",
        '  File "x.py", line 1',
        "CoverageWarning: not a failure",
    ]
    assert len(bad_log_lines(lines, [])) == 4
    found = bad_log_lines(lines, [re.compile(r"shard \d unavailable"), re.compile("ValueError")])
    assert len(found) == 2
    assert "gone" in found[0] and "Traceback" in found[1]
    # The logger name is part of what an expectation is matched against.
    assert bad_log_lines([line("ERROR", "boom")], [re.compile(r"^agora\.x: boom")]) == []


def test_an_unexpected_exit_fails_and_the_report_shows_the_log(tmp_path: Path) -> None:
    proc = child(tmp_path, "crasher", "print('starting up'); raise SystemExit(3)")
    proc.popen.wait(10)
    watched = [proc]
    report = check_procs(watched)
    assert "'crasher'" in report and "exited unexpectedly with code 3" in report
    assert "starting up" in report
    assert watched == []  # an exited process is checked once, then no longer watched


def test_a_raw_traceback_fails_even_after_a_requested_stop(tmp_path: Path) -> None:
    code = (
        "import signal, sys, time\n"
        "def boom(*_): raise RuntimeError('crashed while stopping')\n"
        "signal.signal(signal.SIGTERM, boom)\n"
        "print('ready', flush=True)\n"
        "time.sleep(30)\n"
    )
    proc = child(tmp_path, "stopper", code)
    wait_for_output(proc, "ready")
    proc.stop(10)
    report = check_procs([proc])
    assert "exited with code 1 after SIGTERM" in report
    assert "RuntimeError: crashed while stopping" in report


def test_a_clean_stop_kill_or_expected_error_passes(tmp_path: Path) -> None:
    stopped = child(tmp_path, "clean", "import time; time.sleep(30)")
    stopped.stop(10)
    killed = child(tmp_path, "killed", "import time; time.sleep(30)")
    killed.kill()
    err = line("ERROR", "broker unreachable")
    noisy = child(tmp_path, "noisy", f"print({err!r}, flush=True)")
    noisy.expect_exit()
    noisy.expect_log("broker unreachable")
    noisy.popen.wait(10)
    assert check_procs([stopped, killed, noisy]) == ""


def test_errors_are_reported_once_and_only_this_process_s_part_of_the_log(
    tmp_path: Path,
) -> None:
    first = child(tmp_path, "same", f"print({line('ERROR', 'old run')!r})")
    first.expect_exit()
    first.popen.wait(10)
    code = f"import sys, time\nprint({line('ERROR', 'new run')!r}, flush=True)\ntime.sleep(30)\n"
    path = tmp_path / "same.log"
    with open(path, "ab") as log:
        start = log.tell()
        popen = subprocess.Popen([sys.executable, "-c", code], stdout=log)
    second = Proc("same", popen, log_path=path, log_start=start)
    try:
        wait_for_output(second, "new run")
        assert "old run" not in second.log_text()
        report = check_procs([second])
        assert "new run" in report and "old run" not in report.split("---")[0]
        assert check_procs([second]) == ""  # already reported
    finally:
        second.stop(10)
