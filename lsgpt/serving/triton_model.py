"""The served model: the one implementation behind every Python-backend model in model_repository/ (gpt2,
gpt2_int8, and their decoupled twins gpt2_stream, gpt2_int8_stream). Its lifecycle (initialize, execute,
finalize) and the flow of a request from Triton to the scheduler and back.

Triton runs it as the Python-based backend "lsgpt": configs say `backend: "lsgpt"`, the launcher installs
lsgpt/serving/backend/model.py (which imports TritonPythonModel from here) in the server's backend directory, and
version folders hold data only (model.hdf5, vocab.txt). Names, types and limits: lsgpt/contract.py.

In-flight batching: every model runs one ``lsgpt.engine.scheduler.Scheduler`` (its own decode loop over a running
batch). ``execute`` only converts the requests Triton hands over (requests.py), queues them and returns at once;
the scheduler answers each request the step it finishes, so a short request never waits for a long one. Host work
kept off the decode loop: responses are built and sent by one outbox thread (outbox.py), cancellation is polled by
one watcher thread (cancel.py), histogram observations are capped per metrics publish (metrics.py). Answers go
through the response sender, as the vLLM backend's do: the non-decoupled models serve unary gRPC/HTTP infer and
perf_analyzer, the decoupled twins stream.

Tensors are LightSeq's: token_ids INT32 [b, s] in, result INT32 [b, len] out (prompt + continuation, rows padded
with EOS), plus the optional per-row sampling inputs of contract.PARAMS ([b, 1] each), stop_words and ``stream``
(BOOL [1]). Text in, text out (Triton's /generate endpoints): ``text_input`` instead of token_ids, answered with
``text_output`` (the continuation's text) when the tokenizer was published beside the model.
A bad request gets INVALID_ARGUMENT naming the problem; a full queue UNAVAILABLE (retry); the other requests are
served. The decoupled models (one prompt a request) send one response per generated token, with the token id and
a text increment (lsgpt.text.IncrementalDecoder) when a tokenizer is available, then an empty final response; with
stream=false they send the whole result in one response. A stream whose request asks for it (contract.COALESCE, as
the client library does) gets the tokens that come while its previous send is still in flight together in its next
response (result [1, k]): sends behind the decode steps never hold the decode loop back (outbox.TokenStream).
"""

from __future__ import annotations

import faulthandler
import functools
import itertools
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

from lsgpt.contract import MAX_QUEUED_REQUESTS, MAX_RUNNING_ROWS, MODEL_FILE, TOKENIZER_FILE
from lsgpt.serving import responses
from lsgpt.serving.cancel import CancelWatch, Watched
from lsgpt.serving.metrics import Metrics
from lsgpt.serving.outbox import Outbox, TokenStream
from lsgpt.serving.requests import BadRequest, Form, Parsed, cancel_target, parse, request_parameters

try:  # present inside the Python backend stub only
    import triton_python_backend_utils as pb_utils

    FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
except ImportError:  # pragma: no cover - imported outside Triton (docs, linters)
    pb_utils = None
    FINAL = 1

# How long a thread that wants the GIL waits before the holder is asked to drop it. Python's default, 5 ms, is ten
# GPU decode steps: the scheduler's thread, back from its step's synchronisation, would wait that long behind a
# request being parsed or a response being built on another thread. LSGPT_SWITCH_INTERVAL_MS overrides it.
SWITCH_INTERVAL_MS = 0.5

# Response send lanes (Outbox): each send is a round trip to the server, which takes them on a thread pool, so a few
# lanes keep a few in flight; a request's responses keep to one lane, in order.
OUTBOX_LANES = 4


def _string_param(config: dict, key: str) -> str:
    """A config.pbtxt parameter's string value, stripped; '' when absent."""
    return config.get("parameters", {}).get(key, {}).get("string_value", "").strip()


