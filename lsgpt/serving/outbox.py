"""Outbox: the one thread that sends a model's responses, and the watchdog that ends a model whose sends stall."""

from __future__ import annotations

import faulthandler
import os
import queue
import signal
import sys
import threading
import time
import traceback
from typing import Any


class Outbox:
    """Responses leave through this one thread, in the order they were queued: ``ResponseSender.send`` is a
    synchronous round trip to the server process (the stub waits, GIL released, until Triton has taken the
    response), so the decode loop only queues a closure that builds and sends it. One FIFO keeps each request's
    responses in order (tokens, then the final one). Bounded: when the sends fall behind, the decode loop waits
    for room rather than queueing without limit.

    A send that has not returned after ``stall_report_s`` means the server no longer takes this model's
    messages: the stub says so in the server log with every thread's stack. After ``stall_exit_s`` it ends
    itself, as a dead stub is what Triton and the launcher detect: the model turns not ready and the launcher
    restarts the server; a wedged stub would stay "ready" and leave every request hanging. 0 turns the exit off."""

    def __init__(self, name: str, limit: int = 1024, stall_report_s: float = 30.0, stall_exit_s: float = 90.0,
                 exit_process: Any = None):
        self.name = name
        self._q: queue.Queue = queue.Queue(limit)
        self._since: float | None = None  # when the send in progress began
        self.stall_report_s, self.stall_exit_s = stall_report_s, stall_exit_s
        self._exit = exit_process or (lambda: os.kill(os.getpid(), signal.SIGKILL))
        self._thread = threading.Thread(target=self._run, name=f"lsgpt-outbox-{name}", daemon=True)
        self._thread.start()
        threading.Thread(target=self._watchdog, name=f"lsgpt-outbox-watch-{name}", daemon=True).start()

    def put(self, fn: Any) -> None:
        self._q.put(fn)

    def _run(self) -> None:
        from lsgpt.engine.scheduler import name_thread

        name_thread("lsgpt-outbox")
        while (fn := self._q.get()) is not None:
            self._since = time.monotonic()
            try:
                fn()
            except Exception:  # noqa: BLE001 - a failing send (client gone) must not stop the others
                traceback.print_exc()
            finally:
                self._since = None

    def _watchdog(self) -> None:
        reported = None
        period = min(5.0, self.stall_report_s / 4)
        while self._thread.is_alive():
            time.sleep(period)
            since = self._since
            stalled = 0.0 if since is None else time.monotonic() - since
            if stalled > self.stall_report_s and since != reported:
                reported = since
                print(f"[lsgpt] {self.name}: a response send has not returned for {stalled:.0f} s; the server no "
                      "longer takes this model's messages. Every thread's stack:", file=sys.stderr, flush=True)
                faulthandler.dump_traceback(all_threads=True)
            if self.stall_exit_s and stalled > self.stall_exit_s:
                print(f"[lsgpt] {self.name}: still stalled after {stalled:.0f} s: the model process ends itself so "
                      "that the model turns not ready and the launcher restarts the server", file=sys.stderr,
                      flush=True)
                self._exit()
                return

    def close(self, timeout: float = 5.0) -> None:
        """Send what is queued, then stop."""
        try:
            self._q.put(None, timeout=timeout)
        except queue.Full:  # sends stuck (the server process is gone): the daemon thread dies with the stub
            return
        self._thread.join(timeout)
