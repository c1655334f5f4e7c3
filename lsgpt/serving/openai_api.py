"""An OpenAI-compatible API in front of the Triton server (FastAPI over the client library).

    python -m lsgpt.serving.openai_api --url localhost:8001 -p data/tokenizer          # http://127.0.0.1:9000/v1
    make openai                                                                     # the same

    from openai import OpenAI
    c = OpenAI(base_url="http://127.0.0.1:9000/v1", api_key="unused")
    c.completions.create(model="gpt2_int8", prompt="我好难受", max_tokens=32, temperature=0.8, seed=1)
    c.chat.completions.create(model="gpt2_int8", messages=[{"role": "user", "content": "我好难受"}], max_tokens=32)

Endpoints:
- GET /v1/models: the served portable models (503 while the Triton server cannot be reached).
- POST /v1/completions: prompt (a string or a list of strings); max_tokens (default 16, as OpenAI's).
- POST /v1/chat/completions: messages, a list of {role, content} with role system, developer, user or assistant
  and content a string or a list of {"type": "text", "text": ...} parts; max_completion_tokens or max_tokens
  (default: up to the model's length limit, as OpenAI's). The answer's message has role "assistant".

Sampling follows OpenAI (and vLLM), not the exported file's greedy default: temperature (default 1) and top_p
(default 1) sample from the whole distribution, temperature 0 is greedy; vLLM's extra fields top_k (default 0 or
-1: no filter) and repetition_penalty are accepted too (the openai package sends them through extra_body). A
max_tokens / max_completion_tokens beyond what the model allows after the prompt is a 400 naming the limit, as
OpenAI answers a request over the context length (unset, chat generates up to it). Any field this server does
not know is a 400 naming it.

Both take temperature, top_p, seed, stop (a string or a list of strings; the text returned ends before the
first one generated, finish_reason "stop"), presence_penalty, frequency_penalty, and stream: true, which sends
server-sent events through the model's decoupled twin (`text_completion` or `chat.completion.chunk` objects; for
chat a first chunk with the role, content deltas, a last chunk with finish_reason), then `data: [DONE]`;
stream_options {"include_usage": true} adds a last chunk with the usage and no choices. The text returned is the
continuation (OpenAI's `echo: false`); usage counts tokens with the model's tokenizer; finish_reason is "stop" for
EOS or a stop sequence, "length" for the token limit.

Chat template: GPT-2 has none, so the prompt is the messages' contents in order, joined by newlines (the text
parts of one message too); roles are not written into it. The answer is the completion of that prompt: a chat
request and a completions request whose prompt is "\\n".join(contents) generate the same tokens. The Chinese BERT
tokenizer of these models drops whitespace, so the model sees the texts one after the other.

What the engine does not do (n > 1, best_of, logprobs, echo, suffix, logit_bias, tools, response formats other
than text, ...) is refused with a 400 naming it, never ignored; so is every malformed request (OpenAI-style
error JSON, never a 500): text that is not UTF-8 (a lone surrogate such as "\\ud800") is a 400, a body over
MAX_BODY_BYTES a 413 before it is parsed, a prompt or message over contract.MAX_TEXT_BYTES a 400 before it is
tokenized (off the event loop), an integer outside its tensor's range a 400 (never wrapped). A full model queue is
a 429 and an unreachable Triton server a 503, both with Retry-After (streams too: the first token is awaited
before the response starts). Why not Triton's own OpenAI frontend: it runs tritonserver in process through its
Python bindings, which the pip wheel we serve with does not carry. Loopback by default.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lsgpt.client.api import (
    DEFAULT_TOKENIZER,
    Client,
    ClientError,
    InvalidRequest,
    ModelNotReady,
    ServerBusy,
    check_sampling,
)
from lsgpt.contract import MAX_STOP_SEQUENCES, matched_stop, text_error
from lsgpt.contract import PARAMS as SAMPLING_PARAMS
from lsgpt.text import IncrementalDecoder, decode

MODELS = ("gpt2", "gpt2_int8")
# OpenAI name -> our sampling name: OpenAI's sampling parameters carry our names (contract.PARAMS), except
# max_tokens / max_completion_tokens for max_new_tokens (see Job.parse); top_k and repetition_penalty are vLLM's
# extra parameters (the openai package sends them through extra_body)
PARAMS = {name: name for name in SAMPLING_PARAMS if name != "max_new_tokens"}
# OpenAI's defaults, not the exported file's (greedy, top_k 1): temperature 1 samples from the whole distribution
DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
# the fields each endpoint reads (with PARAMS and its unsupported ones); any other is refused with a 400 naming it
COMMON = ("model", "n", "stream", "stream_options", "stop", "user", *PARAMS)
COMPLETION_FIELDS = (*COMMON, "prompt", "max_tokens")
CHAT_FIELDS = (*COMMON, "messages", "max_tokens", "max_completion_tokens")
# what the engine cannot do: refused with a 400 unless the value is a neutral one
UNSUPPORTED = {"best_of": (None, 1), "logprobs": (None, 0), "echo": (None, False),
               "suffix": (None, ""), "logit_bias": (None, {})}
CHAT_UNSUPPORTED = {"logprobs": (None, False), "top_logprobs": (None, 0), "logit_bias": (None, {}),
                    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
                    "function_call": (None, "none"), "response_format": (None, {"type": "text"}),
                    "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,),
                    "parallel_tool_calls": (None, True, False), "store": (None, False), "metadata": (None, {}),
                    "service_tier": (None, "auto", "default"), "reasoning_effort": (None,),
                    "web_search_options": (None,)}
ROLES = ("system", "developer", "user", "assistant")
# A request body beyond this is refused with a 413 before it is read whole or parsed: the largest valid one (a
# few prompts of contract.MAX_TEXT_BYTES, or chat messages up to it) is far smaller
MAX_BODY_BYTES = 1 << 20
RETRY_BUSY_S, RETRY_DOWN_S = 1, 5  # Retry-After of a 429 (the model's queue is full) and of a 503 (no Triton)


class ApiError(Exception):
    """A request answered with an OpenAI-style error: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param
        self.retry_after = retry_after  # seconds, sent as Retry-After (429, 503)


