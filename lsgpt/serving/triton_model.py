"""The one implementation behind every Python-backend model in model_repository/ (gpt2, gpt2_int8, and their
decoupled twins gpt2_stream, gpt2_int8_stream).

Triton runs it as the Python-based backend "lsgpt": configs say `backend: "lsgpt"`, the launcher installs
lsgpt/serving/backend/model.py (which imports TritonPythonModel from here) in the server's backend directory, and
version folders hold data only (model.hdf5, vocab.txt). Names, types and limits: lsgpt/contract.py.

In-flight batching: every model runs one ``lsgpt.engine.scheduler.Scheduler`` (its own decode loop over a running
batch). ``execute`` only parses and validates the requests Triton hands over, queues them and returns at
once; the scheduler answers each request the step it finishes, so a short request never waits for a long one.
Host overhead kept off the decode loop: responses are built and sent by one outbox thread (a send is a
synchronous round trip to the server process), cancellation is polled by one watcher thread (so is
``is_cancelled``), histogram observations are capped per metrics publish (so is each ``observe``).
Triton mechanism chosen: a model that answers through the response sender (as
the vLLM backend does). The non-decoupled models keep working with unary gRPC/HTTP infer and perf_analyzer
(tritonserver 2.51 refuses unary calls to decoupled models; ``sequence_batching { iterative_sequence }``
rescheduling fails there with "must specify the START flag"); the decoupled twins stream.

Tensors are LightSeq's: token_ids INT32 [b, s] in, result INT32 [b, len] out (prompt + continuation,
rows padded with EOS), plus optional per-row inputs max_new_tokens, top_k, top_p, temperature, seed,
repetition_penalty, presence_penalty, frequency_penalty ([b, 1] each) and ``stream`` (BOOL [1]). Text in,
text out (Triton's /generate endpoints): ``text_input`` instead of token_ids, answered with ``text_output``
(the continuation's text) when the tokenizer was published beside the model.
A bad request gets INVALID_ARGUMENT naming the problem; a full queue UNAVAILABLE (retry); the other requests
are served. The decoupled models (one prompt a request) send one response per generated token, with the
token id and a text increment (lsgpt.text.IncrementalDecoder) when a tokenizer is available, then an empty
final response; with stream=false they send the whole result in one response.
"""

from __future__ import annotations

import faulthandler
import functools
import json
import os
import queue
import random
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lsgpt.contract import (
    CANCEL,
    MAX_QUEUED_REQUESTS,
    MAX_RUNNING_ROWS,
    MODEL_FILE,
    PARAMS,
    RESULT,
    STOP_WORDS,
    STREAM,
    STREAM_SUFFIX,
    TEXT,
    TEXT_INPUT,
    TEXT_OUTPUT,
    TOKEN_IDS,
    TOKENIZER_FILE,
    decode_stop,
)

try:  # present inside the Python backend stub only
    import triton_python_backend_utils as pb_utils

    FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
except ImportError:  # pragma: no cover - imported outside Triton (docs, linters)
    pb_utils = None
    FINAL = 1

class BadRequest(ValueError):
    """A request the model rejects with INVALID_ARGUMENT."""


@dataclass
class Parsed:
    prompts: list[list[int]]
    params: list[Any]  # SamplingParams per row
    stream: bool
    text: bool = False  # came as text_input: answer with text_output (the continuation's text)


def _error(msg: str, code: str = "INVALID_ARG"):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(msg, getattr(pb_utils.TritonError, code)))


def _param(config: dict, key: str, default: int) -> int:
    value = config.get("parameters", {}).get(key, {}).get("string_value", "")
    return int(value) if value.strip() else default


def _pick_device(args: dict[str, str]) -> str:
    forced = os.environ.get("LSGPT_DEVICE")
    if forced:
        return forced
    if args.get("model_instance_kind") == "GPU":
        return f"cuda:{args.get('model_instance_device_id', '0')}"
    return "cpu"


