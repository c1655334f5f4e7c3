"""Outbox: the threads that send a model's responses, and the watchdog that ends a model whose sends stall."""

from __future__ import annotations

import faulthandler
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any


class Outbox:
    """Responses leave through these threads: ``ResponseSender.send`` is a synchronous round trip to the server
    process (the stub waits, GIL released, until Triton has taken the response), so the decode loop only queues a
    closure that builds and sends it. Each request keeps to one thread (``put``'s `lane`), whose FIFO keeps its
    responses in order (tokens, then the final one); several lanes keep several round trips in flight, as the server
    side takes sends on a thread pool: one lane caps a model at one send per round trip (~7k streamed tokens a
    second on an H200). Bounded: when the sends fall behind, the decode loop waits for room rather than queueing
    without limit.

    A send that has not returned after ``stall_report_s`` means the server no longer takes this model's
    messages: the stub says so in the server log with every thread's stack. After ``stall_exit_s`` it ends
    itself, as a dead stub is what Triton and the launcher detect: the model turns not ready and the launcher
    restarts the server; a wedged stub would stay "ready" and leave every request hanging. 0 turns the exit off."""

    def __init__(self, name: str, limit: int = 1024, stall_report_s: float = 30.0, stall_exit_s: float = 90.0,
                 exit_process: Any = None, lanes: int = 1):
        self.name = name
        self._qs: list[queue.Queue] = [queue.Queue(max(1, limit // lanes)) for _ in range(lanes)]
        self._since: list[float | None] = [None] * lanes  # when each lane's send in progress began
        self.stall_report_s, self.stall_exit_s = stall_report_s, stall_exit_s
        self._exit = exit_process or (lambda: os.kill(os.getpid(), signal.SIGKILL))
        self._threads = [threading.Thread(target=self._run, args=(i,), name=f"lsgpt-outbox-{name}-{i}", daemon=True)
                         for i in range(lanes)]
        for t in self._threads:
            t.start()
        threading.Thread(target=self._watchdog, name=f"lsgpt-outbox-watch-{name}", daemon=True).start()

    def put(self, fn: Any, lane: int = 0) -> None:
        """Queue a send; the sends of one `lane` (any int: one per request) leave in the order they were queued."""
        self._qs[lane % len(self._qs)].put(fn)

    def _run(self, lane: int) -> None:
        from lsgpt.engine.scheduler import name_thread

        name_thread("lsgpt-outbox")
        q = self._qs[lane]
        while (fn := q.get()) is not None:
            self._since[lane] = time.monotonic()
            try:
                fn()
            except Exception:  # noqa: BLE001 - a failing send (client gone) must not stop the others
                traceback.print_exc()
            finally:
                self._since[lane] = None

    def _watchdog(self) -> None:
        reported = None
        period = min(5.0, self.stall_report_s / 4)
        while any(t.is_alive() for t in self._threads):
            time.sleep(period)
            started = [t for t in self._since if t is not None]
            since = min(started) if started else None  # the oldest send in progress
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
        end = time.monotonic() + timeout
        for q in self._qs:
            try:
                q.put(None, timeout=max(0.01, end - time.monotonic()))
            except queue.Full:  # sends stuck (the server process is gone): the daemon threads die with the stub
                return
        for t in self._threads:
            t.join(max(0.01, end - time.monotonic()))


class TokenStream:
    """One stream's tokens on their way out. The decode loop adds a token a step; the stream's lane sends what has
    gathered since its last send in one response. While the lane keeps up, that is one token a response; when a
    send takes longer than a step (many streams, one round trip each), the tokens that arrived meanwhile leave
    together, so a slow send delays the stream once instead of throttling the decode loop once per token.
    A stream has at most one send queued: its lane's queue holds a step's worth of streams, not of tokens."""

    def __init__(self, outbox: Outbox, lane: int, send: Callable[[list[int]], None]):
        self._outbox, self._lane, self._send = outbox, lane, send
        self._lock = threading.Lock()
        self._tokens: list[int] = []
        self._queued = False  # a flush is in the lane's queue and has not yet taken the tokens

    def add(self, tok: int) -> None:
        """On the decode loop."""
        with self._lock:
            self._tokens.append(tok)
            if self._queued:
                return  # the queued flush will take this one too
            self._queued = True
        self._outbox.put(self._flush, lane=self._lane)

    def _flush(self) -> None:
        """On the lane: what has gathered, in one send (a later put on the lane, the final response, comes after)."""
        with self._lock:
            tokens, self._tokens, self._queued = self._tokens, [], False
        if tokens:
            self._send(tokens)
