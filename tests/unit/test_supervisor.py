"""fanout.supervisor.supervise in a real process with real forked children (no engines: the
children only exit). The restart backoff's pure logic is in test_faults_logic.py."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable


def _signalled_when(script: str, ready: Callable[[str], bool]) -> tuple[int, str]:
    """Run `script`, send it SIGTERM once its output so far satisfies `ready`; its exit
    code and whole output. A watchdog ends the read if `ready` never comes."""
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    watchdog = threading.Timer(30, proc.kill)
    watchdog.start()
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        for line in proc.stdout:
            lines.append(line)
            if ready("".join(lines)):
                break
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, "".join(lines) + out


def test_a_child_that_fails_is_restarted_and_one_that_stops_on_purpose_is_not() -> None:
    # Child 0 fails on its first run and stops cleanly on its second; child 1 stops
    # cleanly at once. The supervisor restarts only the failed one, then, with every
    # child stopped on purpose, returns 0 by itself.
    script = textwrap.dedent(
        """
        import logging, sys
        from fanout.supervisor import supervise

        def target(index: int, restarts: int) -> None:
            if index == 0 and restarts == 0:
                sys.exit(3)

        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
        sys.exit(supervise(target, 2, "t", restart_max_s=5))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert out.count("t worker 0 started") == 2 and out.count("t worker 1 started") == 1
    assert "t worker 0 (pid" in out and "exited with 3" in out and "(restart 1)" in out
    assert out.count("stopped") == 2, out


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace() -> None:
    # The grace is shortened for the test (it is 20 s); the child ignores SIGTERM and
    # hangs, as a worker stuck in a call would.
    script = textwrap.dedent(
        """
        import logging, signal, sys, time
        from fanout import supervisor

        def target(index: int, restarts: int) -> None:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            print("child ready", flush=True)
            time.sleep(60)

        supervisor.STOP_GRACE_S = 0.5
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
        sys.exit(supervisor.supervise(target, 1, "t", restart_max_s=5))
        """
    )
    code, out = _signalled_when(script, lambda seen: "child ready" in seen)
    assert code == 0, out
    assert "t worker 0 did not stop; killing it" in out


def test_a_stop_while_a_failed_child_waits_for_its_restart_stops_the_rest_and_no_restart() -> None:
    # Child 0 fails at once and waits (30 s, set long for the test) for its restart; child
    # 1 runs. SIGTERM then: child 1 is stopped, child 0 is not signalled (it is gone) nor
    # restarted, and the supervisor returns 0 without waiting out the restart.
    script = textwrap.dedent(
        """
        import logging, sys, time
        from fanout import supervisor

        def target(index: int, restarts: int) -> None:
            if index == 0:
                sys.exit(3)
            print("child 1 ready", flush=True)
            time.sleep(60)

        supervisor.FIRST_RESTART_S = 30
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
        sys.exit(supervisor.supervise(target, 2, "t", restart_max_s=60))
        """
    )
    code, everything = _signalled_when(
        script, lambda seen: "child 1 ready" in seen and "restarting in 30.0s" in seen
    )
    assert code == 0, everything
    assert "restarting in 30.0s" in everything
    assert everything.count("t worker 0 started") == 1  # never restarted
    assert "did not stop" not in everything
