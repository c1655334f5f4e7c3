"""The engine and its scheduler in a process of their own (the default on a GPU; LSGPT_ENGINE_PROCESS=0/1 or the
config parameter `engine_process` auto/true/false decide it), so that the decode loop stops sharing the GIL with
Triton's request thread and the send lanes.

Why: at 256 streams on the H100 the model process's GIL was held ~93% of the time (py-spy --gil) and a served
decode step took 2.2 ms against 1.3 ms for the same scheduler in process (results/h100/serving/2026-12-07-s14/).
vLLM's engine core runs apart from its API server for the same reason.

    stub process (Triton's)                         engine process (python -m lsgpt.serving.engine_process FD)
    execute -> EngineProcess.submit --submit-->     Scheduler.submit (the same Scheduler as in process)
    on_token / on_done <-- receiver <--events--     a flusher sends each step's tokens and ends in one message
    cancellation flags --canceller--cancel-->       the request's flag, read by the scheduler each token

EngineProcess has the Scheduler API the served model uses (validate, submit, stop_admitting, close, stats,
running, queued, max_rows, prefill_tokens, admit_every). A request is checked in the stub, with the engine's own
config and suppress set, so a bad one still gets its RequestError at once; QueueFull, Draining and ShuttingDown
come back through on_done. The engine process ends with the stub (PR_SET_PDEATHSIG, and at the end of its pipe);
if it ends first, every live request fails and `on_lost` is called (the served model then ends its process, as a
stalled send does: Triton and the launcher see a dead model, not a hung one).
"""

from __future__ import annotations

import collections
import functools
import itertools
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

FLUSH_S = 0.002  # the flusher's longest wait for events it was not woken for
STATS_S = 0.25  # how often the engine process sends its counters
CANCEL_POLL_S = 0.005  # how often the stub reads its live requests' cancellation flags
START_TIMEOUT_S = 900.0  # load, warm-up and CUDA graph capture


def python_executable() -> str:
    """The Python the engine process runs: $LSGPT_PYTHON (the launcher's interpreter), else this process's when it
    is a Python (inside Triton's stub it is the stub binary), else python3 on PATH."""
    exe = os.environ.get("LSGPT_PYTHON") or ""
    if exe:
        return exe
    if Path(sys.executable or "").name.startswith("python"):
        return sys.executable
    return shutil.which("python3") or "python3"


@dataclass
class _Live:
    on_done: Callable
    on_token: Callable | None
    cancelled: Callable[[], bool] | None
    cancel_sent: bool = False