def _find_tokenizer(version_dir: Path, model_dir: Path, config: dict) -> str | None:
    """vocab.txt in the version folder (publish(tokenizer=...)), else the config's `tokenizer` parameter
    (relative to the model folder, absolute, or a hub id), else $LSGPT_TOKENIZER."""
    if (version_dir / TOKENIZER_FILE).is_file():
        return str(version_dir)  # the folder: lsgpt.text.load_tokenizer handles folders on transformers 4 and 5
    param = config.get("parameters", {}).get("tokenizer", {}).get("string_value", "")
    if param:
        return str(model_dir / param) if (model_dir / param).exists() else param
    return os.environ.get("LSGPT_TOKENIZER") or None


class Outbox:
    """Responses leave through this one thread, in the order they were queued: ``ResponseSender.send`` is a
    synchronous round trip to the server process (the stub waits, GIL released, until Triton has taken the
    response), so the decode loop only queues a closure that builds and sends it. One FIFO keeps each request's
    responses in order (tokens, then the final one). Bounded: when the sends fall behind (streaming many rows),
    the decode loop waits for room, as it waited for each send before, rather than queueing without limit.

    A send takes micro- to milliseconds (Triton buffers responses for slow clients). One that has not returned
    after ``stall_report_s`` means the server no longer takes this model's messages: the stub says so in the server
    log with every thread's stack. After ``stall_exit_s`` it ends itself, as a dead stub is what Triton and the
    launcher detect: the model turns not ready and the launcher restarts the server; a wedged stub would stay
    "ready" and leave every request hanging. 0 turns the exit off."""

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


