"""fanout.supervisor.supervise in a real process with real forked children (no engines: the
children only exit). The restart backoff's pure logic is in test_faults_logic.py."""

from __future__ import annotations

import subprocess
import sys
import textwrap


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