def _param(config: dict, key: str, default: int | str) -> int | str:
    """A config.pbtxt parameter: an integer, or "auto" (the scheduler picks: lsgpt.engine.scheduler); absent or
    empty: `default`."""
    value = _string_param(config, key)
    if not value:
        return default
    return "auto" if value.lower() == "auto" else int(value)


def _switch_interval_s() -> float:
    """The model process's GIL switch interval in seconds: LSGPT_SWITCH_INTERVAL_MS, else SWITCH_INTERVAL_MS; 0
    keeps Python's. Anything else than a number >= 0 fails the model's load, naming the variable."""
    raw = os.environ.get("LSGPT_SWITCH_INTERVAL_MS", "").strip()
    try:
        ms = float(raw) if raw else SWITCH_INTERVAL_MS
    except ValueError:
        ms = float("nan")
    if not ms >= 0:  # (also NaN)
        raise RuntimeError(f"LSGPT_SWITCH_INTERVAL_MS={raw!r}: give the GIL switch interval in milliseconds, a "
                           "number >= 0 (0 keeps Python's 5 ms)")
    return ms / 1000


def _engine_process(config: dict, device: str) -> str | None:
    """Run the engine in a process of its own (lsgpt/serving/engine_process.py)? $LSGPT_ENGINE_PROCESS, else the
    config parameter `engine_process`: 1/true/yes/on -> "asked", 0/false/no/off -> None, auto (the default) ->
    "auto" on a GPU, where one process's GIL held the decode loop back (1.2-1.3x served tokens/s at 256 streams on
    the H100, results/h100/serving/2026-12-08-s15/), None on the CPU, where the forward itself is the bound."""
    raw = (os.environ.get("LSGPT_ENGINE_PROCESS", "").strip() or _string_param(config, "engine_process")).lower()
    if raw in ("", "auto"):
        return "auto" if device.startswith("cuda") else None
    if raw in ("1", "true", "yes", "on"):
        return "asked"
    if raw in ("0", "false", "no", "off"):
        return None
    raise RuntimeError(f"engine_process / LSGPT_ENGINE_PROCESS={raw!r}: say auto, true or false")


