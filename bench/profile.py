"""py-spy around a benchmark's measured phase, and a text summary of what dominates.

`Profiler(pid, path).start()` runs `py-spy record --format raw` (collapsed stacks, which
speedscope and flamegraph.pl both open) on a gateway process; `stop()` ends it with SIGINT,
which makes py-spy write its file, and returns `summarize(path)`: the functions and the
packages holding the most samples, by self time and by inclusive time.

    python -m bench.profile FILE.txt     # summarize a recorded file again
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*)\)$")


def py_spy() -> str | None:
    venv = Path(sys.executable).parent / "py-spy"
    if venv.exists():
        return str(venv)
    return shutil.which("py-spy")


class Profiler:
    def __init__(
        self, pid: int, path: Path, rate: int = 200, native: bool = False, gil: bool = False
    ) -> None:
        self.pid = pid
        # Only samples holding the GIL: uvloop waits for events without it, so these are
        # the samples running Python (a process preempted while running still counts).
        self.gil = gil
        self.path = path
        self.rate = rate
        self.native = native
        self._proc: subprocess.Popen[bytes] | None = None
        self._started = 0.0
        self.error: str | None = None

    def start(self) -> Profiler:
        exe = py_spy()
        if exe is None:
            self.error = "py-spy not installed (pip install py-spy)"
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)  # never summarize an older run's file
        cmd = [exe, "record", "--pid", str(self.pid), "--format", "raw", "--nolineno"]
        cmd += ["--rate", str(self.rate), "-o", str(self.path)]
        # --native needs to pause the process per sample; otherwise sample without pausing.
        cmd.append("--native" if self.native else "--nonblocking")
        if self.gil:
            cmd.append("--gil")
        self._proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
        )
        self._started = time.monotonic()
        return self

    def stop(self) -> dict[str, Any]:
        if self._proc is None:
            return {"error": self.error or "not started"}
        seconds = time.monotonic() - self._started
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)
        try:
            _, err = self._proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            _, err = self._proc.communicate()
        if not self.path.exists():
            return {"error": f"py-spy wrote nothing: {err.decode(errors='replace')[-500:]}"}
        out = summarize(self.path)
        out["seconds"] = round(seconds, 2)
        # Busy share: py-spy skips idle samples, so samples / (rate x seconds) ~ CPU share.
        out["busy"] = round(out["samples"] / max(1.0, self.rate * seconds), 3)
        out["file"] = str(self.path)
        return out


def _parse(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [f for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        stacks.append((frames, int(count)))
    return stacks


def _package(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    file = m.group("file")
    if file.startswith("<"):
        return file
    top = file.replace("\\", "/").split("/")[0]
    return top.removesuffix(".py")


def _func(frame: str) -> str:
    return frame.strip()


def summarize(path: Path, top: int = 25) -> dict[str, Any]:
    """Top functions by self and inclusive samples, and packages by self samples (%)."""
    stacks = _parse(path)
    total = sum(c for _, c in stacks)
    self_c: Counter[str] = Counter()
    incl_c: Counter[str] = Counter()
    pkg_c: Counter[str] = Counter()
    for frames, count in stacks:
        if not frames:
            continue
        leaf = _func(frames[-1])
        self_c[leaf] += count
        pkg_c[_package(frames[-1])] += count
        for f in {_func(f) for f in frames}:
            incl_c[f] += count

    def pct(counter: Counter[str], n: int) -> list[list[Any]]:
        return [[k, round(100 * v / max(1, total), 1)] for k, v in counter.most_common(n)]

    return {
        "samples": total,
        "self_pct": pct(self_c, top),
        "inclusive_pct": pct(incl_c, top),
        "package_self_pct": pct(pkg_c, 15),
    }


def render(summary: dict[str, Any], top: int = 12) -> str:
    """Markdown lines for RESULTS.md."""
    if "error" in summary:
        return f"profile: {summary['error']}"
    lines = [
        f"py-spy: {summary['samples']:,} samples over {summary.get('seconds', 0)} s "
        f"(busy ~{100 * summary.get('busy', 0):.0f}% of one core), "
        f"file `{Path(str(summary.get('file', ''))).name}`",
        "",
        "by package (self): " + ", ".join(f"{k} {v}%" for k, v in summary["package_self_pct"][:8]),
        "",
        "| self % | function | | inclusive % | function |",
        "|---:|---|---|---:|---|",
    ]
    selfs = summary["self_pct"][:top]
    incls = summary["inclusive_pct"][:top]
    for i in range(max(len(selfs), len(incls))):
        s = selfs[i] if i < len(selfs) else ["", ""]
        c = incls[i] if i < len(incls) else ["", ""]
        lines.append(f"| {s[1]} | `{s[0]}` | | {c[1]} | `{c[0]}` |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    summary = summarize(args.file, args.top)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(render(summary, args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