class Watched:
    """One request's cancellation flag, kept up to date by CancelWatch; the scheduler calls it every token.

    ``is_cancelled()`` asks Triton about the request's response factory, which Triton frees once the FINAL response
    is sent; tritonserver 2.51 does not guard a check that reaches it after that (a use after free on the thread
    that carries all of the model's messages to the server: seen as a streaming twin that stopped answering for
    good under a GPU soak with cancellations). So a check and the FINAL never overlap, and no check follows it:
    ``close()`` (taken before every FINAL is sent) waits for a check in flight and stops later ones."""

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
    """``request.is_cancelled()`` is a round trip to the server process (the stub asks Triton and waits): asked
    by the decode loop for every row at every step, it stalled each step by one round trip per row. One thread
    asks instead, for every live request every PERIOD s, and sets a flag the loop reads for free: a cancelled
    request leaves its row within PERIOD plus one step. A request watched under its request id can also be
    stopped in band (``ask``: contract.CANCEL) until its FINAL is sent."""

    PERIOD = 0.01

    def __init__(self, name: str):
        self._live: list[Watched] = []
        self._named: dict[str, Watched] = {}  # running requests by request id: what an in-band cancel can name
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=f"lsgpt-cancel-{name}", daemon=True)
        self._thread.start()

    def watch(self, check: Any, request_id: str = "") -> Watched:
        w = Watched(check)
        with self._cv:
            if check is not None:
                self._live.append(w)
                self._cv.notify()
            if request_id:
                self._named[request_id] = w
                w.on_close = functools.partial(self._forget, request_id, w)
        return w

    def ask(self, request_id: str) -> None:
        """An in-band cancel: the running request of that id (if any) leaves its row at the next step."""
        with self._cv:
            w = self._named.get(request_id)
        if w is not None:
            w.asked = True

    def _forget(self, request_id: str, w: Watched) -> None:
        with self._cv:
            if self._named.get(request_id) is w:
                del self._named[request_id]

    def _run(self) -> None:
        from lsgpt.engine.scheduler import name_thread

        name_thread("lsgpt-cancel")
        while True:
            with self._cv:
                self._live = live = [w for w in self._live if not (w.done or w.hit)]
                while not self._stop and not self._live:
                    self._cv.wait()
                if self._stop:
                    return
                live = list(self._live)
            for w in live:
                w.poll()
            with self._cv:
                self._cv.wait_for(lambda: self._stop, self.PERIOD)

    def close(self, timeout: float = 2.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        from lsgpt.engine.engine import Engine
        from lsgpt.engine.scheduler import Scheduler

        if int(np.__version__.split(".")[0]) >= 2:  # seen on GPU images: outputs then arrive empty
            raise RuntimeError(f"numpy {np.__version__} in the model environment: tritonserver 2.51's Python backend "
                               "needs numpy<2 (its output tensors come back empty otherwise); install 'numpy<2'")
        self.config = json.loads(args["model_config"])
        self.name = args["model_name"]
        # `kill -USR1 <stub pid>` writes every thread's Python stack to the server log: a hang can be read
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        model_dir = Path(args["model_repository"])
        version_dir = model_dir / args["model_version"]
        self.device = _pick_device(args)
        self.engine = Engine.load(version_dir / MODEL_FILE, device=self.device)
        self.cfg = self.engine.config
        self.max_batch = int(self.config.get("max_batch_size", 0))
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(self.config)
        self.tokenizer = None
        tok = _find_tokenizer(version_dir, model_dir, self.config)  # text_input / text_output, streamed text
        if tok:
            from lsgpt.text import load_tokenizer

            self.tokenizer = load_tokenizer(tok)
        rows = _param(self.config, "max_running_rows", MAX_RUNNING_ROWS)
        queued = _param(self.config, "max_queued_requests", MAX_QUEUED_REQUESTS)
        self.outbox = Outbox(self.name, limit=8 * rows)  # a few steps' worth of streamed tokens
        self.cancels = CancelWatch(self.name)
        self.scheduler = Scheduler(self.engine, max_rows=rows, max_queue=queued)
        self.metrics = Metrics(self.name, args["model_version"], self.scheduler)
        pb_utils.Logger.log_info(
            f"{self.name} v{args['model_version']}: {'int8' if self.cfg.quantized else 'fp16'} engine on "
            f"{self.device} ({self.engine.backend}), vocab {self.cfg.vocab}, max_step {self.cfg.max_step}, "
            f"eos {self.cfg.eos_id}, in-flight batching up to {rows} rows + {queued} queued"
            + (f", tokenizer {tok}" if tok and self.tokenizer else "")
        )

    # -----------------------------------------------------------------------------------------
    # Request parsing and validation.

    def _parse(self, request) -> Parsed:
        from lsgpt.engine.engine import RequestError, SamplingParams

        t = pb_utils.get_input_tensor_by_name(request, TOKEN_IDS)
        text_in = pb_utils.get_input_tensor_by_name(request, TEXT_INPUT)
        if t is None and text_in is None:
            raise BadRequest("give input 'token_ids' (INT32 ids) or 'text_input' (a string)")
        if t is not None and text_in is not None:
            raise BadRequest("give either 'token_ids' or 'text_input', not both")
        if t is not None:
            ids = t.as_numpy()
            if ids.ndim != 2:
                raise BadRequest(f"input 'token_ids' must have shape [batch, seq_len], got {list(ids.shape)}")
            rows = ids.astype(np.int64).tolist()
        else:
            if self.tokenizer is None:
                raise BadRequest("this model has no tokenizer for 'text_input' (publish it with --tokenizer, or "
                                 "send token_ids)")
            from lsgpt.text import encode_prompt

            texts = text_in.as_numpy().reshape(-1)
            try:
                rows = [encode_prompt(self.tokenizer, x.decode() if isinstance(x, bytes) else str(x)) for x in texts]
            except UnicodeDecodeError:
                raise BadRequest("input 'text_input' is not UTF-8") from None
        b = len(rows)
        if b == 0:
            raise BadRequest("the request has no prompt (batch size 0)")
        if self.max_batch and b > self.max_batch:  # Triton checks this too; keep the message ours
            raise BadRequest(f"batch size {b} exceeds max_batch_size {self.max_batch}")
        for r, row in enumerate(rows):
            if not row:
                raise BadRequest("empty prompt: input 'token_ids' has 0 tokens")
            bad = [x for x in row if not 0 <= x < self.cfg.vocab]
            if bad:
                raise BadRequest(f"token id {bad[0]} at row {r}, position {row.index(bad[0])} is outside the "
                                 f"vocabulary (0..{self.cfg.vocab - 1})")
            if len(row) >= self.cfg.max_step:
                raise BadRequest(
                    f"prompt too long: {len(row)} tokens, the model's max_step is {self.cfg.max_step} "
                    f"(prompt + new tokens must fit in it)"
                )
        fields: list[dict[str, Any]] = [{} for _ in range(b)]
        for name, param in PARAMS.items():
            p = pb_utils.get_input_tensor_by_name(request, name)
            if p is None:
                continue
            v = p.as_numpy().reshape(-1)
            if v.size != b:
                shape = list(p.as_numpy().shape)
                raise BadRequest(f"input '{name}' must have one value per row ([{b}, 1]), got shape {shape}")
            for row, x in enumerate(v.tolist()):
                fields[row][name] = param.type(x)
        sw = pb_utils.get_input_tensor_by_name(request, STOP_WORDS)
        if sw is not None:
            v = sw.as_numpy()
            v = v.reshape(1, -1) if v.ndim == 1 else v
            if v.shape[0] != b:
                raise BadRequest(f"input '{STOP_WORDS}' must have one row per prompt ([{b}, n]), "
                                 f"got {list(v.shape)}")
            for row in range(b):
                fields[row]["stop"] = decode_stop(v[row].tolist())
        st = pb_utils.get_input_tensor_by_name(request, STREAM)
        stream = self.decoupled  # the decoupled models stream unless told not to
        if st is not None:
            v = st.as_numpy().reshape(-1)
            if v.size not in (1, b) or v.min() != v.max():
                raise BadRequest(f"input 'stream' must be one BOOL per request ([{b}, 1], all equal), got "
                                 f"{v.tolist()}")
            stream = bool(v[0])
        if stream and not self.decoupled:
            raise BadRequest(f"stream=true needs a decoupled model: {self.name} answers once; stream from "
                             f"{self.name}{STREAM_SUFFIX}")
        if self.decoupled and b != 1:
            raise BadRequest(f"the decoupled model takes one prompt per request, got {b}")
        try:
            params = [SamplingParams(**f) for f in fields]
            self.engine.validate(rows, params)
        except (RequestError, TypeError, ValueError) as e:
            raise BadRequest(str(e)) from None
        return Parsed(rows, params, stream, text=text_in is not None)

    def _result(self, rows: list[list[int]], q: Parsed):
        width = max(len(r) for r in rows)
        out = np.full((len(rows), width), self.cfg.eos_id, dtype=np.int32)  # pad with EOS like LightSeq
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        tensors = [pb_utils.Tensor(RESULT, out)]
        if self.tokenizer is not None and (q.text or self.decoupled):
            from lsgpt.text import decode

            texts = np.array([[decode(self.tokenizer, r[len(p):]).encode()] for r, p in zip(rows, q.prompts)],
                             dtype=np.object_)  # the continuation, as an OpenAI completion gives it
            tensors.append(pb_utils.Tensor(TEXT_OUTPUT if q.text else TEXT, texts))
        return pb_utils.InferenceResponse(output_tensors=tensors)

    # -----------------------------------------------------------------------------------------

    def execute(self, requests):
        """Queue every request on the scheduler and return at once: answers go through response senders."""
        for request in requests:
            sender = request.get_response_sender()
            target = _cancel_target(request)
            if target is not None:  # an in-band cancel: flag the named request, answer this one at once
                self.cancels.ask(target)  # its row leaves at the next step; its FINAL says CANCELLED
                sender.send(pb_utils.InferenceResponse(output_tensors=[]), flags=FINAL)
                continue
            try:
                q = self._parse(request)
                self._submit(request, sender, q)
            except BadRequest as e:
                sender.send(_error(f"{self.name}: {e}"), flags=FINAL)
            except Exception as e:  # noqa: BLE001 - QueueFull, ShuttingDown: retryable; anything else: internal
                sender.send(_error(f"{self.name}: {e}", _code(e)), flags=FINAL)
        return None

    def _submit(self, request, sender, q: Parsed) -> None:
        # the sender's check is the one documented for decoupled models (the request is released when execute returns)
        check = getattr(sender, "is_cancelled", None) or getattr(request, "is_cancelled", None)
        # a flag the decode loop reads; CancelWatch asks Triton, and an in-band cancel can name the request id
        cancelled = self.cancels.watch(check, request.request_id() or "")
        if self.decoupled:
            self._submit_decoupled(sender, q, cancelled)
            return
        n = len(q.prompts)
        results: list[list[int] | None] = [None] * n
        state = {"left": n, "failed": False}
        lock = threading.Lock()
        send = self.outbox.put

        def final(response) -> None:  # on the outbox thread
            cancelled.close()
            sender.send(response(), flags=FINAL)

        def done(i: int, ids, err) -> None:
            with lock:
                if state["failed"]:
                    return
                if err is not None:  # the first failing row answers for the request
                    state["failed"] = True
                    send(functools.partial(final, lambda: _error(f"{self.name}: {err}", _code(err))))
                    return
                results[i] = ids
                state["left"] -= 1
                if state["left"] == 0:
                    send(functools.partial(final, lambda: self._result(results, q)))

        gone = cancelled
        if n > 1:
            def gone() -> bool:  # a failed sibling row or a cancelled request frees the row
                return state["failed"] or cancelled()

        try:
            for i, (p, sp) in enumerate(zip(q.prompts, q.params)):
                self.scheduler.submit(p, sp, functools.partial(done, i), cancelled=gone)
        except Exception:
            with lock:
                state["failed"] = True  # rows already queued leave at their next step
            cancelled.close()  # execute() answers with the error
            raise

    def _submit_decoupled(self, sender, q: Parsed, cancelled: Watched) -> None:
        dec = None
        if self.tokenizer is not None and q.stream:
            from lsgpt.text import IncrementalDecoder

            dec = IncrementalDecoder(self.tokenizer, q.prompts[0])

        text_name = TEXT_OUTPUT if q.text else TEXT
        send = self.outbox.put

        def token_response(tok: int) -> None:  # on the outbox thread, in order
            outs = [pb_utils.Tensor(RESULT, np.array([[tok]], dtype=np.int32))]
            if dec is not None:
                outs.append(pb_utils.Tensor(text_name, np.array([[dec.push(tok).encode()]], dtype=np.object_)))
            sender.send(pb_utils.InferenceResponse(output_tensors=outs))

        def final_response(ids, err) -> None:
            cancelled.close()
            if err is not None:
                sender.send(_error(f"{self.name}: {err}", _code(err)), flags=FINAL)
            elif q.stream:  # the rest of the text and the final flag
                outs = [pb_utils.Tensor(RESULT, np.zeros((1, 0), dtype=np.int32))]
                if dec is not None:
                    outs.append(pb_utils.Tensor(text_name, np.array([[dec.flush().encode()]], dtype=np.object_)))
                sender.send(pb_utils.InferenceResponse(output_tensors=outs), flags=FINAL)
            else:
                sender.send(self._result([ids], q), flags=FINAL)

        def done(ids, err) -> None:
            send(functools.partial(final_response, ids, err))

        on_token = (lambda tok: send(functools.partial(token_response, tok))) if q.stream else None
        try:
            self.scheduler.submit(q.prompts[0], q.params[0], done, on_token=on_token, cancelled=cancelled)
        except Exception:
            cancelled.close()  # execute() answers with the error
            raise

    def finalize(self) -> None:
        """Unload (SIGTERM, a new version): requests still running get UNAVAILABLE at once, not a hang."""
        if getattr(self, "metrics", None) is not None:
            self.metrics.close()
        scheduler = getattr(self, "scheduler", None)
        if scheduler is not None:
            scheduler.close()  # what is left gets ShuttingDown, through the outbox
        for part in ("cancels", "outbox"):
            if getattr(self, part, None) is not None:
                getattr(self, part).close()
        self.engine = None
        pb_utils.Logger.log_info(f"{getattr(self, 'name', 'model')}: unloaded")


class Metrics:
    """Token-level metrics on Triton's metrics port (/metrics, Prometheus text), labelled model and version:
    lsgpt_prompt_tokens_total, lsgpt_generated_tokens_total, lsgpt_requests_total,
    lsgpt_cancelled_requests_total, lsgpt_decode_steps_total (counters; generated tokens / decode steps = the
    mean running batch),
    lsgpt_running_rows, lsgpt_queued_requests (gauges), lsgpt_time_to_first_token_seconds and
    lsgpt_inter_token_latency_seconds (histograms). A thread copies the scheduler's counters every 0.5 s.

    Each histogram observation is a synchronous round trip to the server process (the Python backend has no
    batched observe): one per generated token cost the stub as much CPU as a tenth of its decode loop and
    crowded the channel its responses use. So a publish observes at most MAX_OBSERVED values of each histogram,
    a uniform random sample of those since the last one when there are more (exact at low load; under load the
    quantiles and the mean _sum/_count stay unbiased, while _sum and _count are the sample's, not totals: the
    token count is lsgpt_generated_tokens_total)."""

    PERIOD = 0.5
    MAX_OBSERVED = 256
    TTFT_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
    ITL_BUCKETS = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0]

    def __init__(self, model: str, version: str, scheduler):
        F = pb_utils.MetricFamily
        labels = {"model": model, "version": str(version)}
        self.scheduler = scheduler

        def family(name: str, what: str, kind, **kw):
            fam = F(name=name, description=what, kind=kind)
            self._families.append(fam)  # a family must outlive its metrics
            return fam.Metric(labels=labels, **kw)

        self._families: list = []
        self.prompt = family("lsgpt_prompt_tokens_total", "Prompt tokens prefilled", F.COUNTER)
        self.generated = family("lsgpt_generated_tokens_total", "Tokens generated", F.COUNTER)
        self.requests = family("lsgpt_requests_total", "Requests accepted by the scheduler", F.COUNTER)
        self.cancelled = family("lsgpt_cancelled_requests_total", "Requests cancelled (by the client, or a "
                                "failed row of the same request) before they finished", F.COUNTER)
        self.steps = family("lsgpt_decode_steps_total", "Decode steps of the running batch", F.COUNTER)
        self.running = family("lsgpt_running_rows", "Rows in the running decode batch", F.GAUGE)
        self.queued = family("lsgpt_queued_requests", "Requests waiting for a row", F.GAUGE)
        self.ttft = family("lsgpt_time_to_first_token_seconds", "Queue + prefill time to the first token",
                           F.HISTOGRAM, buckets=self.TTFT_BUCKETS)
        self.itl = family("lsgpt_inter_token_latency_seconds", "Time between a request's tokens", F.HISTOGRAM,
                          buckets=self.ITL_BUCKETS)
        self._rng = random.Random(0)
        self._seen = {"prompt_tokens": 0, "generated_tokens": 0, "requests": 0, "cancelled": 0, "steps": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lsgpt-metrics", daemon=True)
        self._thread.start()

    def publish(self) -> None:
        st = self.scheduler.stats
        for key, metric in (("prompt_tokens", self.prompt), ("generated_tokens", self.generated),
                            ("requests", self.requests), ("cancelled", self.cancelled),
                            ("steps", self.steps)):
            now = getattr(st, key)
            if now > self._seen[key]:
                metric.increment(now - self._seen[key])
                self._seen[key] = now
        self.running.set(self.scheduler.running)
        self.queued.set(self.scheduler.queued)
        for src, hist in ((st.ttft, self.ttft), (st.itl, self.itl)):
            got = [src.popleft() for _ in range(len(src))]
            if len(got) > self.MAX_OBSERVED:  # a uniform sample: the distribution stays unbiased
                got = self._rng.sample(got, self.MAX_OBSERVED)
            for x in got:
                hist.observe(x)

    def _run(self) -> None:
        from lsgpt.engine.scheduler import name_thread

        name_thread("lsgpt-metrics")
        while not self._stop.wait(self.PERIOD):
            try:
                self.publish()
            except Exception as e:  # noqa: BLE001 - metrics must never take the model down
                pb_utils.Logger.log_warn(f"lsgpt metrics: {e}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)


def _cancel_target(request) -> str | None:
    """The request id an in-band cancel names (request parameter contract.CANCEL), or None for a normal request."""
    try:
        params = json.loads(request.parameters() or "{}")
    except (AttributeError, ValueError):
        return None
    target = params.get(CANCEL) if isinstance(params, dict) else None
    return None if target is None else str(target)


def _code(err: Exception) -> str:
    from lsgpt.engine.scheduler import Cancelled, QueueFull, ShuttingDown

    if isinstance(err, (QueueFull, ShuttingDown)):
        return "UNAVAILABLE"
    return "CANCELLED" if isinstance(err, Cancelled) else "INTERNAL"
