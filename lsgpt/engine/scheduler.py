"""In-flight (continuous) batching over one Engine: what a served model runs.

Requests join the running batch at the next decode step (their prompt prefilled into a free slot of a
fixed KV cache) and leave it the step they finish, so a short request never waits for a long one. Each row
keeps its own sampling parameters, seed and penalties: its output is what ``Engine.generate`` gives it alone.

    sched = Scheduler(engine, max_rows=32, max_queue=256)
    sched.submit(prompt_ids, SamplingParams(...), on_done=lambda ids, err: ..., on_token=..., cancelled=...)
    sched.close()

One thread owns the engine. Per loop: admit queued requests into free slots (prefill, first token), under a
budget of prefill_tokens padded tokens (a longer prompt is prefilled in chunks over several loops, straight into
its slot's cache row, and joins after its last), then one decode step over slots [0, n) — n the smallest graph
bucket (1, 2, 4, ... max_rows) that covers the busiest slot; free slots in it compute harmlessly, since a new
occupant writes its keys before it reads them. On
CUDA every bucket's step is captured as a CUDA graph at start-up, while the cache is still empty, and so is the
prefill of each (prompts, tokens) bucket a group of whole prompts pads up to (LSGPT_PREFILL_GRAPHS=0: eager); a
step's tokens — and a prefill's first tokens — are read back while the next step runs (the host never leaves
the GPU idle between steps, and a prefill never waits for the GPU).
The running set: max_rows, or "auto" (sized from the free GPU memory: running_rows). Bounded: ``submit`` raises
``QueueFull`` beyond ``max_queue`` waiting requests; a cancelled request (``cancelled()`` true) leaves its slot
within one step; ``stop_admitting`` (a drain) refuses new requests with
``Draining`` while the others finish; ``close`` fails what is left with ``ShuttingDown``.
"""

from __future__ import annotations

import collections
import heapq
import math
import os
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from lsgpt.engine.engine import Engine, GraphedDecode, GraphedPrefill, prefill_views
from lsgpt.engine.model import KVCache
from lsgpt.engine.sampling import Penalties, SamplingParams, row_finished, sample, validate_request