class EngineProcess:
    """The stub's side: starts the engine process, forwards requests and cancellations, delivers its events.
    `tokenizer`: what the model's tokenizer was loaded from (lsgpt.text.load_tokenizer), or None; the engine
    process loads it the same way, so its suppress set is the one an in-process engine would have."""

    def __init__(self, hdf5: str | os.PathLike, device: str, tokenizer: str | None, max_rows: int | str, max_queue: int,
                 prefill_tokens: int | None, admit_every: int | None, on_lost: Callable[[str], None] | None = None,
                 start_timeout: float = START_TIMEOUT_S):
        from lsgpt.engine.scheduler import Stats

        mine, theirs = socket.socketpair()
        env = dict(os.environ)
        root = os.environ.get("LSGPT_ROOT") or str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen([python_executable(), "-m", "lsgpt.serving.engine_process", str(theirs.fileno())],
                                     pass_fds=(theirs.fileno(),), env=env)
        theirs.close()
        self.conn = Connection(mine.detach())
        self._send_lock = threading.Lock()
        try:
            self._send(dict(hdf5=str(hdf5), device=device, tokenizer=tokenizer, max_rows=max_rows,
                            max_queue=max_queue, prefill_tokens=prefill_tokens, admit_every=admit_every))
            msg = self._ready(start_timeout)
        except BaseException as e:  # a child that is not there or not right: none left behind
            self.proc.kill()
            self.proc.wait(10)
            self.conn.close()
            if isinstance(e, (OSError, EOFError)):
                raise RuntimeError(f"the engine process ended before it started (exit {self.proc.poll()}, "
                                   f"{python_executable()}); its error is in the server log") from e
            raise
        info = msg[1]
        self.config, self.suppress, self.backend = info["config"], info["suppress"], info["backend"]
        self.max_batch_size = info["max_batch_size"]
        self.max_rows, self.prefill_tokens, self.admit_every = info["max_rows"], info["prefill_tokens"], info["admit_every"]
        self.stats = Stats()
        self.running = self.queued = 0
        self.on_lost = on_lost
        self._live: dict[int, _Live] = {}
        self._ids = itertools.count()
        self._draining = self._closing = False
        self._receiver = threading.Thread(target=self._receive, name="lsgpt-engine-rx", daemon=True)
        self._receiver.start()
        self._canceller = threading.Thread(target=self._watch_cancels, name="lsgpt-engine-cancel", daemon=True)
        self._canceller.start()

    def _ready(self, timeout: float) -> tuple:
        deadline = time.monotonic() + timeout
        while not self.conn.poll(0.5):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"the engine process ended or did not start within {timeout:.0f} s "
                                   f"(exit {self.proc.poll()}, {python_executable()}); its error is in the server log")
        msg = self.conn.recv()
        if msg[0] != "ready":
            self.proc.wait(10)
            raise RuntimeError(f"the engine process failed to start: {msg[1]}")
        return msg

    def _send(self, msg: Any) -> None:
        with self._send_lock:
            self.conn.send(msg)

    # -- the Scheduler's API --------------------------------------------------------------------------------

    def validate(self, prompts: Sequence[Sequence[int]], params) -> None:
        from lsgpt.engine.sampling import validate_batch

        validate_batch(self.config, prompts, params, self.suppress, self.max_batch_size)

    def submit(self, prompt: Sequence[int], params, on_done: Callable, on_token: Callable | None = None,
               cancelled: Callable[[], bool] | None = None) -> int:
        """Check the request here (RequestError at once), then queue it in the engine process; QueueFull,
        Draining and ShuttingDown arrive through on_done, as the request's answer."""
        from lsgpt.engine.sampling import validate_request
        from lsgpt.engine.scheduler import Draining, ShuttingDown

        sp = validate_request(self.config, prompt, params, suppress=self.suppress)
        if self._closing:
            raise ShuttingDown("the model is shutting down")
        if self._draining:
            raise Draining("the server is shutting down (draining): no new requests; retry on another replica or "
                           "later")
        rid = next(self._ids)
        self._live[rid] = _Live(on_done, on_token, cancelled)
        try:
            self._send(("submit", rid, [int(t) for t in prompt], sp, on_token is not None))
        except OSError as e:
            self._live.pop(rid, None)
            raise ShuttingDown(f"the engine process is gone ({e})") from None
        self.stats.requests += 1
        return rid

    def stop_admitting(self) -> None:
        self._draining = True
        try:
            self._send(("drain",))
        except OSError:
            pass

    def close(self, timeout: float = 10.0) -> None:
        """Stop the engine process; what it still holds ends with ShuttingDown (sent back before it exits), and
        anything not answered by then here."""
        from lsgpt.engine.scheduler import ShuttingDown

        self._closing = True
        try:
            self._send(("close",))
        except OSError:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self._receiver.join(timeout)
        self._fail_all(ShuttingDown("the model was unloaded before the request finished; retry"))

    # -- threads --------------------------------------------------------------------------------------------

    def _receive(self) -> None:
        while True:
            try:
                kind, payload = self.conn.recv()
            except (EOFError, OSError):
                break
            if kind == "events":
                self._deliver(payload)
            elif kind == "stats":
                self._update_stats(payload)
        if not self._closing:  # the engine process died under us
            from lsgpt.engine.scheduler import ShuttingDown

            why = f"the engine process ended unexpectedly (exit {self.proc.poll()})"
            self._fail_all(ShuttingDown(why))
            if self.on_lost is not None:
                self.on_lost(why)

    def _deliver(self, events: list[tuple]) -> None:
        for ev in events:
            if ev[0] == "t":
                live = self._live.get(ev[1])
                if live is not None and live.on_token is not None:
                    _call(live.on_token, ev[2])
            else:
                live = self._live.pop(ev[1], None)
                if live is not None:
                    _call(live.on_done, ev[2], ev[3])

    def _update_stats(self, snap: dict) -> None:
        st = self.stats
        for k, v in snap["counters"].items():
            if k != "requests":  # counted here, at submit
                setattr(st, k, v)
        st.ttft.extend(snap["ttft"])
        st.itl.extend(snap["itl"])
        self.running, self.queued = snap["running"], snap["queued"]

    def _watch_cancels(self) -> None:
        while not self._closing:
            for rid, live in list(self._live.items()):
                if live.cancelled is not None and not live.cancel_sent and live.cancelled():
                    live.cancel_sent = True
                    try:
                        self._send(("cancel", rid))
                    except OSError:
                        return
            time.sleep(CANCEL_POLL_S)

    def _fail_all(self, err: Exception) -> None:
        while self._live:
            try:
                _, live = self._live.popitem()
            except KeyError:
                break
            _call(live.on_done, None, err)