def error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
          retry_after: int | None = None) -> JSONResponse:
    headers = None if retry_after is None else {"Retry-After": str(retry_after)}

    def utf8(x: str | None) -> str | None:  # a message may quote the request's lone surrogate: never a 500
        return None if x is None else x.encode("utf-8", "backslashreplace").decode("utf-8")

    return JSONResponse({"error": {"message": utf8(message), "type": kind, "param": utf8(param), "code": None}},
                        status, headers=headers)


def api_error(e: ClientError, max_key: str = "max_tokens") -> ApiError:
    """The client library's errors as HTTP answers (max_new_tokens named as the request named it)."""
    if isinstance(e, InvalidRequest):
        return ApiError(400, str(e).replace("max_new_tokens", max_key), param=max_key if "max_new_tokens" in str(e)
                        else None)
    if isinstance(e, ServerBusy):  # the model's queue is full: as OpenAI's rate limit, retry after a while
        return ApiError(429, str(e), "rate_limit_error", retry_after=RETRY_BUSY_S)
    if isinstance(e, ModelNotReady):
        return ApiError(404, str(e), "not_found_error")
    return ApiError(503, str(e), "server_error", retry_after=RETRY_DOWN_S)  # Triton unreachable, timeouts


def check_text(text: str, param: str) -> str:
    """`text` if it can be a prompt: UTF-8 (a lone surrogate cannot be encoded) and within contract.MAX_TEXT_BYTES,
    checked before anything tokenizes it; else a 400 naming `param`."""
    why = text_error(text, param)
    if why:
        raise ApiError(400, why, param=param)
    return text


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is answered 413 before the app reads or parses it
    (by its Content-Length at once; a chunked body as soon as the bytes read exceed it). The body is read here,
    at most `limit` bytes, and handed to the app as one message."""

    def __init__(self, app: Any, limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self.refuse(scope, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self.refuse(scope, send)
            if not message.get("more_body"):
                break
        first = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay() -> dict:
            nonlocal first
            if first is not None:
                message, first = first, None
                return message
            return await receive()  # then the disconnect a streaming response listens for

        return await self.app(scope, replay, send)

    async def refuse(self, scope: dict, send: Callable) -> None:
        await error(413, f"the request body is over {self.limit} bytes")(scope, None, send)


@dataclass
class Job:
    """What /v1/completions and /v1/chat/completions share: the model's client, sampling, stop sequences."""

    model: str
    client: Client
    sampling: dict[str, Any]
    stop: tuple[tuple[int, ...], ...]
    streaming: bool
    include_usage: bool
    id: str
    max_key: str = "max_tokens"  # how the request named max_new_tokens (error messages)
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def parse(cls, body: dict[str, Any], models: Sequence[str], client: Callable[[str], Client], *,
              unsupported: dict[str, tuple], fields: Sequence[str], max_keys: Sequence[str], default_max: int | None,
              prefix: str) -> Job:
        unknown = [k for k in body if k not in fields and k not in unsupported]
        if unknown:
            raise ApiError(400, f"unknown parameter {unknown[0]!r}: this server does not support it", param=unknown[0])
        model = body.get("model")
        if not isinstance(model, str) or model not in models:
            raise ApiError(404, f"model {model!r} is not served here (models: {', '.join(models)})",
                           "not_found_error", "model")
        if body.get("n") not in (None, 1):
            raise ApiError(400, "n > 1 is not supported (send the request several times with different seeds)",
                           param="n")
        for k, neutral in unsupported.items():
            if body.get(k) not in neutral:
                raise ApiError(400, f"{k!r} is not supported by this server", param=k)
        sampling = {**DEFAULTS, **{ours: body[theirs] for theirs, ours in PARAMS.items() if body.get(theirs) is not None}}
        if sampling["top_k"] == -1:  # vLLM's "no top-k filter"
            sampling["top_k"] = 0
        given = [k for k in max_keys if body.get(k) is not None]
        if len(given) > 1 and body[given[0]] != body[given[1]]:
            raise ApiError(400, f"{given[0]} and {given[1]} differ: give one", param=given[1])
        if given or default_max is not None:
            sampling["max_new_tokens"] = body[given[0]] if given else default_max
        if given:  # as OpenAI: more than the model allows after the prompt is a 400 naming the limit, not lowered
            sampling["strict_length"] = True
        stream = body.get("stream") or False
        if not isinstance(stream, bool):
            raise ApiError(400, f"stream must be true or false, got {stream!r}", param="stream")
        options = body.get("stream_options")
        if options is not None and (not stream or not isinstance(options, dict)):
            raise ApiError(400, "stream_options is only allowed with stream: true, as an object", param="stream_options")
        stops = body.get("stop")
        if not isinstance(stops, (type(None), str, list)):
            raise ApiError(400, f"stop must be a string or a list of strings, got {stops!r}", param="stop")
        if isinstance(stops, list) and len(stops) > MAX_STOP_SEQUENCES:
            raise ApiError(400, f"{len(stops)} stop sequences: at most {MAX_STOP_SEQUENCES}", param="stop")
        for s in [stops] if isinstance(stops, str) else stops or ():
            if isinstance(s, str):
                check_text(s, "stop")
        c = client(model)
        try:  # types and ranges now, with a 400 naming the parameter; stop: a string or a list of strings
            sampling = check_sampling(sampling)
            stop = check_sampling({"stop": body.get("stop")}, c.tok).get("stop", ())
        except InvalidRequest as e:  # named as the request named it
            raise ApiError(400, str(e).replace("max_new_tokens", given[0] if given else "max_tokens")) from None
        if stop:
            sampling["stop"] = stop
        return cls(model, c, sampling, stop, stream, bool((options or {}).get("include_usage")),
                   f"{prefix}-{uuid.uuid4().hex[:24]}", given[0] if given else max_keys[0])

    def finish(self, new: list[int]) -> tuple[list[int], str]:
        """A continuation -> (the tokens whose text is returned, finish_reason). OpenAI: a stop sequence is not
        part of the text."""
        hit = matched_stop(new, self.stop)
        if hit:
            return new[: len(new) - len(hit)], "stop"
        return new, "stop" if new and new[-1] == self.client.eos_id else "length"

    async def complete(self, prompts: list[list[int]]) -> list[tuple[str, str, int]]:
        """Token prompts -> (text, finish_reason, completion tokens) per prompt, from the non-decoupled model."""
        try:
            rows = await run_in_threadpool(self.client.generate_ids, prompts, **self.sampling)
        except ClientError as e:
            raise api_error(e, self.max_key) from None
        out = []
        for p, row in zip(prompts, rows):
            new = row[len(p):]
            kept, reason = self.finish(new)
            out.append((decode(self.client.tok, kept), reason, len(new)))
        return out

    def _pieces(self, prompt: list[int], info: dict[str, Any], cancel: threading.Event | None = None) -> Iterator[str]:
        """Text increments of one streamed continuation (joined: the non-streamed text). Tokens that may belong
        to a stop sequence (the last len(longest stop) ones) are held back: the stream ends right after a stop
        sequence, which is then dropped. At the end, info holds finish_reason and completion_tokens."""
        c, lag, new = self.client, max(map(len, self.stop), default=0), []
        dec = IncrementalDecoder(c.tok, prompt)

        def push(tok: int) -> str:
            return "" if tok == c.eos_id else dec.push(tok)  # EOS is a special token: no text

        for tok, _ in c.stream_ids(prompt, cancel=cancel, **self.sampling):
            if tok is None:
                continue
            new.append(tok)
            if len(new) > lag and (piece := push(new[-1 - lag])):
                yield piece
        kept, info["finish_reason"] = self.finish(new)
        rest = "".join(push(t) for t in kept[max(0, len(new) - lag):]) + dec.flush()
        if rest:
            yield rest
        info["completion_tokens"] = len(new)

    async def stream(self, prompt: list[int], chunk: Callable[[str | None, str | None], dict],
                     usage_chunk: Callable[[dict], dict], opening: dict | None = None) -> StreamingResponse:
        """Server-sent events: `opening` (if any), chunk(text, None) per increment, chunk(None, finish_reason)
        last, then the usage (if asked) and [DONE]. The first increment is awaited here, so that a request the model refuses gets a
        4xx instead of a stream that fails."""
        info: dict[str, Any] = {}
        gone = threading.Event()  # set when the HTTP client goes away: the gRPC stream is cancelled at once
        pieces = iterate_in_threadpool(self._pieces(prompt, info, gone))
        try:
            first = [await pieces.__anext__()]
        except StopAsyncIteration:
            first = []
        except ClientError as e:
            raise api_error(e, self.max_key) from None

        def sse(obj: Any) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        async def events() -> AsyncIterator[str]:
            try:
                if opening is not None:
                    yield sse(opening)
                for piece in first:
                    yield sse(chunk(piece, None))
                async for piece in pieces:
                    yield sse(chunk(piece, None))
                yield sse(chunk(None, info["finish_reason"]))
                if self.include_usage:
                    n = info["completion_tokens"]
                    yield sse(usage_chunk({"prompt_tokens": len(prompt), "completion_tokens": n,
                                           "total_tokens": len(prompt) + n}))
            except ClientError as e:
                yield sse({"error": {"message": str(e), "type": api_error(e).kind, "param": None, "code": None}})
            finally:  # also on a disconnect (the task is cancelled): the row must not run on for nobody
                gone.set()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


