"""Cancellation off the decode loop: CancelWatch asks Triton whether live requests are cancelled, from one thread;
each request's Watched flag is what the scheduler reads every token. Also the in-band cancel (contract.CANCEL),
honoured only with the key its request carried (contract.CANCEL_KEY): a request id is no secret (logs, traces,
and a client may choose it), so knowing one must not let anybody stop another client's request."""

from __future__ import annotations

import functools
import hmac
import threading
from typing import Any


class Watched:
    """One request's cancellation flag, kept up to date by CancelWatch; the scheduler calls it every token.

    ``is_cancelled()`` asks Triton about the request's response factory, which Triton frees once the FINAL response
    is sent, and does not guard a check that reaches it after that. So a check and the FINAL never overlap, and no
    check follows it: ``close()`` (taken before every FINAL is sent) waits for a check in flight and stops later
    ones."""

    __slots__ = ("check", "hit", "asked", "done", "lock", "on_close")

    def __init__(self, check: Any):
        self.check, self.hit, self.asked, self.done = check, False, False, False
        self.lock = threading.Lock()
        self.on_close: Any = None

    def __call__(self) -> bool:
        return self.hit or self.asked  # asked: an in-band cancel (contract.CANCEL) named this request

    def poll(self) -> None:
        """Ask Triton once, unless the request is finished (CancelWatch's thread)."""
        with self.lock:
            if self.done:
                return
            try:
                self.hit = bool(self.check())
            except Exception:  # noqa: BLE001 - the stub cannot reach the server: not a cancellation
                pass

    def close(self) -> None:
        """No more checks: the request's FINAL response may go now."""
        with self.lock:
            self.done = True
        if self.on_close is not None:
            self.on_close()


class CancelWatch:
    """``request.is_cancelled()`` is a round trip to the server process (the stub asks Triton and waits), so the
    decode loop does not ask it: one thread asks instead and sets a flag the loop reads for free. Every PERIOD s it
    asks the next few live requests in turn, at most RATE checks a second in all: the checks travel through the
    stub's one message thread to the server, which every response send shares too, so asking each of 256 running
    requests every 10 ms (25,600 round trips a second) would hold up the answers. A cancelled request leaves its
    row within max(PERIOD, live requests / RATE) s plus one step: 10 ms up to 20 requests, 128 ms at 256. A request watched
    under its request id and its owner's key can also be stopped in band (``ask``: contract.CANCEL with
    contract.CANCEL_KEY) until its FINAL is sent; one without a key only by cancelling its call."""

    PERIOD = 0.01
    RATE = 2000  # checks a second, all requests together

    def __init__(self, name: str):
        self._live: list[Watched] = []
        # running requests by request id (ids need not be unique): (the owner's key, its flag)
        self._named: dict[str, list[tuple[bytes, Watched]]] = {}
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=f"lsgpt-cancel-{name}", daemon=True)
        self._thread.start()

    def watch(self, check: Any, request_id: str = "", key: str = "") -> Watched:
        """The flag of a new request; with an id and a key, an in-band cancel naming both can set it."""
        w = Watched(check)
        with self._cv:
            if check is not None:
                self._live.append(w)
                self._cv.notify()
            if request_id and key:
                self._named.setdefault(request_id, []).append((key.encode(), w))
                w.on_close = functools.partial(self._forget, request_id, w)
        return w

    def ask(self, request_id: str, key: str) -> bool:
        """An in-band cancel: the running request of that id whose owner chose `key` (if any) leaves its row at the
        next step. Keys are compared in constant time; a wrong one changes nothing. -> whether one matched."""
        given = key.encode()
        with self._cv:
            hits = [w for k, w in self._named.get(request_id, ()) if hmac.compare_digest(k, given)]
        for w in hits:
            w.asked = True
        return bool(hits)

    def _forget(self, request_id: str, w: Watched) -> None:
        with self._cv:
            left = [(k, x) for k, x in self._named.get(request_id, ()) if x is not w]
            if left:
                self._named[request_id] = left
            else:
                self._named.pop(request_id, None)

    def _run(self) -> None:
        from lsgpt.engine.scheduler import name_thread

        name_thread("lsgpt-cancel")
        per_tick, turn = max(1, int(self.RATE * self.PERIOD)), 0
        while True:
            with self._cv:
                self._live = [w for w in self._live if not (w.done or w.hit)]
                while not self._stop and not self._live:
                    self._cv.wait()
                if self._stop:
                    return
                turn = turn if turn < len(self._live) else 0  # round robin over the live requests
                due = self._live[turn:turn + per_tick]
                turn += len(due)
            for w in due:
                w.poll()
            with self._cv:
                self._cv.wait_for(lambda: self._stop, self.PERIOD)

    def close(self, timeout: float = 2.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout)