def start_engine(how: str | None, hdf5: Path, device: str, tokenizer: str | None, vocab: Any, max_rows: int | str,
                 sched_args: dict, on_lost: Any, warn: Any) -> tuple[Any, Any]:
    """(engine, scheduler) of a served model: (None, EngineProcess) in a process of its own when `how` says so
    (_engine_process), else (Engine, Scheduler) here. An engine process that cannot start fails the load when it
    was asked for; by default ("auto") the engine runs here instead, and `warn` says why (a python3 without torch,
    say, where the server was not started by the launcher: it sets LSGPT_PYTHON)."""
    from lsgpt.engine.engine import Engine
    from lsgpt.engine.scheduler import Scheduler

    if how:
        from lsgpt.serving.engine_process import EngineProcess

        try:
            return None, EngineProcess(hdf5, device, tokenizer, max_rows, on_lost=on_lost, **sched_args)
        except Exception as e:
            if how != "auto":
                raise
            warn(f"the engine process did not start ({e}); the engine runs in the model process instead "
                 "(engine_process \"false\" says so without trying)")
    engine = Engine.load(hdf5, device=device, vocab=vocab)  # the vocabulary's non-text specials: never generated
    return engine, Scheduler(engine, max_rows=max_rows, **sched_args)


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
    param = _string_param(config, "tokenizer")
    if param:
        return str(model_dir / param) if (model_dir / param).exists() else param
    return os.environ.get("LSGPT_TOKENIZER") or None


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        if int(np.__version__.split(".")[0]) >= 2:
            raise RuntimeError(f"numpy {np.__version__} in the model environment: tritonserver 2.51's Python backend "
                               "needs numpy<2 (its output tensors come back empty otherwise); install 'numpy<2'")
        self.config = json.loads(args["model_config"])
        self.name = args["model_name"]
        if (interval := _switch_interval_s()) > 0:
            sys.setswitchinterval(interval)
        # `kill -USR1 <stub pid>` writes every thread's Python stack to the server log: a hang can be read
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        model_dir = Path(args["model_repository"])
        version_dir = model_dir / args["model_version"]
        self.device = _pick_device(args)
        self.tokenizer = None
        tok = _find_tokenizer(version_dir, model_dir, self.config)  # text_input / text_output, streamed text
        if tok:
            from lsgpt.text import load_tokenizer

            self.tokenizer = load_tokenizer(tok)
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(self.config)
        self.form = Form(self.name, self.decoupled, int(self.config.get("max_batch_size", 0)), self.tokenizer)
        queued = _param(self.config, "max_queued_requests", MAX_QUEUED_REQUESTS)
        queued = MAX_QUEUED_REQUESTS if queued == "auto" else queued
        budget, every = (_param(self.config, k, "auto") for k in ("max_prefill_tokens", "admit_every"))
        rows_setting = _param(self.config, "max_running_rows", MAX_RUNNING_ROWS)
        sched_args = dict(max_queue=queued, prefill_tokens=None if budget == "auto" else budget,
                          admit_every=None if every == "auto" else every)
        # the engine in its own process and GIL (engine_process.py; the same Scheduler there), or here
        self.engine, self.scheduler = start_engine(
            _engine_process(self.config, self.device), version_dir / MODEL_FILE, self.device, tok, self.tokenizer,
            rows_setting, sched_args, self._engine_lost, lambda msg: pb_utils.Logger.log_warn(f"{self.name}: {msg}"))
        if self.engine is None:
            self.cfg, backend = self.scheduler.config, f"{self.scheduler.backend}, engine process"
        else:
            self.cfg, backend = self.engine.config, self.engine.backend
        rows = self.scheduler.max_rows  # "auto": sized from the free GPU memory (32 on the CPU)
        self.outbox = Outbox(self.name, limit=8 * rows, lanes=OUTBOX_LANES)  # a few steps' worth of streamed tokens
        self.lanes = itertools.count()  # each request's outbox lane, in turn
        self.cancels = CancelWatch(self.name)
        self.metrics = Metrics(self.name, args["model_version"], self.scheduler)
        pb_utils.Logger.log_info(
            f"{self.name} v{args['model_version']}: {'int8' if self.cfg.quantized else 'fp16'} engine on "
            f"{self.device} ({backend}), vocab {self.cfg.vocab}, max_step {self.cfg.max_step}, "
            f"eos {self.cfg.eos_id}, in-flight batching up to {rows} rows (max_running_rows "
            f"{rows_setting}) + {queued} queued, prefill budget "
            f"{self.scheduler.prefill_tokens} tokens, admission every {self.scheduler.admit_every} steps"
            + (f", tokenizer {tok}" if tok and self.tokenizer else "")
        )

    def execute(self, requests):
        """Queue every request on the scheduler and return at once: answers go through response senders."""
        from lsgpt.engine.engine import RequestError

        for request in requests:
            sender = request.get_response_sender()
            try:
                parameters = request_parameters(request)  # read once: the cancel, the key, the options
                target = cancel_target(parameters)
                if target is not None:  # an in-band cancel: flag the named request, answer this one at once
                    self.cancels.ask(*target)  # its row leaves at the next step; its FINAL says CANCELLED
                    sender.send(pb_utils.InferenceResponse(output_tensors=[]), flags=FINAL)
                    continue  # the same answer whether the id and key matched a request or not
                q = parse(request, self.form, parameters)
                if len(q.prompts) > 1:  # the rules: the scheduler's (parse converts); a bad row queues none of
                    self.scheduler.validate(q.prompts, q.params)  # its batch; one row: submit's own check does
                self._submit(request, sender, q)
            except (BadRequest, RequestError) as e:
                sender.send(responses.error(f"{self.name}: {e}"), flags=FINAL)
            except Exception as e:  # noqa: BLE001 - QueueFull, ShuttingDown: retryable; anything else: internal
                sender.send(responses.error(f"{self.name}: {e}", responses.code(e)), flags=FINAL)
        return None

    def _result(self, rows: list[list[int]], q: Parsed):
        text = responses.text_name(q.text) if (q.text or self.decoupled) else None
        return responses.result(rows, q.prompts, self.cfg.eos_id, self.tokenizer, text)

    def _submit(self, request, sender, q: Parsed) -> None:
        # the sender's check is the one documented for decoupled models (the request is released when execute returns)
        check = getattr(sender, "is_cancelled", None) or getattr(request, "is_cancelled", None)
        # a flag the decode loop reads; CancelWatch asks Triton, and an in-band cancel naming the request id and
        # the key the request carries (its owner's secret) sets it
        cancelled = self.cancels.watch(check, request.request_id() or "", q.owner_key)
        if self.decoupled:
            self._submit_decoupled(sender, q, cancelled)
        else:
            self._submit_rows(sender, q, cancelled)

    def _submit_rows(self, sender, q: Parsed, cancelled: Watched) -> None:
        """Every row on the scheduler; the request's one answer when the last row is done (or the first fails)."""
        n = len(q.prompts)
        results: list[list[int] | None] = [None] * n
        state = {"left": n, "failed": False}
        lock = threading.Lock()
        send = functools.partial(self.outbox.put, lane=next(self.lanes))

        def final(response) -> None:  # on the outbox thread
            cancelled.close()
            sender.send(response(), flags=FINAL)

        def done(i: int, ids, err) -> None:
            with lock:
                if state["failed"]:
                    return
                if err is not None:  # the first failing row answers for the request
                    state["failed"] = True
                    send(functools.partial(final, lambda: responses.error(f"{self.name}: {err}",
                                                                          responses.code(err))))
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
        """One prompt; streamed: a response per token (with q.gather, contract.COALESCE: per tokens that gathered
        while the previous send was in flight), then the end of the stream; else one response."""
        dec = None
        if self.tokenizer is not None and q.stream:
            from lsgpt.text import IncrementalDecoder

            dec = IncrementalDecoder(self.tokenizer, q.prompts[0])
        text = responses.text_name(q.text)
        lane = next(self.lanes)
        send = functools.partial(self.outbox.put, lane=lane)  # in order: the tokens, then the end

        def tokens_response(toks: list[int]) -> None:  # on the outbox thread, in order
            piece = None if dec is None else "".join(dec.push(t) for t in toks)
            sender.send(responses.tokens(toks, piece, text))

        def final_response(ids, err) -> None:
            cancelled.close()
            if err is not None:
                sender.send(responses.error(f"{self.name}: {err}", responses.code(err)), flags=FINAL)
            elif q.stream:  # the rest of the text and the final flag
                sender.send(responses.stream_end(None if dec is None else dec.flush(), text), flags=FINAL)
            else:
                sender.send(self._result([ids], q), flags=FINAL)

        def done(ids, err) -> None:
            send(functools.partial(final_response, ids, err))

        on_token = None
        if q.stream and q.gather:  # tokens that gather while a send is in flight go together
            on_token = TokenStream(self.outbox, lane, tokens_response).add
        elif q.stream:  # one response a token
            on_token = lambda tok: send(functools.partial(tokens_response, [tok]))  # noqa: E731
        try:
            self.scheduler.submit(q.prompts[0], q.params[0], done, on_token=on_token, cancelled=cancelled)
        except Exception:
            cancelled.close()  # execute() answers with the error
            raise

    def _engine_lost(self, why: str) -> None:
        """The engine process ended under a running model: every request was failed; end this process too, so
        that Triton and the launcher see a dead model (it restarts) rather than one that answers nothing."""
        pb_utils.Logger.log_error(f"{self.name}: {why}; ending the model process")
        os.kill(os.getpid(), signal.SIGKILL)

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