def chat_prompt(messages: Any) -> str:
    """The chat template (GPT-2 has none): the contents in order, joined by newlines; roles are checked, not
    written."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    texts = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"{where} must be an object with role and content", param=where)
        if m.get("role") not in ROLES:
            raise ApiError(400, f"{where}.role {m.get('role')!r} is not supported (one of: {', '.join(ROLES)})",
                           param=f"{where}.role")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for j, p in enumerate(content):
                if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                    raise ApiError(400, f"{where}.content[{j}]: only text parts ({{\"type\": \"text\", \"text\": "
                                   f"...}}) are supported", param=f"{where}.content")
                parts.append(p["text"])
            content = "\n".join(parts)
        if not isinstance(content, str) or not content.strip():
            raise ApiError(400, f"{where}.content must be a non-empty string or a list of text parts",
                           param=f"{where}.content")
        texts.append(check_text(content, f"{where}.content"))  # UTF-8 and size, before tokenizing
    return check_text("\n".join(texts), "messages")


async def on_http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
    """Starlette's own errors (e.g. a body that is not UTF-8 JSON) as OpenAI-style errors."""
    return error(e.status_code, str(e.detail))


async def encode(job: Job, texts: list[str]) -> list[list[int]]:
    """The prompts' ids, tokenized in a worker thread: the event loop keeps serving meanwhile."""
    try:
        return await run_in_threadpool(lambda: [job.client.encode(t) for t in texts])
    except ClientError as e:
        raise api_error(e) from None


