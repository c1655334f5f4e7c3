"""gRPC client for the served GPT-2 models (no torch: tritonclient + a BERT tokenizer only).

    from lsgpt.client import Client
    c = Client("localhost:8001", "gpt2", "uer/gpt2-chinese-cluecorpussmall")   # or a folder with vocab.txt
    c.generate("我今天很开心，", max_new_tokens=50, top_k=1)      -> "我今天很开心，..."   (prompt + continuation)
    c.generate(["a", "b"], top_p=0.9, seed=1)                       -> [..., ...]  (one request per prompt,
                                                                       sent together: Triton batches them)
    for piece in c.stream("我今天", max_new_tokens=50): print(piece, end="")   # via gpt2_stream (gpt2's twin)
    await c.agenerate([...]); async for piece in c.astream("..."): ...

Prompts are [CLS] text (lsgpt.text.encode_prompt); the output is decoded with lsgpt.text.decode (spaces
between CJK characters removed, Latin word spacing kept). Errors are ClientError subclasses with a
message that says what to do: ServerUnavailable, ModelNotReady, ServerBusy (the model's queue is full: retry
later), InvalidRequest (a ValueError: empty or too long prompt, bad parameter, an integer out of its tensor's
range), RequestTimeout, ModelRestarted. UNAVAILABLE is retried with backoff first.

Every request has a deadline: `timeout` when given, else one derived from its size, DEADLINE_BASE_S +
DEADLINE_PER_TOKEN_S x max_new_tokens (the model's longest continuation when max_new_tokens is not given).
A request in flight in a model process that dies (kill -9, an OOM kill) is never answered by tritonserver 2.51,
not even after the launcher has reloaded the model; so while a request waits, the client asks every
PROBE_S s (one model-config call a second per model at most, shared by its requests) whether the model was
reloaded since it was sent (the launcher's `lsgpt_reload` config parameter changed): if so the request is lost,
and a unary one is sent again (up to `retries` times), a stream raises ModelRestarted. A request sent while the
model's process is dead and not yet reloaded (tritonserver answers "Stub process ... is not healthy") waits for the
reload, within its deadline, and is sent again: a unary one, and a stream that has yielded nothing yet; without a
reload it ends with ModelNotReady. Integers are range-checked before they are cast
to their tensor types (numpy would wrap 2**32 + 5 to 5); text is checked (UTF-8, contract.MAX_TEXT_BYTES) before
it is tokenized.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from lsgpt.contract import (
    CANCEL,
    CANCEL_KEY,
    COALESCE,
    MAX_STEP_LIMIT,
    PARAMS,
    RELOAD,
    RESULT,
    STOP_WORDS,
    STREAM_SUFFIX,
    STRICT_LENGTH,
    TEXT,
    TOKEN_IDS,
    encode_stop,
    ids_error,
    param_error,
    stop_error,
    text_error,
)
from lsgpt.text import IncrementalDecoder, cached_tokenizer, decode, encode_prompt

DEFAULT_TOKENIZER = "uer/gpt2-chinese-cluecorpussmall"
class ClientError(RuntimeError):
    """Any failure talking to the server."""


class ServerUnavailable(ClientError):
    """The server cannot be reached (down, wrong url, still starting)."""


class ModelNotReady(ClientError):
    """The server is up but the model is not loaded (unknown name, loading, failed to load)."""


class ServerBusy(ClientError):
    """The model's queue is full (UNAVAILABLE from the model itself, after the client's retries): retry later."""


class InvalidRequest(ClientError, ValueError):
    """The request was rejected (INVALID_ARGUMENT): empty or too long prompt, bad parameter, ..."""


class RequestTimeout(ClientError):
    """No answer within the client's timeout."""


class ModelRestarted(ClientError):
    """The model process that held the request died and the model was reloaded: the request was lost; retry."""