def name_thread(name: str) -> None:
    """Give the calling thread its OS name (Linux, 15 characters): top -H, py-spy and the serving benchmark's
    per-thread CPU accounting then tell the scheduler's threads apart. Best effort."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except Exception:  # noqa: BLE001 - not Linux, no libc: the name is cosmetic
        pass


class QueueFull(RuntimeError):
    """More requests are waiting than the scheduler accepts (retry later)."""


class ShuttingDown(RuntimeError):
    """The scheduler stopped before the request finished (retry on another replica or later)."""


class Draining(ShuttingDown):
    """The server is draining (SIGTERM): running and queued requests finish, new ones are refused (retry
    elsewhere or later)."""


class Cancelled(RuntimeError):
    """The caller cancelled the request."""


Done = Callable[[list[int] | None, Exception | None], None]
IDLE = SamplingParams(top_k=1, top_p=1.0, seed=0)  # what a free slot "samples" with: greedy, no penalty
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # running-set sizes "auto" picks from (decode graph buckets)
AUTO_MAX_ROWS = 256  # beyond it a step's rows no longer pay (the H100 knee, issue 29)
AUTO_KV_FRACTION = 0.4  # of the free GPU memory at start-up, for one model's KV cache (4 models share a GPU)
CPU_ROWS = 32  # "auto" on the CPU: an fp32 cache of 256 rows x 1024 steps would be GBs, and a CPU step is linear in rows
PREFILL_TOKENS = {"cuda": 2048, "cpu": 512}  # default token budget of one loop's prefill (docs/decisions.md)
ADMIT_EVERY = {"cuda": 16, "cpu": 8}  # default decode steps between admissions while rows run
# Decode steps queued on the GPU ahead of the host reading their tokens back (CUDA; the CPU computes in place: 1).
# With 1, the host must read step n and launch step n+2 within step n+1's GPU time, or the GPU idles; a served
# model's scheduler thread shares the GIL with request intake and response sends, and a wait for it longer than a
# step idled the GPU. Each step ahead lets the host fall one step further behind, for one more step a finished
# row keeps its slot. LSGPT_DECODE_AHEAD overrides it.
DECODE_AHEAD = {"cuda": 1, "cpu": 1}
MAX_GROUP = 32  # prompts prefilled in one forward at most (bounds the warm-up's shapes)
GRAPH_MIN_T = 16  # the shortest prompt length a prefill graph is captured for (the next: 32, 64, ... the budget)


def pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def kv_rows(free_bytes: int, n_layer: int, max_step: int, hidden: int, elem_bytes: int,
            fraction: float = AUTO_KV_FRACTION, cap: int = AUTO_MAX_ROWS) -> int:
    """The largest bucket of ROW_BUCKETS (<= cap) whose KV cache, n_layer x 2 (k, v) x rows x max_step x hidden
    x elem_bytes, fits `fraction` of `free_bytes`; 1 when none does."""
    per_row = n_layer * 2 * max_step * hidden * elem_bytes
    fits = [b for b in ROW_BUCKETS if b <= cap and b * per_row <= fraction * free_bytes]
    return max(fits, default=1)


def running_rows(engine: Engine, setting: int | str = "auto", fraction: float = AUTO_KV_FRACTION) -> int:
    """max_running_rows: an integer as given, or "auto": on CUDA sized from the free GPU memory (kv_rows), on
    the CPU CPU_ROWS."""
    if str(setting).strip().lower() != "auto":
        rows = int(setting)
        if rows < 1:
            raise ValueError(f"max_running_rows must be >= 1 or auto, not {setting!r}")
        return rows
    if engine.device.type != "cuda":
        return CPU_ROWS
    free, _ = torch.cuda.mem_get_info(engine.device)
    c = engine.config
    elem = engine.model.new_cache(1, 1).k[0].element_size()
    return kv_rows(free, c.n_layer, c.max_step, c.hidden, elem, fraction)


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams  # resolved (seed fixed)
    on_done: Done  # (prompt + continuation, None) or (None, error); called exactly once
    on_token: Callable[[int], None] | None = None  # each new token, as it is generated
    cancelled: Callable[[], bool] | None = None
    limit: int = 0  # total length at which the row stops
    tokens: list[int] = field(default_factory=list)
    slot: int = -1
    submitted: float = 0.0
    first_token: float | None = None
    last: float = 0.0  # when its latest token came
    prefilled: int = 0  # prompt tokens already in its slot's cache (a prompt over the budget goes in chunks)


@dataclass
class Stats:
    """Counters and gauges for metrics (read without the lock: approximate by design)."""

    requests: int = 0
    prefills: int = 0  # prefill forwards (the requests admitted together share one; a chunk is one)
    chunks: int = 0  # of which chunks of prompts longer than the prefill budget
    steps: int = 0  # decode steps
    prefill_s: float = 0.0  # host time in prefills (incl. their first-token sync) and in decode steps
    step_s: float = 0.0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    rejected: int = 0
    cancelled: int = 0
    failed: int = 0
    ttft: collections.deque = field(default_factory=collections.deque)  # seconds; the metrics exporter drains
    itl: collections.deque = field(default_factory=collections.deque)  # them (deque: thread-safe popleft)


class Scheduler:
    def __init__(self, engine: Engine, max_rows: int | str = 32, max_queue: int = 256,
                 prefill_tokens: int | None = None, admit_every: int | None = None, ahead: int | None = None):
        """max_rows: the running set (an integer, or "auto": `running_rows`); prefill_tokens: the padded tokens
        one loop iteration may prefill (None: PREFILL_TOKENS of the device; a longer prompt goes in chunks);
        admit_every: decode steps between admissions while rows run (None: ADMIT_EVERY of the device); ahead:
        decode steps launched before the oldest one's tokens are read back (None: $LSGPT_DECODE_AHEAD, else
        DECODE_AHEAD of the device)."""
        max_rows = running_rows(engine, max_rows)
        self.engine, self.max_rows, self.max_queue = engine, max_rows, max_queue
        c, m, dev = engine.config, engine.model, engine.device
        kind = "cuda" if dev.type == "cuda" else "cpu"
        self.prefill_tokens = int(prefill_tokens or PREFILL_TOKENS[kind])
        self.admit_every = int(admit_every or ADMIT_EVERY[kind])
        env_ahead = os.environ.get("LSGPT_DECODE_AHEAD", "").strip()
        self.ahead = ahead or (int(env_ahead) if env_ahead.isdigit() else -1 if env_ahead else DECODE_AHEAD[kind])
        if self.prefill_tokens < 1 or self.admit_every < 1 or self.ahead < 1:
            raise ValueError(f"prefill_tokens, admit_every and ahead must be >= 1 (LSGPT_DECODE_AHEAD="
                             f"{env_ahead!r}: a whole number of decode steps >= 1)")
        self._chunking: Request | None = None  # the prompt being prefilled in chunks (its slot taken, not decoded)
        # CUDA: groups of whole prompts prefill through CUDA graphs captured per (prompts, tokens) bucket, padded
        # up to it; their padding rows write cache row max_rows (the sink), which no decode step reads
        self.graphed_prefill = (engine.cuda_graphs and engine.fused is not None
                                and os.environ.get("LSGPT_PREFILL_GRAPHS", "1") != "0")
        self.sink = max_rows
        self.cache: KVCache = m.new_cache(max_rows + self.graphed_prefill, c.max_step)
        self.prefill_graphs: dict[tuple[int, int], GraphedPrefill] = {}
        self.tok = torch.zeros(max_rows, dtype=torch.long, device=dev)  # each slot's last token
        self.pos = torch.zeros(max_rows, dtype=torch.long, device=dev)  # and its position
        self.rows: list[Request | None] = [None] * max_rows
        self.free = list(range(max_rows))  # heap: the lowest free slot first keeps the batch compact
        self.idle = replace(IDLE, suppress=engine.suppress)  # as the running rows: one suppress set, one fill
        self.params = [self.idle] * max_rows
        # kept as rows join and leave, so that a step needs no pass over every row to find them: the busiest
        # occupied slot, the slots that sample (not greedy), and the rows whose suppress set is not the engine's
        self._top = -1
        self._drawn: set[int] = set()
        self._own_suppress = 0
        self.pen = Penalties.neutral(max_rows, c.vocab, dev)  # a free slot's penalties are neutral
        self.buckets = [b for b in (*ROW_BUCKETS, 512) if b < max_rows] + [max_rows]
        self.graphs: dict[int, GraphedDecode] = {}
        self._penalized = 0  # running rows with a penalty
        if engine.fused is not None and dev.type == "cuda":
            self._warm_up()  # (and the prefill graphs' capture)
        if engine.cuda_graphs:  # capture now: capture writes slot 0..n-1 at position 0, harmless only while empty
            for n in self.buckets:
                self.graphs[n] = engine.capture_decode(self._prefix(n), n)
        # tokens of the latest steps, read back while the next `ahead` steps run (CUDA: pinned buffers + an event)
        self._cuda = cuda = dev.type == "cuda"
        self._host = [torch.zeros(max_rows, dtype=torch.long, pin_memory=cuda) for _ in range(self.ahead + 1)]
        self._flip = 0
        self._pending: collections.deque[tuple] = collections.deque()  # (host tokens, n, event, rows at launch)
        self._firsts: list[tuple] = []  # (host tokens, event, requests) of prefills not yet read back
        self.defer_first = cuda  # a prefill's first tokens read back after the next step is queued (CUDA: no wait)
        self._since_admit = 0
        self.stats = Stats()
        self._queue: collections.deque[Request] = collections.deque()
        self._cv = threading.Condition()
        self._stop = False
        self._draining = False  # stop_admitting(): submit refuses, what is queued or running goes on
        self._thread = threading.Thread(target=self._loop, name="lsgpt-scheduler", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------------------------------------
    # API (any thread)

    def validate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]) -> None:
        """Check a whole request of several rows before any is submitted (RequestError names the first problem):
        a bad row then queues none of its batch-mates. `submit` checks its one row again, with the same rules."""
        self.engine.validate(prompts, params)

    def submit(self, prompt: Sequence[int], params: SamplingParams, on_done: Done,
               on_token: Callable[[int], None] | None = None, cancelled: Callable[[], bool] | None = None) -> Request:
        """Queue one request; RequestError (bad request: the one complete check, lsgpt.engine.sampling.validate_request),
        QueueFull or ShuttingDown raised here, nothing queued."""
        sp = validate_request(self.engine.config, prompt, params, suppress=self.engine.suppress)
        prompt = [int(t) for t in prompt]
        limit = sp.length_limit(self.engine.config, len(prompt))
        req = Request(prompt, sp, on_done, on_token, cancelled, limit, list(prompt), submitted=time.monotonic())
        with self._cv:
            if self._stop:
                raise ShuttingDown("the model is shutting down")
            if self._draining:
                raise Draining("the server is shutting down (draining): no new requests; retry on another "
                               "replica or later")
            if len(self._queue) >= self.max_queue:
                self.stats.rejected += 1
                raise QueueFull(f"{len(self._queue)} requests are already waiting (max_queued_requests="
                                f"{self.max_queue}); retry later")
            self._queue.append(req)
            self.stats.requests += 1
            self._cv.notify()
        return req

    def generate(self, prompt: Sequence[int], params: SamplingParams = SamplingParams(),  # noqa: B008 (frozen)
                 timeout: float | None = None) -> list[int]:
        """Blocking convenience (tests, scripts): prompt + continuation, or the request's error raised."""
        box: dict = {}
        ev = threading.Event()

        def done(ids, err):
            box["ids"], box["err"] = ids, err
            ev.set()

        self.submit(prompt, params, done)
        if not ev.wait(timeout):
            raise TimeoutError("no answer from the scheduler")
        if box["err"] is not None:
            raise box["err"]
        return box["ids"]

    def stop_admitting(self) -> None:
        """A drain's start: `submit` raises Draining from now on; queued and running requests go on."""
        with self._cv:
            self._draining = True

    def close(self, timeout: float = 5.0) -> None:
        """Stop the loop; requests still queued or running get ShuttingDown."""
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout)
        err = ShuttingDown("the model was unloaded before the request finished; retry")
        with self._cv:
            left = [r for r in [*self.rows, self._chunking] if r is not None] + list(self._queue)
            self._queue.clear()
            self.rows = [None] * self.max_rows
            self._top = -1
            self._chunking = None
        for r in left:
            self._finish(r, None, err)

    @property
    def running(self) -> int:
        return self.max_rows - len(self.free)

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def _decoding(self) -> int:
        """Rows the decode step advances: the running ones but a prompt still being prefilled in chunks."""
        return self.running - (self._chunking is not None)

    # ---------------------------------------------------------------------------------------------
    # The loop (scheduler thread only)

    def group_shape(self, k: int, t: int) -> tuple[int, int]:
        """The shape a group of k prompts padded to t tokens is prefilled at: (k, t) eagerly; with prefill graphs,
        the bucket covering it (k and t rounded up to powers of two, t to at least GRAPH_MIN_T, at most
        min(budget, max_step - 1) — the longest whole prompt)."""
        if not self.graphed_prefill:
            return k, t
        cap = min(self.prefill_tokens, self.engine.config.max_step - 1)
        return pow2_at_least(k), min(max(pow2_at_least(t), GRAPH_MIN_T), cap)

    def prefill_shapes(self) -> tuple[list[tuple[int, int]], list[int]]:
        """The forwards admission can launch: whole-prompt groups and chunks (t tokens of one prompt into its
        slot's row of the cache, only when a prompt can be longer than the budget). With prefill graphs, the
        groups are every bucket (group_shape) within the budget, each captured once; eagerly, one shape per
        compiled-variant key (FusedForward.variant), the smallest: k prompts padded to t tokens, k <= MAX_GROUP
        and the free rows, k*t <= the budget. Bounded by the budget, not by max_rows x max_step."""
        f, S, B = self.engine.fused, self.engine.config.max_step, self.prefill_tokens
        chunks: dict = {}
        for t in range(1, B + 1) if B < S - 1 else ():
            chunks.setdefault(f.variant(1, t, 1, S), t)
        if self.graphed_prefill:
            ks = {self.group_shape(k, 1)[0] for k in range(1, min(MAX_GROUP, self.max_rows) + 1)}
            ts = {self.group_shape(1, t)[1] for t in range(1, min(S - 1, B) + 1)}
            return sorted((k, t) for k in ks for t in ts if k * t <= B), list(chunks.values())
        groups: dict = {}
        pairs = ((k, t) for k in range(1, min(MAX_GROUP, self.max_rows) + 1) for t in range(1, min(S - 1, B // k) + 1))
        for k, t in sorted(pairs, key=lambda s: s[0] * s[1]):
            groups.setdefault(f.variant(k, t, k), (k, t))
        return list(groups.values()), list(chunks.values())

    @torch.inference_mode()
    def _warm_up(self) -> None:
        """Compile every kernel variant a prefill can need now, not when the first request of that shape arrives
        (a Triton compile mid-serving stalls every running row for a second): one forward per shape of
        prefill_shapes. Runs before the decode graphs are captured: a chunk's shape writes slot 0 (still empty)."""
        dev = self.engine.device
        groups, chunks = self.prefill_shapes()
        pool = torch.cuda.graph_pool_handle() if self.graphed_prefill else None
        for k, t in groups:
            if self.graphed_prefill:
                self.prefill_graphs[k, t] = self.engine.capture_prefill(self.cache, k, t, self.sink, pool)
            else:
                self._prefill_forward(torch.zeros(k, t, dtype=torch.long, device=dev),
                                      torch.arange(k, device=dev) * t + t - 1)
        for t in chunks:
            self._chunk_forward(torch.zeros(1, t, dtype=torch.long, device=dev), 0, 0)
        torch.cuda.synchronize(dev)

    def _prefill_forward(self, tokens: torch.Tensor, last: torch.Tensor) -> tuple[torch.Tensor, KVCache]:
        """The forward of a prefill: k prompts padded to P tokens into a scratch cache of length P (the attention
        split depends on that length); the logits of the flat rows `last`, and the scratch cache. The warm-up
        runs exactly this, so that it compiles what prefills launch."""
        return self.engine.prefill(tokens, last)

    def _chunk_forward(self, tokens: torch.Tensor, start: int, slot: int) -> torch.Tensor:
        """The forward of a chunk: one prompt's tokens [1, C] at positions start..start+C-1, written into (and
        attending) its slot's row of the running cache; the logits of its last token."""
        C = tokens.shape[1]
        row = KVCache([k[slot: slot + 1] for k in self.cache.k], [v[slot: slot + 1] for v in self.cache.v])
        positions = torch.arange(start, start + C, device=tokens.device)[None]
        return self.engine.forward_logits(tokens, positions, row, last=torch.full((1,), C - 1, device=tokens.device))

    def _prefix(self, n: int) -> KVCache:
        return KVCache([k[:n] for k in self.cache.k], [v[:n] for v in self.cache.v])

    def _loop(self) -> None:
        name_thread("lsgpt-sched")
        while True:
            if self.running == 0:
                self._pending.clear()  # the last steps' tokens belong to rows that have all finished
                self._firsts = []
            with self._cv:
                while not self._stop and not self._queue and self.running == 0:
                    self._cv.wait()
                if self._stop:
                    return
            try:
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    self._admit()
                    t1 = time.perf_counter()
                    if self._decoding:
                        self._step()
                        self.stats.steps += 1
                    self.stats.prefill_s += t1 - t0
                    self.stats.step_s += time.perf_counter() - t1
            except Exception as e:  # noqa: BLE001 - a failed step fails its rows; the loop keeps serving
                err = RuntimeError(f"generation failed: {type(e).__name__}: {e}")
                traceback.print_exc()
                self._pending.clear()
                self._firsts = []
                if self._chunking is not None:
                    self.stats.failed += 1
                    self._finish(self._drop_chunking(), None, err)
                for r in [r for r in self.rows if r is not None]:
                    self._release(r)
                    self.stats.failed += 1
                    self._finish(r, None, err)

    def _admit(self) -> None:
        """Prefill under a token budget (prefill_tokens of padded tokens per loop iteration): first the next chunk
        of a prompt longer than the budget, then queued prompts in order, as many as the rest of the budget, the
        free rows and MAX_GROUP allow, in one padded forward. While rows are decoding, admission waits up to
        admit_every steps, unless as many requests wait as rows decode (or a full group, MAX_GROUP): a prefill
        forward of several prompts costs about what one costs (on CUDA it is launch-bound), so batching them
        saves the running rows' time, while a start-up or a burst is admitted at once. (The waiting does not
        depend on how many rows are free: with the running set sized from memory, most rows are free at low
        concurrency, and admitting at every step would prefill at every step.)"""
        c = self._chunking
        if c is not None and c.cancelled is not None and c.cancelled():  # its slot back within a step, as a row's
            self.stats.cancelled += 1
            self._finish(self._drop_chunking(), None, Cancelled("cancelled"))
        busy = self._decoding
        if busy and self._since_admit < self.admit_every and len(self._queue) < min(busy, MAX_GROUP):
            self._since_admit += 1
            return
        self._since_admit = 0
        budget = self.prefill_tokens
        if self._chunking is not None:
            budget -= self._chunk(budget)
        joining = self._take(budget)
        if self._chunking is not None and not joining and budget == self.prefill_tokens:
            budget -= self._chunk(budget)  # a long prompt that just started: its first chunk now
        if not joining:
            return
        for req in joining:
            self._occupy(req)
        self._prefill(joining)

    def _take(self, budget: int) -> list[Request]:
        """Queued requests that join now, each with its slot, in order: whole prompts while k prompts padded to
        the longest fit the budget; a prompt longer than prefill_tokens, at the head, becomes the chunked one
        (one at a time), ending the group. Requests cancelled while queued are answered here."""
        group: list[Request] = []
        P = 0
        while self.free and len(group) < MAX_GROUP:  # (each member takes its slot from self.free)
            with self._cv:
                if not self._queue:
                    break
                n = len(self._queue[0].prompt)
                long = n > self.prefill_tokens
                if long and (group or self._chunking is not None):
                    break  # its turn comes at an admission with no group and no other prompt in chunks
                if not long and math.prod(self.group_shape(len(group) + 1, max(P, n))) > budget:
                    break  # the rest of the queue waits for the next admission
                req = self._queue.popleft()
            if req.cancelled is not None and req.cancelled():
                self.stats.cancelled += 1
                self._finish(req, None, Cancelled("cancelled before it started"))
                continue
            req.slot = heapq.heappop(self.free)
            if long:
                self._chunking = req
                break
            group.append(req)
            P = max(P, n)
        return group

    def _drop_chunking(self) -> Request:
        r, self._chunking = self._chunking, None
        heapq.heappush(self.free, r.slot)  # its params, generator and penalties were never set: a free slot's
        return r

    def _chunk(self, budget: int) -> int:
        """The next chunk (at most `budget` tokens) of the prompt being prefilled in chunks, into its slot's cache
        row at its positions; after the last, its first token, and it joins the decode batch. Returns the tokens
        prefilled. Between chunks its slot is not a running row: a decode step computes it as a free slot (idle
        params, nothing emitted), writing at its pos, which is kept just past what the chunks wrote; a later chunk
        writes those positions before it reads them, as a decode writes its own."""
        r = self._chunking  # (a cancelled one left in _admit)
        start, n, dev = r.prefilled, len(r.prompt), self.engine.device
        C = min(budget, n - start)
        if C <= 0:
            return 0
        last = start + C == n
        whole = torch.tensor(r.prompt, dtype=torch.long)
        if self._cuda:
            whole = whole.pin_memory().to(dev, non_blocking=True)
        logits = self._chunk_forward(whole[start: start + C][None], start, r.slot)
        r.prefilled = start + C
        self.pos[r.slot] = start + C
        self.stats.prompt_tokens += C
        self.stats.prefills += 1
        self.stats.chunks += 1
        if last:
            self._chunking = None
            self._occupy(r)
            idx = torch.full((1,), r.slot, dtype=torch.long, device=dev)
            self._first_tokens([r], idx, logits, whole[None], torch.full((1,), n, dtype=torch.long, device=dev))
        return C

    def _prefill(self, group: list[Request]) -> None:
        """One forward over the group's prompts (padded to the longest, or with prefill graphs to the group's
        bucket, replayed) into a scratch cache, whose rows then go to each request's slot; first tokens sampled.
        A row's padding lands beyond its prompt, where its decode writes before it reads.

        No host synchronisation: what the device needs (tokens, slots, lengths, the rows whose logits count)
        goes up in one copy from pinned memory, the penalty state is touched only when a joining row has a
        penalty (a free slot's is neutral: _release resets it), and on CUDA the first tokens come back with the
        next decode step's (_step), not by waiting for the prefill here."""
        k = len(group)
        lens = [len(r.prompt) for r in group]
        K, T = self.group_shape(k, max(lens))  # eagerly (k, the longest prompt); with graphs its bucket
        flat: list[int] = []  # laid out as GraphedPrefill.inputs; spare rows (K > k): empty prompts into the sink
        for r, n in zip(group, lens):
            flat += r.prompt
            flat += [0] * (T - n)
        flat += [0] * (T * (K - k))
        flat += [r.slot for r in group] + [self.sink] * (K - k)
        flat += [i * T + n - 1 for i, n in enumerate(lens)] + [i * T for i in range(k, K)]
        flat += lens + [1] * (K - k)
        up = torch.tensor(flat, dtype=torch.long)
        if self._cuda:
            up = up.pin_memory()  # the caching host allocator keeps it until copied
        if self.graphed_prefill:
            g = self.prefill_graphs[K, T]
            logits = g(up)  # the scatter into the slots is in the graph
            tokens, idx, _, plen = prefill_views(g.inputs, K, T)
        else:
            tokens, idx, last, plen = prefill_views(up.to(self.engine.device, non_blocking=True), K, T)
            logits, scratch = self._prefill_forward(tokens, last)
            for mine, new in zip(self.cache.k + self.cache.v, scratch.k + scratch.v):
                mine[idx, :T] = new
        self.stats.prompt_tokens += sum(lens)
        self.stats.prefills += 1
        self._first_tokens(group, idx[:k], logits[:k], tokens[:k], plen[:k])

    def _first_tokens(self, group: list[Request], idx: torch.Tensor, logits: torch.Tensor, tokens: torch.Tensor,
                      plen: torch.Tensor) -> None:
        """Requests whose whole prompts are in their slots (`idx`) join the decode batch: their sampling state
        (params, seeded generator, penalties from the prompts `tokens`), first tokens sampled from `logits`
        (read back with the next step's tokens on CUDA, at once otherwise), tok and pos set."""
        pen = self.pen
        params = [r.params for r in group]
        for r in group:
            self._set_params(r.slot, r.params)
        penalized = any(sp.penalized for sp in params)
        if penalized:
            pen.assign(idx, Penalties.start(params, tokens, plen, pen.seen.shape[1]))
        nxt = sample(pen.select(idx).apply(logits) if penalized else logits, params, plen)  # the first new token's position
        if penalized:
            pen.update(nxt, rows=idx)
        self.tok[idx] = nxt
        self.pos[idx] = plen
        if self.defer_first:  # read back with the next step's tokens
            host, event = nxt, None
            if self._cuda:
                host = torch.empty(len(group), dtype=torch.long, pin_memory=True)
                host.copy_(nxt, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
            self._firsts.append((host, event, group))
        else:
            self._emit_all(group, nxt.tolist())

    def _occupy(self, r: Request) -> None:
        """A request takes its slot's row (its params are set when its first token is sampled: _first_tokens)."""
        self.rows[r.slot] = r
        self._top = max(self._top, r.slot)
        self._penalized += r.params.penalized

    def _step(self) -> None:
        n = next(k for k in self.buckets if k > self._top)  # (_top: the busiest running row's slot)
        tok, pos = self.tok[:n, None], self.pos[:n, None].clamp(max=self.engine.config.max_step - 1)
        if n in self.graphs:
            logits = self.graphs[n](tok, pos)
        else:
            logits = self.engine.decode(tok, pos, self._prefix(n))
        # counters: the positions of the new tokens; the drawing rows and the one suppress set, as kept
        hints = dict(drawn=sorted(self._drawn), suppress=None if self._own_suppress else self.idle.suppress)
        if self._penalized:  # some running row has a penalty (every running row is within [0, n))
            pen = self.pen.select(slice(0, n))
            nxt = sample(pen.apply(logits), self.params[:n], self.pos[:n] + 1, **hints)
            pen.update(nxt)
        else:
            nxt = sample(logits, self.params[:n], self.pos[:n] + 1, **hints)
        self.tok[:n] = nxt
        self.pos[:n] += 1
        # Read this step's tokens back while the next `ahead` steps run: a row that finished is noticed that many
        # steps late (its extra tokens are dropped: the row's slot no longer holds that request).
        host = self._host[self._flip]
        self._flip = (self._flip + 1) % len(self._host)  # (its last reader was collected: ahead + 1 buffers)
        host[:n].copy_(nxt, non_blocking=True)
        event = None
        if nxt.is_cuda:
            event = torch.cuda.Event()
            event.record()
        self._pending.append((host, n, event, list(self.rows[:n])))
        firsts, self._firsts = self._firsts, []
        for host, event, group in firsts:  # the first tokens of the requests admitted before this step
            if event is not None:
                event.synchronize()
            self._emit_all(group, host.tolist())
        while len(self._pending) > self.ahead:
            self._collect(self._pending.popleft())

    def _collect(self, pending: tuple) -> None:
        host, n, event, rows = pending
        if event is not None:
            event.synchronize()  # the step's one host synchronisation, with the next step already queued
        self._emit_all(rows, host[:n].tolist())

    def _emit_all(self, rows: list[Request | None], toks: list[int]) -> None:
        """Each row's new token: cancellation, metrics, callbacks, and the end of the rows that finish (EOS, a
        stop sequence, the length limit). A row no longer in its slot (None, or it left since) has its token
        dropped. Runs every step for every row, on the GIL a served model's other threads share: the per-row
        path is kept short (row_finished, the one definition, is asked only when EOS, the limit or a stop
        sequence can apply)."""
        now = time.monotonic()
        st, eos_id, cur = self.stats, self.engine.config.eos_id, self.rows
        ttft, itl = st.ttft, st.itl
        emitted, ended = 0, []  # the ends are answered after the counters are up to date
        for r, tok in zip(rows, toks):
            if r is None or cur[r.slot] is not r:
                continue
            if r.cancelled is not None and r.cancelled():
                self._release(r)
                st.cancelled += 1
                ended.append((r, None, Cancelled("cancelled")))
                continue
            if r.first_token is None:
                r.first_token = now
                ttft.append(now - r.submitted)
            else:
                itl.append(now - r.last)
            r.last = now
            tokens = r.tokens
            tokens.append(tok)
            emitted += 1
            if r.on_token is not None:
                r.on_token(tok)
            sp = r.params
            if (tok == eos_id or len(tokens) >= r.limit or sp.stop) and row_finished(
                    sp, eos_id, tok, len(tokens), r.limit, tokens, len(r.prompt)):
                self._release(r)
                ended.append((r, tokens, None))
        st.generated_tokens += emitted
        for r, ids, err in ended:
            self._finish(r, ids, err)

    def _release(self, r: Request) -> None:
        if r.slot >= 0 and self.rows[r.slot] is r:
            self.rows[r.slot] = None
            while self._top >= 0 and self.rows[self._top] is None:
                self._top -= 1
            self._set_params(r.slot, self.idle)
            if r.params.penalized:  # a free slot's penalties are neutral (a prefill without penalties relies on it)
                self.pen.clear(r.slot)
                self._penalized -= 1
            heapq.heappush(self.free, r.slot)

    def _set_params(self, slot: int, sp: SamplingParams) -> None:
        """A slot's sampling parameters, and the kept sets of drawing slots and rows with their own suppress set."""
        old, self.params[slot] = self.params[slot], sp
        self._own_suppress += (sp.suppress is not self.idle.suppress) - (old.suppress is not self.idle.suppress)
        if sp.greedy:
            self._drawn.discard(slot)
        else:
            self._drawn.add(slot)

    @staticmethod
    def _finish(r: Request, ids: list[int] | None, err: Exception | None) -> None:
        try:
            r.on_done(ids, err)
        except Exception:  # noqa: BLE001 - a failing callback (client gone) must not stop the loop
            traceback.print_exc()