def create_app(url: str, tokenizer: str = DEFAULT_TOKENIZER, models: tuple[str, ...] = MODELS) -> FastAPI:
    app = FastAPI(title="lsgpt-triton OpenAI-compatible API")
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES)
    clients: dict[str, Client] = {}

    def client(model: str) -> Client:
        if model not in clients:
            clients[model] = Client(url, model, tokenizer)
        return clients[model]

    @app.exception_handler(ApiError)
    async def on_api_error(_: Request, e: ApiError) -> JSONResponse:
        return error(e.status, e.message, e.kind, e.param, e.retry_after)

    app.add_exception_handler(StarletteHTTPException, on_http_error)
    @app.exception_handler(RequestValidationError)
    async def on_bad_body(_: Request, e: RequestValidationError) -> JSONResponse:
        return error(400, f"the body must be a JSON object ({'; '.join(d.get('msg', '') for d in e.errors())})")

    @app.get("/v1/models")
    def list_models():
        if not client(models[0]).live():  # as the completions would: 503 while Triton is down
            raise ApiError(503, f"the Triton server at {url} is not reachable", "server_error")
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "lsgpt-triton"}
                                           for m in models]}

    @app.post("/v1/completions")
    async def completions(body: dict[str, Any]):
        prompts = body.get("prompt", "")
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ApiError(400, "prompt must be a string or a non-empty list of strings", param="prompt")
        for p in prompts:
            check_text(p, "prompt")  # UTF-8 and size, before tokenizing
        job = Job.parse(body, models, client, unsupported=UNSUPPORTED, fields=COMPLETION_FIELDS,
                        max_keys=("max_tokens",), default_max=16, prefix="cmpl")
        head = {"id": job.id, "object": "text_completion", "created": job.created, "model": job.model}
        ids = await encode(job, prompts)
        if job.streaming:
            if len(ids) != 1:
                raise ApiError(400, "stream: true takes one prompt", param="prompt")
            return await job.stream(
                ids[0],
                lambda text, finish: {**head, "choices": [{"text": text or "", "index": 0, "logprobs": None,
                                                           "finish_reason": finish}]},
                lambda usage: {**head, "choices": [], "usage": usage})
        answers = await job.complete(ids)
        prompt_tokens, completion = sum(map(len, ids)), sum(n for _, _, n in answers)
        return {**head, "choices": [{"text": text, "index": i, "logprobs": None, "finish_reason": finish}
                                    for i, (text, finish, _) in enumerate(answers)],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                          "total_tokens": prompt_tokens + completion}}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: dict[str, Any]):
        prompt = chat_prompt(body.get("messages"))
        job = Job.parse(body, models, client, unsupported=CHAT_UNSUPPORTED, fields=CHAT_FIELDS,
                        max_keys=("max_completion_tokens", "max_tokens"), default_max=None, prefix="chatcmpl")
        head = {"id": job.id, "object": "chat.completion", "created": job.created, "model": job.model,
                "system_fingerprint": None}
        [ids] = await encode(job, [prompt])
        if job.streaming:
            chunk_head = {**head, "object": "chat.completion.chunk"}

            def chunk(delta: dict[str, Any], finish: str | None = None) -> dict:
                return {**chunk_head, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                   "finish_reason": finish}]}

            return await job.stream(  # as OpenAI: the role first, then content deltas, then the finish_reason
                ids, lambda text, finish: chunk({} if text is None else {"content": text}, finish),
                lambda usage: {**chunk_head, "choices": [], "usage": usage},
                opening=chunk({"role": "assistant", "content": ""}))
        [(text, finish, n)] = await job.complete([ids])
        return {**head, "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                                     "logprobs": None, "finish_reason": finish}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}}

    return app


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="localhost:8001", help="Triton gRPC address")
    ap.add_argument("-p", "--tokenizer", default=DEFAULT_TOKENIZER)
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    ap.add_argument("--port", type=int, default=9000)
    a = ap.parse_args(argv)
    import uvicorn

    uvicorn.run(create_app(a.url, a.tokenizer), host=a.host, port=a.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
