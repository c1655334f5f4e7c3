"""An OpenAI-compatible completions API in front of the Triton server (FastAPI over the client library).

    python client/openai_server.py --url localhost:8001 -p data/tokenizer          # http://127.0.0.1:9000/v1
    make openai                                                                     # the same

    from openai import OpenAI
    c = OpenAI(base_url="http://127.0.0.1:9000/v1", api_key="unused")
    c.completions.create(model="gpt2_int8", prompt="我好难受", max_tokens=32, temperature=0.8, seed=1)

Endpoints: GET /v1/models (the served portable models), POST /v1/completions (prompt: a string or a list of
strings; max_tokens, temperature, top_p, seed, presence_penalty, frequency_penalty; stream: true sends
server-sent events through the model's decoupled twin, then `data: [DONE]`). The text returned is the
continuation (OpenAI's `echo: false`); usage counts tokens with the model's tokenizer. What the engine does not
do (n > 1, best_of, logprobs, echo, suffix) is refused with a 400 naming it, never ignored.
Why not Triton's own OpenAI frontend: it runs tritonserver in process through its Python bindings, which the
pip wheel we serve with does not carry. Loopback by default.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from client.api import DEFAULT_TOKENIZER, Client, ClientError, InvalidRequest, ModelNotReady, check_sampling
from lsgpt.contract import matched_stop
from lsgpt.text import decode

MODELS = ("gpt2", "gpt2_int8")
# OpenAI name -> our sampling name
PARAMS = {"max_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p", "seed": "seed",
          "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty"}
# what the engine cannot do: refused with a 400 unless the value is a neutral one
UNSUPPORTED = {"best_of": (None, 1), "logprobs": (None, 0), "echo": (None, False),
               "suffix": (None, ""), "logit_bias": (None, {})}


def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}}, status)


def create_app(url: str, tokenizer: str = DEFAULT_TOKENIZER, models: tuple[str, ...] = MODELS) -> FastAPI:
    app = FastAPI(title="lsgpt-triton OpenAI-compatible API")
    clients: dict[str, Client] = {}

    def client(model: str) -> Client:
        if model not in clients:
            clients[model] = Client(url, model, tokenizer)
        return clients[model]

    @app.get("/v1/models")
    def list_models():
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "lsgpt-triton"}
                                           for m in models]}

    @app.post("/v1/completions")
    async def completions(body: dict[str, Any]):
        model = body.get("model")
        if model not in models:
            return error(404, f"model {model!r} is not served here (models: {', '.join(models)})", "not_found_error")
        prompts = body.get("prompt", "")
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            return error(400, "prompt must be a string or a non-empty list of strings")
        if body.get("n", 1) != 1:
            return error(400, "n > 1 is not supported (send the prompt several times with different seeds)")
        for k, neutral in UNSUPPORTED.items():
            if body.get(k) not in neutral:
                return error(400, f"{k!r} is not supported by this server")
        sampling = {ours: body[theirs] for theirs, ours in PARAMS.items() if body.get(theirs) is not None}
        sampling.setdefault("max_new_tokens", 16)  # OpenAI's default max_tokens
        c = client(model)
        try:  # stop: a string or up to 4 strings (OpenAI); the text returned ends before it
            stop = check_sampling({"stop": body.get("stop")}, c.tok).get("stop", ())
        except InvalidRequest as e:
            return error(400, str(e))
        if stop:
            sampling["stop"] = stop
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.get("stream"):
            if len(prompts) != 1:
                return error(400, "stream: true takes one prompt")
            tails = [decode(c.tok, list(s)) for s in stop]  # what a stop sequence looks like as text
            return StreamingResponse(stream_events(c, prompts[0], sampling, rid, created, model, tails),
                                     media_type="text/event-stream")
        try:
            ids = [c.encode(p) for p in prompts]
            rows = await run_in_threadpool(c.generate_ids, ids, **sampling)
        except InvalidRequest as e:
            return error(400, str(e))
        except ModelNotReady as e:
            return error(404, str(e), "not_found_error")
        except ClientError as e:
            return error(503, str(e), "server_error")
        choices, completion = [], 0
        for i, (p, row) in enumerate(zip(ids, rows)):
            new = row[len(p):]
            completion += len(new)
            stopped = bool(new) and new[-1] == c.eos_id
            hit = matched_stop(new, stop)
            if hit:  # OpenAI: the stop sequence is not part of the text
                new, stopped = new[: len(new) - len(hit)], True
            choices.append({"text": decode(c.tok, new), "index": i, "logprobs": None,
                            "finish_reason": "stop" if stopped else "length"})
        prompt_tokens = sum(len(p) for p in ids)
        return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                          "total_tokens": prompt_tokens + completion}}

    return app


async def stream_events(c: Client, prompt: str, sampling: dict, rid: str, created: int, model: str,
                        tails: Sequence[str] = ()):
    def event(text: str, finish: str | None) -> str:
        chunk = {"id": rid, "object": "text_completion", "created": created, "model": model,
                 "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}]}
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    # With stop sequences, hold back as many characters as the longest one: the stream ends right after a stop
    # sequence, which is then cut off (OpenAI sends no stop text).
    hold, held = max(map(len, tails), default=0), ""
    try:
        async for piece in iterate_in_threadpool(c.stream(prompt, **sampling)):
            held += piece or ""
            if len(held) > hold:
                yield event(held[: len(held) - hold], None)
                held = held[len(held) - hold:]
        hit = [t for t in tails if t and held.endswith(t)]
        yield event(held[: len(held) - len(hit[0])] if hit else held, "stop" if hit else "length")
    except ClientError as e:
        yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n"
    yield "data: [DONE]\n\n"


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