def _call(fn: Callable, *args) -> None:
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - a failing callback (client gone) must not stop the others
        import traceback

        traceback.print_exc()


# -- the engine process ---------------------------------------------------------------------------------------


class _Flag:
    """A request's cancellation flag in the engine process, set by the stub's cancel message."""

    __slots__ = ("hit",)

    def __init__(self):
        self.hit = False

    def __call__(self) -> bool:
        return self.hit


class _Outgoing:
    """Events from the scheduler's thread (one append each: it must not wait) to the stub, in one message per
    flush, and the scheduler's counters every STATS_S."""

    def __init__(self, conn: Connection, sched):
        self.conn, self.sched = conn, sched
        self.q: collections.deque = collections.deque()
        self.wake = threading.Event()
        self.stop = False
        self.thread = threading.Thread(target=self._run, name="lsgpt-engine-tx", daemon=True)
        self.thread.start()

    def tok(self, rid: int, tok: int) -> None:
        self.q.append(("t", rid, tok))
        if not self.wake.is_set():
            self.wake.set()

    def done(self, flags: dict, rid: int, ids, err) -> None:
        flags.pop(rid, None)
        self.q.append(("d", rid, ids, err))
        self.wake.set()

    def _run(self) -> None:
        last = 0.0
        while True:
            self.wake.wait(FLUSH_S)
            self.wake.clear()
            events = []
            while self.q:
                events.append(self.q.popleft())
            try:
                if events:
                    self.conn.send(("events", events))
                if time.monotonic() - last > STATS_S or (self.stop and not self.q):
                    last = time.monotonic()
                    self.conn.send(("stats", self._stats()))
            except OSError:
                return
            if self.stop and not self.q:
                return

    def _stats(self) -> dict:
        st = self.sched.stats
        counters = {f.name: getattr(st, f.name) for f in fields(st) if f.name not in ("ttft", "itl")}
        return {"counters": counters, "ttft": [st.ttft.popleft() for _ in range(len(st.ttft))],
                "itl": [st.itl.popleft() for _ in range(len(st.itl))], "running": self.sched.running,
                "queued": self.sched.queued}

    def close(self) -> None:
        self.stop = True
        self.wake.set()
        self.thread.join(10)


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the stub that started it dies (no orphan keeps the GPU)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - not Linux: the end of the pipe stops it instead
        pass


def serve(conn: Connection) -> int:
    """The engine process: load, report ready, then take requests until "close" or the end of the pipe."""
    from lsgpt.engine.engine import Engine
    from lsgpt.engine.scheduler import Scheduler, name_thread

    name_thread("lsgpt-engine")
    spec = conn.recv()
    try:
        vocab = None
        if spec["tokenizer"]:
            from lsgpt.text import load_tokenizer

            vocab = load_tokenizer(spec["tokenizer"])
        eng = Engine.load(spec["hdf5"], device=spec["device"], vocab=vocab)
        sched = Scheduler(eng, max_rows=spec["max_rows"], max_queue=spec["max_queue"],
                          prefill_tokens=spec["prefill_tokens"], admit_every=spec["admit_every"])
    except Exception as e:  # noqa: BLE001 - reported to the stub, which fails the model's load with it
        conn.send(("fatal", f"{type(e).__name__}: {e}"))
        return 1
    conn.send(("ready", {"config": eng.config, "suppress": eng.suppress, "backend": eng.backend,
                         "max_batch_size": eng.max_batch_size, "max_rows": sched.max_rows,
                         "prefill_tokens": sched.prefill_tokens, "admit_every": sched.admit_every}))
    out = _Outgoing(conn, sched)
    flags: dict[int, _Flag] = {}
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            break
        if msg[0] == "submit":
            _, rid, prompt, sp, stream = msg
            flags[rid] = flag = _Flag()
            done = functools.partial(out.done, flags, rid)
            try:
                sched.submit(prompt, sp, done, on_token=functools.partial(out.tok, rid) if stream else None,
                             cancelled=flag)
            except Exception as e:  # noqa: BLE001 - QueueFull, Draining, ShuttingDown, a RequestError: its answer
                done(None, e)
        elif msg[0] == "cancel":
            if (flag := flags.get(msg[1])) is not None:
                flag.hit = True
        elif msg[0] == "drain":
            sched.stop_admitting()
        elif msg[0] == "close":
            break
    sched.close()  # what is left: ShuttingDown, through `out`
    out.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _die_with_parent()
    return serve(Connection(int(argv[0])))


if __name__ == "__main__":
    sys.exit(main())