DEADLINE_BASE_S = 30.0  # a request's default deadline: base + per new token (Client(timeout=None))
DEADLINE_PER_TOKEN_S = 0.5
PROBE_S = 2.0  # how often a waiting request checks whether its model was reloaded (its process died)
DEAD_STUB = "is not healthy"  # tritonserver 2.51's answer for a model whose process died ("Stub process 'm_0_0' ...")


def _dead_stub(e: InferenceServerException) -> bool:
    """Refused because the model's process is dead (not executed: safe to send again once it is reloaded)."""
    return DEAD_STUB in (e.message() or str(e))


class _Resend(Exception):
    """A stream refused by a dead model process before any token, its model reloaded since: start it again."""


def check_sampling(sampling: dict[str, Any], tok: Any = None) -> dict[str, Any]:
    """Validate keyword arguments early, with a clear message; None values mean 'the model's default'.

    stop: a string, a list of strings (encoded with `tok`) or a list of token-id lists; the generation ends right
    after one of them, which stays in the output (as EOS does). strict_length=True: a max_new_tokens beyond what
    the model allows after the prompt is refused (InvalidRequest naming the limit) instead of lowered."""
    out: dict[str, Any] = {}
    for k, v in sampling.items():
        if k == "strict_length":
            if v:
                out[k] = True
            continue
        if k == "stop":
            if v:
                out[k] = _stop_ids(v, tok)
            continue
        if k not in PARAMS:
            raise TypeError(f"unknown sampling parameter {k!r} (known: {', '.join(PARAMS)}, stop)")
        why = param_error(k, v)
        if why:
            raise InvalidRequest(why)
        if v is not None:
            out[k] = PARAMS[k].type(v)
    return out


def _stop_ids(stop: Any, tok: Any) -> tuple[tuple[int, ...], ...]:
    items = [stop] if isinstance(stop, str) else list(stop)
    seqs = []
    for s in items:
        if isinstance(s, str):
            if tok is None:
                raise InvalidRequest("stop strings need a tokenizer: give token-id lists instead")
            ids = tok.encode(s, add_special_tokens=False)
            if not ids:
                raise InvalidRequest(f"stop string {s!r} encodes to no tokens (the tokenizer drops whitespace)")
            seqs.append(tuple(ids))
        elif isinstance(s, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in s):
            seqs.append(tuple(s))
        else:
            raise InvalidRequest(f"stop must be a string, a list of strings or a list of token-id lists, got {s!r}")
    why = stop_error(seqs)
    if why:
        raise InvalidRequest(why)
    return tuple(seqs)


def _inputs(module, prompt_ids: Sequence[int], sampling: dict[str, Any]) -> list:
    if len(prompt_ids) >= MAX_STEP_LIMIT:  # refused here, before megabytes go over the wire
        raise InvalidRequest(f"prompt of {len(prompt_ids)} tokens: no model takes more than {MAX_STEP_LIMIT - 1} "
                             f"(LightSeq's max_step limit is {MAX_STEP_LIMIT}; the model's own may be lower)")
    why = ids_error(prompt_ids)  # before the cast: numpy wraps 2**40 to 0
    if why:
        raise InvalidRequest(why)
    ids = np.asarray([list(prompt_ids)], dtype=np.int32)
    inp = module.InferInput(TOKEN_IDS, list(ids.shape), "INT32")
    inp.set_data_from_numpy(ids)
    out = [inp]
    for k, v in sampling.items():
        if k == "strict_length":
            continue  # a request parameter: _parameters
        if k == "stop":
            row = np.asarray([encode_stop(v)], dtype=np.int32)
            i = module.InferInput(STOP_WORDS, list(row.shape), "INT32")
            i.set_data_from_numpy(row)
            out.append(i)
            continue
        dt = PARAMS[k].triton_dtype
        i = module.InferInput(k, [1, 1], dt)
        i.set_data_from_numpy(np.asarray([[v]], dtype=triton_to_np_dtype(dt)))
        out.append(i)
    return out


