"""Where a served model's process spends its host time under load: py-spy samples the model's stub process
while a load level runs (``benchmarks.serving --py-spy SECONDS``; issue 29: a served step takes longer than the
same scheduler's in process). py-spy is a published binary (``pip install py-spy``); on the GPU machine it travels
in the pre-installed site tarball (benchmarks/gpu.sh). Sampling is non-blocking, so the process is not paused.

The summary counts samples of running threads (py-spy leaves idle ones out): the share of each thread, and the
functions of this project (frames under ``lsgpt/``) by the share of samples they are on the stack of, inclusive.
"""

from __future__ import annotations

import collections
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path


def binary() -> str | None:
    """$PY_SPY, else py-spy on PATH or beside this Python's packages (a --target install's bin/)."""
    found = os.environ.get("PY_SPY") or shutil.which("py-spy")
    if found:
        return found
    for d in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        if d and os.access(Path(d) / "bin" / "py-spy", os.X_OK):
            return str(Path(d) / "bin" / "py-spy")
    return None


def engine_child(pid: int) -> int | None:
    """The engine process a model's stub started (LSGPT_ENGINE_PROCESS=1: lsgpt/serving/engine_process.py), or None."""
    from lsgpt.serving.launcher import child_processes

    return next((c for c, argv in child_processes(pid).items() if "lsgpt.serving.engine_process" in argv), None)


def summarize(raw: str, top: int = 12) -> dict:
    """py-spy's raw (collapsed, --threads) output -> {"samples", "threads": {name: share}, "lsgpt": [[fn, share]]}."""
    threads: collections.Counter = collections.Counter()
    inclusive: collections.Counter = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = stack.split(";")
        name = frames[0].split(": ", 1)[-1]  # "thread (123): lsgpt-scheduler"
        total += int(n)
        threads[name] += int(n)
        # each of our functions once per sample, however deep it recurses
        for fn in {f.split(" (")[0] + " (" + f.rsplit("lsgpt/", 1)[-1].rsplit(":", 1)[0] + ")"
                   for f in frames[1:] if "lsgpt/" in f}:  # "Scheduler._step (engine/scheduler.py)": lines merged
            inclusive[fn] += int(n)
    share = lambda c: round(c / max(1, total), 3)  # noqa: E731
    return {"samples": total, "threads": {k: share(v) for k, v in threads.most_common()},
            "lsgpt": [[k, share(v)] for k, v in inclusive.most_common(top)]}


class Recording:
    """py-spy over `pid` for `seconds`, starting `delay` s from now (a load level's steady part), in a thread;
    `gil`: only the samples of the thread holding the GIL."""

    def __init__(self, pid: int, seconds: float, delay: float = 0.3, gil: bool = False):
        self.gil = gil
        self.path = Path(tempfile.mkdtemp(prefix="lsgpt-pyspy-")) / "raw.txt"
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, args=(pid, seconds, delay), daemon=True)
        self._thread.start()

    def _run(self, pid: int, seconds: float, delay: float) -> None:
        time.sleep(delay)
        cmd = [binary() or "py-spy", "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
               "--rate", "250", "--format", "raw", "--nonblocking", "--threads", "-o", str(self.path)] + ["--gil"] * self.gil
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30)
            if p.returncode:
                self.error = (p.stderr or p.stdout).strip()[-300:]
        except (OSError, subprocess.TimeoutExpired) as e:
            self.error = str(e)

    def summary(self, timeout: float = 40.0) -> dict:
        self._thread.join(timeout)
        try:
            if self.error or not self.path.is_file():
                return {"error": self.error or "py-spy wrote nothing"}
            return summarize(self.path.read_text())
        finally:  # the temporary folder goes on the error path too
            shutil.rmtree(self.path.parent, ignore_errors=True)