def close_stream(c: Any, cancel: tuple[str, str, str] | None = None, wait: float = 5.0) -> None:
    """End `c`'s stream the way that leaves the server well: ``cancel=(model, request id, key)`` first asks that
    model, in band on the same stream, to stop the request (contract.CANCEL with contract.CANCEL_KEY, the secret
    the request was sent with: only its owner can stop it; the model answers at its next decode step); then
    the stream is half-closed and the server gets `wait` s to answer what it still runs and end the call. Only
    if it has not is the gRPC call cancelled.

    Why not simply cancel the call: tritonserver 2.51's gRPC frontend (the pip wheel's) can corrupt its heap
    when a stream is cancelled while responses flow (upstream: Triton server issues 7368 and 8034, fixed in later
    releases; docs/decisions.md).
    Also: tritonclient 2.51's stop_stream(cancel_requests=True) never hands the request iterator its end marker,
    so the gRPC thread that reads it waits forever (one thread leaked per stream); the marker is given here.
    Call this before ``close()`` on every path, errors included: ``close()`` alone waits for the stream's
    pending answers, forever when a model never answers and the stream has no deadline."""
    stream = getattr(c, "_stream", None)
    if stream is None:
        return
    if cancel is not None:
        model, rid, key = cancel
        try:
            c.async_stream_infer(model, _inputs(grpcclient, [0], {}), parameters={CANCEL: rid, CANCEL_KEY: key})
        except Exception:  # noqa: BLE001 - the stream is already broken: the cancel below ends it
            pass
    queue = getattr(stream, "_request_queue", None)
    if queue is not None:
        queue.put(None)  # half-close: no more requests; the call ends when the server has answered them all
    handler = getattr(stream, "_handler", None)
    if handler is not None:
        handler.join(wait)
    c.stop_stream(cancel_requests=handler is not None and handler.is_alive())


def _parameters(sampling: dict[str, Any]) -> dict[str, Any] | None:
    """The request parameters of checked sampling arguments (contract.STRICT_LENGTH), or None."""
    return {STRICT_LENGTH: True} if sampling.get("strict_length") else None


class Client:
    def __init__(
        self,
        url: str = "localhost:8001",
        model: str = "gpt2",
        tokenizer: Any = DEFAULT_TOKENIZER,
        *,
        stream_model: str | None = None,
        timeout: float | None = None,
        retries: int = 3,
        eos_id: int | None = None,
        max_concurrency: int = 16,
    ):
        """tokenizer: a hub id, a folder with vocab.txt, or a loaded tokenizer. eos_id: default [SEP].
        stream_model: where stream() goes; default the model's decoupled twin (gpt2 -> gpt2_stream,
        gpt2_int8 -> gpt2_int8_stream), or the model itself when it is one. timeout: seconds a request may take;
        None: derived from its size (deadline())."""
        if stream_model is None:
            stream_model = model if model.endswith(STREAM_SUFFIX) else model + STREAM_SUFFIX
        self.url, self.model, self.stream_model = url, model, stream_model
        self.tok = cached_tokenizer(str(tokenizer)) if isinstance(tokenizer, (str, bytes)) or hasattr(
            tokenizer, "__fspath__") else tokenizer
        self.eos_id = self.tok.sep_token_id if eos_id is None else eos_id
        self.timeout, self.retries, self.max_concurrency = timeout, retries, max_concurrency
        self._grpc = grpcclient.InferenceServerClient(url)
        self._aio = None
        self._marks: dict[str, tuple[str | None, float]] = {}  # model -> (its reload mark, when read)
        self._marks_lock = threading.Lock()

    # -----------------------------------------------------------------------------------------
    # Helpers.

    def encode(self, text: str) -> list[int]:
        """[CLS] text as ids; InvalidRequest for text that is not UTF-8 or over contract.MAX_TEXT_BYTES (checked
        first: tokenizing megabytes takes seconds)."""
        why = text_error(text)
        if why:
            raise InvalidRequest(why)
        return encode_prompt(self.tok, text)

    def trim(self, row: Sequence[int], prompt_len: int) -> list[int]:
        """Cut the EOS padding: keep the prompt and the continuation up to its first EOS."""
        row = [int(x) for x in row]
        for i in range(prompt_len, len(row)):
            if row[i] == self.eos_id:
                return row[: i + 1]
        return row

    def deadline(self, prompt_len: int, params: dict[str, Any]) -> float:
        """Seconds a request may take: `timeout`, else DEADLINE_BASE_S + DEADLINE_PER_TOKEN_S per new token."""
        if self.timeout is not None:
            return self.timeout
        n = params.get("max_new_tokens") or max(1, MAX_STEP_LIMIT - prompt_len)
        return DEADLINE_BASE_S + DEADLINE_PER_TOKEN_S * n

    def _mark(self, model: str, max_age: float = 0.5) -> str | None:
        """The model's reload mark ("" before any reload; None: unknown), read at most every `max_age` s."""
        with self._marks_lock:
            value, at = self._marks.get(model, (None, -1e9))
        if time.monotonic() - at <= max_age:
            return value
        try:
            cfg = self._grpc.get_model_config(model, as_json=True, client_timeout=2)["config"]
            value = cfg.get("parameters", {}).get(RELOAD, {}).get("string_value", "")
        except (InferenceServerException, KeyError, TypeError):
            value = None
        with self._marks_lock:
            self._marks[model] = (value, time.monotonic())
        return value

    def _restarted(self, model: str, before: str | None) -> bool:
        """Was `model` reloaded after its process died since `before` (its mark when a request was sent)? A config
        change by its owner drops the mark (""): not a death, the old instance finishes its requests."""
        now = self._mark(model, PROBE_S / 2)
        return before is not None and bool(now) and now != before

    def _await_reload(self, model: str, before: str | None, seconds: float) -> bool:
        """Wait up to `seconds` for `model` to be reloaded since `before` (its process died): True once it is; False
        at once when the model's config cannot be read (the whole server went down: a restart has no reload mark)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if self._restarted(model, before):
                return True
            if self._mark(model, PROBE_S / 2) is None:
                return False
            time.sleep(min(0.5, max(0.0, end - time.monotonic())))
        return False

    def _error(self, e: InferenceServerException, model: str) -> ClientError:
        status, msg = str(e.status() or ""), e.message() or str(e)
        ours = msg.startswith(f"{model}: ")  # our model's own answer (stream errors carry no status)
        if ours and "max_queued_requests=" in msg:  # the scheduler's QueueFull (UNAVAILABLE): the model is up
            return ServerBusy(f"{model} at {self.url} is busy, its queue is full; retry later: {msg}")
        if DEAD_STUB in msg:  # its process died; the launcher reloads the model alone within seconds
            return ModelNotReady(f"the process of model {model!r} on {self.url} died and the model has not been "
                                 f"reloaded (the launcher does that within seconds; retry): {msg.strip()}")
        if ours and ("shutting down" in msg or "was unloaded" in msg):  # ShuttingDown (UNAVAILABLE)
            return ModelNotReady(f"model {model!r} is being unloaded on {self.url}; retry: {msg}")
        if "unknown model" in msg:  # stream errors carry no status
            twin = model == self.stream_model and model != self.model
            hint = (f" (streaming goes to the decoupled twin of {self.model!r}; an export with --repository "
                    "publishes it)") if twin else ""
            return ModelNotReady(f"model {model!r} is not served at {self.url}{hint}: {msg.strip()}")
        if not status and ours and "generation failed" not in msg:
            return InvalidRequest(msg)  # stream errors carry no status; our model prefixes its rejections
        if status.endswith("INVALID_ARGUMENT"):
            return InvalidRequest(msg)
        if status.endswith("DEADLINE_EXCEEDED"):
            return RequestTimeout(f"no answer from {self.url} within the request's deadline ({model}: {msg})")
        if status.endswith(("NOT_FOUND", "UNAVAILABLE")) and self._live():
            return ModelNotReady(f"model {model!r} is not ready on {self.url}: {msg}")
        if status.endswith("UNAVAILABLE"):
            return ServerUnavailable(f"cannot reach Triton at {self.url} ({msg}); is the server running?")
        return ClientError(f"{model}: {status} {msg}")

    def live(self) -> bool:
        """Does the server answer (gRPC, within 2 s)?"""
        return self._live()

    def _live(self) -> bool:
        try:
            return bool(self._grpc.is_server_live(client_timeout=2))
        except InferenceServerException:
            return False

    @staticmethod
    def _retryable(e: InferenceServerException) -> bool:
        return str(e.status() or "").endswith("UNAVAILABLE")

    def wait_ready(self, timeout: float = 60.0, model: str | None = None) -> None:
        model = model or self.model
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self._grpc.is_model_ready(model, client_timeout=2):
                    return
            except InferenceServerException:
                pass
            if time.monotonic() > deadline:
                if not self._live():
                    raise ServerUnavailable(f"cannot reach Triton at {self.url} after {timeout:.0f}s")
                raise ModelNotReady(f"model {model!r} not ready on {self.url} after {timeout:.0f}s")
            time.sleep(0.5)

    # -----------------------------------------------------------------------------------------
    # Sync.

    def generate_ids(self, prompts: Sequence[Sequence[int]], **sampling) -> list[list[int]]:
        """Token-id prompts -> prompt + continuation per prompt (EOS padding removed)."""
        params = check_sampling(sampling, self.tok)
        if not prompts:
            return []
        with ThreadPoolExecutor(min(len(prompts), self.max_concurrency)) as pool:
            return list(pool.map(lambda p: self._infer_one(p, params), prompts))

    def _infer_one(self, prompt: Sequence[int], params: dict[str, Any]) -> list[int]:
        for attempt in range(self.retries + 1):
            try:
                return self.trim(self._infer_watched(prompt, params), len(prompt))
            except ModelRestarted:
                if attempt == self.retries:
                    raise
            except InferenceServerException as e:
                if not self._retryable(e) or attempt == self.retries:
                    raise self._error(e, self.model) from None
                time.sleep(0.2 * 2**attempt)
        raise AssertionError("unreachable")

    def _infer_watched(self, prompt: Sequence[int], params: dict[str, Any]):
        """One unary request within its deadline; ModelRestarted when its model process died meanwhile."""
        before = self._mark(self.model)
        box: dict = {}
        done = threading.Event()

        def callback(result, error) -> None:
            box["result"], box["error"] = result, error
            done.set()

        limit = self.deadline(len(prompt), params)
        call = self._grpc.async_infer(self.model, _inputs(grpcclient, prompt, params), callback,
                                      client_timeout=limit, parameters=_parameters(params))
        while not done.wait(PROBE_S):
            if self._restarted(self.model, before):
                call.cancel()  # tritonserver never answers it: its process is gone
                raise ModelRestarted(f"{self.model} at {self.url}: the model process that held the request died "
                                     "and the model was reloaded; the request was lost (retry)")
        if box["error"] is not None:
            if _dead_stub(box["error"]) and self._await_reload(self.model, before, limit):
                raise ModelRestarted(f"{self.model} at {self.url}: its model process had died; it was reloaded "
                                     "(retry)")
            raise box["error"]
        return box["result"].as_numpy(RESULT)[0]

    def generate(self, texts: str | Sequence[str], **sampling) -> str | list[str]:
        """Text(s) -> generated text(s), prompt included (like LightSeq's output)."""
        single = isinstance(texts, str)
        batch = [texts] if single else list(texts)
        rows = self.generate_ids([self.encode(t) for t in batch], **sampling)
        out = [decode(self.tok, r) for r in rows]
        return out[0] if single else out

    def stream_ids(self, prompt: Sequence[int], cancel: threading.Event | None = None,
                   **sampling) -> Iterator[tuple[int | None, str | None]]:
        """(token id, server text increment or None) as generated; the last item may have no token. Setting
        `cancel` (from any thread) ends the iteration within ~0.1 s and cancels the request on the server, as
        closing the iterator does: its row is freed at the next decode step."""
        params = check_sampling(sampling, self.tok)
        for attempt in range(self.retries + 1):
            try:
                yield from self._stream_once(prompt, cancel, params, last=attempt == self.retries)
                return
            except _Resend:
                continue

    def _stream_once(self, prompt: Sequence[int], cancel: threading.Event | None, params: dict[str, Any],
                     last: bool) -> Iterator[tuple[int | None, str | None]]:
        """One stream; _Resend when a dead model process refused it before any token and the model was reloaded
        since (not on the `last` attempt)."""
        import queue

        q: queue.Queue = queue.Queue()
        c = grpcclient.InferenceServerClient(self.url)  # one stream per call: a client holds one stream
        rid, finished = uuid.uuid4().hex, False  # what the in-band cancel names
        key = secrets.token_urlsafe(24)  # and the secret that proves it is ours (contract.CANCEL_KEY)
        inputs = _inputs(grpcclient, prompt, params)
        limit, before, lost = self.deadline(len(prompt), params), self._mark(self.stream_model), False
        yielded = False
        try:
            c.start_stream(callback=lambda result, error: q.put((result, error)), stream_timeout=limit)
            try:
                c.async_stream_infer(self.stream_model, inputs, request_id=rid, enable_empty_final_response=True,
                                     parameters={**(_parameters(params) or {}), CANCEL_KEY: key, COALESCE: True})
            except InferenceServerException as e:  # the stream broke at once (no server): its callback says why
                finished = True
                try:
                    e = q.get(timeout=1.0)[1] or e
                except queue.Empty:
                    pass
                raise self._error(e, self.stream_model) from None
            while True:
                try:
                    got = self._next_response(q, cancel, before, limit)
                except ModelRestarted:
                    lost = True  # nothing on the server holds it any more: no cancel, no wait for its end
                    raise
                if got is None:
                    return  # cancelled: the finally below cancels the request
                result, error = got
                if error is not None:
                    finished = True
                    if (not yielded and not last and _dead_stub(error)
                            and self._await_reload(self.stream_model, before, limit)):
                        raise _Resend
                    raise self._error(error, self.stream_model)
                ids = result.as_numpy(RESULT)
                text = result.as_numpy(TEXT)
                piece = None if text is None else text.reshape(-1)[0].decode("utf-8")
                for t in [] if ids is None else ids.reshape(-1).tolist():
                    yielded = True
                    yield int(t), piece
                    piece = None
                if piece:
                    yielded = True
                    yield None, piece
                if result.get_response().parameters["triton_final_response"].bool_param:
                    finished = True
                    return
        finally:  # stopped early (cancel, a closed iterator, a timeout): the model is asked to stop the request
            close_stream(c, cancel=None if finished or lost else (self.stream_model, rid, key), wait=0.5 if lost else 5.0)
            c.close()

    def _next_response(self, q, cancel: threading.Event | None, before: str | None, stall: float):
        """The stream's next (result, error), or None once `cancel` is set; RequestTimeout after `stall` s without
        one, ModelRestarted when the stream's model process died meanwhile (its requests are never answered)."""
        import queue

        start = time.monotonic()
        probe = start + PROBE_S
        while True:
            if cancel is not None and cancel.is_set():
                return None
            try:
                return q.get(timeout=0.1 if cancel is not None else min(PROBE_S, stall))
            except queue.Empty:
                now = time.monotonic()
                if now - start >= stall:
                    raise RequestTimeout(f"stream from {self.url} stalled for {stall:.0f}s") from None
                if now >= probe:
                    probe = now + PROBE_S
                    if self._restarted(self.stream_model, before):
                        raise ModelRestarted(f"{self.stream_model} at {self.url}: the model process that held the "
                                             "stream died and the model was reloaded; the request was lost "
                                             "(retry)") from None

    def stream(self, text: str, **sampling) -> Iterator[str]:
        """Text increments as tokens arrive; decode(prompt) + ''.join(increments) == generate(text)."""
        prompt = self.encode(text)
        local = IncrementalDecoder(self.tok, prompt)
        server_text = None
        for tok, piece in self.stream_ids(prompt, **sampling):
            if piece is not None:
                server_text = True
            if server_text:
                if piece:
                    yield piece
            elif tok is not None:
                if tok == self.eos_id:
                    continue  # EOS is a special token: decodes to nothing
                out = local.push(tok)
                if out:
                    yield out
        if not server_text:
            rest = local.flush()
            if rest:
                yield rest

    # -----------------------------------------------------------------------------------------
    # asyncio.

    def _aio_client(self):
        import tritonclient.grpc.aio as aioclient

        if self._aio is None:
            self._aio = aioclient.InferenceServerClient(self.url)
        return self._aio

    async def agenerate_ids(self, prompts: Sequence[Sequence[int]], **sampling) -> list[list[int]]:
        import tritonclient.grpc.aio as aioclient

        params = check_sampling(sampling, self.tok)
        c = self._aio_client()
        sem = asyncio.Semaphore(self.max_concurrency)

        async def one(p: Sequence[int]) -> list[int]:
            async with sem:
                limit = self.deadline(len(p), params)
                for attempt in range(self.retries + 1):
                    before = await asyncio.to_thread(self._mark, self.model)
                    try:
                        r = await c.infer(self.model, _inputs(aioclient, p, params), client_timeout=limit,
                                            parameters=_parameters(params))
                        return self.trim(r.as_numpy(RESULT)[0], len(p))
                    except InferenceServerException as e:
                        if (_dead_stub(e) and attempt < self.retries  # refused by a dead process: once reloaded,
                                and await asyncio.to_thread(self._await_reload, self.model, before, limit)):
                            continue  # sent again
                        if not self._retryable(e) or attempt == self.retries:
                            raise self._error(e, self.model) from None
                        await asyncio.sleep(0.2 * 2**attempt)
                raise AssertionError("unreachable")

        return list(await asyncio.gather(*(one(p) for p in prompts)))

    async def agenerate(self, texts: str | Sequence[str], **sampling) -> str | list[str]:
        single = isinstance(texts, str)
        batch = [texts] if single else list(texts)
        rows = await self.agenerate_ids([self.encode(t) for t in batch], **sampling)
        out = [decode(self.tok, r) for r in rows]
        return out[0] if single else out

    async def astream(self, text: str, **sampling) -> AsyncIterator[str]:
        """Async text increments from the streaming model (needs its text output)."""
        import tritonclient.grpc.aio as aioclient

        params = check_sampling(sampling, self.tok)
        prompt = self.encode(text)
        inputs = _inputs(aioclient, prompt, params)

        async def requests():
            yield {"model_name": self.stream_model, "inputs": inputs,
                   "parameters": {**(_parameters(params) or {}), COALESCE: True}}  # tokens may come several a response

        # The aio stream cannot ask for Triton's empty final response; our model's last response is the
        # one without a token (result [1, 0]), see model_repository/gpt2_stream/config.pbtxt.
        responses = self._aio_client().stream_infer(requests(), stream_timeout=self.deadline(len(prompt), params))
        async for result, error in responses:
            if error is not None:
                raise self._error(error, self.stream_model)
            t = result.as_numpy(TEXT)
            if t is not None and t.reshape(-1)[0]:
                yield t.reshape(-1)[0].decode("utf-8")
            if result.as_numpy(RESULT).size == 0:  # the last response; the server then ends the call (the
                continue  # request side ended after one request): no cancel, which tritonserver 2.51 handles badly

    async def aclose(self) -> None:
        if self._aio is not None:
            await self._aio.close()
            self._aio = None

    def close(self) -> None:
        self._grpc.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
