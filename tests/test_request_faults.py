"""Per-request faults through the real tritonserver and the OpenAI gateway driven by the official `openai` package
(issue 28, docs/security.md): a cancel stops only its owner's request; text is size-checked before it is
tokenized; a full queue is ServerBusy / HTTP 429 with Retry-After, an unreachable Triton 503 with Retry-After
(streams too), bad text a 400; integers are range-checked before any numpy cast.

gpt2 and gpt2_stream serve test_cancellation's long model (1024 positions, ln_f with zero gain: its greedy
continuation is one token, never EOS), so a request of MAX_NEW tokens runs for seconds on a CPU; gpt2_int8 and
its twin (the tiny int8 model) queue nothing (max_queued_requests 0): their queue is always full. No wall-clock
assertions: deadlines are hang guards only."""

from __future__ import annotations

import dataclasses
import http.client
import json
import re
import secrets
import threading
import time
import uuid

import numpy as np
import pytest

grpcclient = pytest.importorskip("tritonclient.grpc")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
from conftest import TINY_VOCAB, make_repository  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from lsgpt import contract  # noqa: E402
from lsgpt.serving.launcher import TritonServer, free_port  # noqa: E402

MAX_STEP, MAX_NEW = 1024, 1000
TOKEN = TINY_VOCAB.index("我")  # the model's only greedy token
PROMPT = [2, 7, 8, 9]


def export_long_model(path):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from lsgpt.export.convert import export_model

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=4, n_embd=128, n_head=4, vocab_size=len(TINY_VOCAB), n_positions=MAX_STEP,
                     bos_token_id=2, eos_token_id=3, pad_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # logits = wte @ ln_f.bias whatever the input: TOKEN wins
        wte = model.transformer.wte.weight
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(wte[TOKEN] / wte[TOKEN].dot(wte[TOKEN]) * 10)
    return export_model(model, path, max_step=MAX_STEP, eos_id=3)


def serve_app(app) -> tuple[str, uvicorn.Server, threading.Thread]:
    port = free_port()
    web = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=web.run, daemon=True)
    t.start()
    while not web.started:
        time.sleep(0.05)
    return f"127.0.0.1:{port}", web, t


@pytest.fixture(scope="module")
def served(tiny_models, tmp_path_factory):
    """(tritonserver, the gateway's host:port, the tokenizer folder)."""
    from lsgpt.serving.openai_api import create_app

    d = tmp_path_factory.mktemp("faults")
    path = export_long_model(d / "long.hdf5")
    (d / "repo").mkdir()
    repo = make_repository(d / "repo", dataclasses.replace(tiny_models, fp16=path, max_step=MAX_STEP))
    for model in ("gpt2_int8", "gpt2_int8_stream"):  # a queue that is always full
        config = repo / model / "config.pbtxt"
        text, n = re.subn(r'(key: "max_queued_requests", value: \{ string_value: )"\d+"', r'\1"0"', config.read_text())
        assert n == 1
        config.write_text(text)
    server = TritonServer(repo, models=["gpt2", "gpt2_stream", "gpt2_int8", "gpt2_int8_stream"],
                          grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())
    with server:
        server.wait_ready(180)
        gateway, web, t = serve_app(create_app(server.grpc_url, str(tiny_models.tokenizer)))
        yield server, gateway, tiny_models.tokenizer
        web.should_exit = True
        t.join(10)


def inputs(prompt: list[int], n: int) -> list:
    out = []
    for name, value in (("token_ids", prompt), ("max_new_tokens", [n]), ("top_k", [1])):
        t = grpcclient.InferInput(name, [1, len(value)], "INT32")
        t.set_data_from_numpy(np.asarray([value], np.int32))
        out.append(t)
    return out


class Stream:
    """A long request streamed from gpt2_stream with a request id and its owner's cancel key."""

    def __init__(self, url: str, model: str = "gpt2_stream"):
        self.model, self.rid, self.key = model, uuid.uuid4().hex, secrets.token_hex(16)
        self.tokens: list[int] = []
        self.errors: list = []
        self.cv = threading.Condition()
        self.c = grpcclient.InferenceServerClient(url)
        self.c.start_stream(callback=self._callback)
        self.c.async_stream_infer(model, inputs(PROMPT, MAX_NEW), request_id=self.rid,
                                  parameters={contract.CANCEL_KEY: self.key})

    def _callback(self, result, error) -> None:
        with self.cv:
            if error is not None:
                self.errors.append(error)
            elif result.as_numpy("result") is not None:
                self.tokens.extend(result.as_numpy("result").reshape(-1).tolist())
            self.cv.notify_all()

    def wait(self, n: int) -> None:
        with self.cv:
            assert self.cv.wait_for(lambda: len(self.tokens) >= n or self.errors, 120), "hang guard"

    def close(self) -> None:
        from lsgpt.client.api import close_stream

        close_stream(self.c, cancel=(self.model, self.rid, self.key), wait=120)
        self.c.close()


def send_cancel(url: str, model: str, params: dict) -> list:
    """An in-band cancel sent on a stream of its own (another connection than the request's): -> its errors."""
    from lsgpt.client.api import close_stream

    c = grpcclient.InferenceServerClient(url)
    got, answered = [], threading.Event()

    def callback(result, error) -> None:
        if error is not None:
            got.append(error)
        answered.set()

    try:
        c.start_stream(callback=callback)
        c.async_stream_infer(model, inputs([0], 1), parameters=params)
        assert answered.wait(60), "hang guard"
    finally:
        close_stream(c, wait=60)
        c.close()
    return got


def test_a_cancel_stops_only_its_owners_request(served):
    """Anyone who learns (or guesses) a request id could stop it with lsgpt_cancel=<id>; now a cancel must also
    name the secret key the request carried (contract.CANCEL_KEY): without it INVALID_ARGUMENT, with a wrong one
    nothing happens; the owner's cancel works from any connection."""
    server, _, _ = served
    a = Stream(server.grpc_url)
    try:
        a.wait(2)
        no_key = send_cancel(server.grpc_url, a.model, {contract.CANCEL: a.rid})
        assert len(no_key) == 1 and contract.CANCEL_KEY in no_key[0].message(), no_key
        for wrong in ("wrong", "", a.key[:-1], a.key + "0"):
            assert send_cancel(server.grpc_url, a.model, {contract.CANCEL: a.rid, contract.CANCEL_KEY: wrong}) == []
        n = len(a.tokens)
        a.wait(n + 50)  # a cancel reaches the row at its next step: 50 tokens later it is still running
        assert not a.errors and len(a.tokens) >= n + 50, [str(e) for e in a.errors]
        assert send_cancel(server.grpc_url, a.model, {contract.CANCEL: a.rid, contract.CANCEL_KEY: a.key}) == []
        with a.cv:
            assert a.cv.wait_for(lambda: a.errors, 120), "hang guard"
        assert "cancelled" in str(a.errors[0]).lower() and len(a.tokens) < MAX_NEW
    finally:
        a.close()


def test_an_oversized_text_prompt_is_refused_before_it_is_tokenized(served):
    """8 MiB of text_input: INVALID_ARGUMENT naming the byte limit (contract.MAX_TEXT_BYTES), not seconds of
    tokenizing and then 'too long'; the model then serves a valid request."""
    server, _, _ = served
    c = grpcclient.InferenceServerClient(server.grpc_url)
    text = grpcclient.InferInput("text_input", [1, 1], "BYTES")
    text.set_data_from_numpy(np.asarray([[("我" * (8 * 2**20 // 3)).encode()]], dtype=np.object_))
    t0 = time.perf_counter()
    with pytest.raises(InferenceServerException) as ei:
        c.infer("gpt2", [text], client_timeout=120)
    print(f"\n8 MiB text_input refused in {time.perf_counter() - t0:.2f} s: {ei.value.message()[:120]}")
    assert str(ei.value.status()).endswith("INVALID_ARGUMENT") and str(contract.MAX_TEXT_BYTES) in ei.value.message()
    assert c.infer("gpt2", inputs(PROMPT, 3)).as_numpy("result").tolist() == [PROMPT + [TOKEN] * 3]
    c.close()


def test_a_full_queue_is_server_busy_and_429_with_retry_after(served):
    """A full queue (UNAVAILABLE from the model): the client library raises ServerBusy (it raised ModelNotReady,
    and InvalidRequest for a stream), the gateway answers 429 with Retry-After (it answered 404), streams too.
    gpt2_int8 and its twin queue nothing here (max_queued_requests 0): every request finds the queue full."""
    from lsgpt.client.api import Client, ServerBusy

    server, gateway, tok = served
    with Client(server.grpc_url, "gpt2_int8", tok, retries=1) as cl:  # retried with backoff, then ServerBusy
        with pytest.raises(ServerBusy, match="max_queued_requests=0"):
            cl.generate_ids([PROMPT], max_new_tokens=2)
        with pytest.raises(ServerBusy, match="max_queued_requests=0"):
            list(cl.stream_ids(PROMPT, max_new_tokens=2))
    api = openai.OpenAI(base_url=f"http://{gateway}/v1", api_key="unused", max_retries=0)
    calls = [lambda s: api.completions.create(model="gpt2_int8", prompt="我", max_tokens=2, stream=s),
             lambda s: api.chat.completions.create(model="gpt2_int8", messages=[{"role": "user", "content": "我"}],
                                                   max_tokens=2, stream=s)]
    for stream in (False, True):
        for call in calls:
            with pytest.raises(openai.RateLimitError) as ei:
                call(stream)
            assert ei.value.status_code == 429 and int(ei.value.response.headers["retry-after"]) >= 1
            assert "max_queued_requests" in ei.value.message


def test_unreachable_triton_is_503_with_retry_after_streams_included(tiny_models):
    """The gateway in front of a port nobody listens on: completions and chat, streamed or not, answer 503 with
    Retry-After (a stream answered 500)."""
    from lsgpt.serving.openai_api import create_app

    gateway, web, t = serve_app(create_app(f"127.0.0.1:{free_port()}", str(tiny_models.tokenizer)))
    try:
        api = openai.OpenAI(base_url=f"http://{gateway}/v1", api_key="unused", max_retries=0)
        calls = [lambda s: api.completions.create(model="gpt2", prompt="我", max_tokens=2, stream=s),
                 lambda s: api.chat.completions.create(model="gpt2", messages=[{"role": "user", "content": "我"}],
                                                       max_tokens=2, stream=s)]
        for call in calls:
            for stream in (False, True):
                with pytest.raises(openai.InternalServerError) as ei:
                    call(stream)
                assert ei.value.status_code == 503, (stream, ei.value)
                assert int(ei.value.response.headers["retry-after"]) >= 1
    finally:
        web.should_exit = True
        t.join(10)


def test_gateway_body_and_text_limits_and_bad_text(served):
    """A body over the gateway's cap: 413 before it is parsed (Content-Length and chunked); a prompt or message
    over contract.MAX_TEXT_BYTES: 400 naming it, before tokenizing; a lone surrogate or invalid UTF-8: 400."""
    from lsgpt.serving.openai_api import MAX_BODY_BYTES

    _, gateway, _ = served
    api = openai.OpenAI(base_url=f"http://{gateway}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.APIStatusError) as ei:
        api.completions.create(model="gpt2", prompt="我" * (MAX_BODY_BYTES // 3 + 10), max_tokens=2)
    assert ei.value.status_code == 413, ei.value
    big = "我" * (contract.MAX_TEXT_BYTES // 3 + 1)  # over the text cap, under the body cap
    with pytest.raises(openai.BadRequestError, match=str(contract.MAX_TEXT_BYTES)):
        api.completions.create(model="gpt2", prompt=big, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match=str(contract.MAX_TEXT_BYTES)):
        api.chat.completions.create(model="gpt2", messages=[{"role": "user", "content": big}], max_tokens=2)

    def post(body: bytes, chunked: bool = False) -> tuple[int, str]:
        conn = http.client.HTTPConnection(gateway, timeout=120)
        headers = {"Content-Type": "application/json"}
        if chunked:
            conn.request("POST", "/v1/completions", body=iter([body[i:i + 65536] for i in range(0, len(body), 65536)]),
                         headers=headers, encode_chunked=True)
        else:
            conn.request("POST", "/v1/completions", body=body, headers=headers)
        r = conn.getresponse()
        out = r.status, r.read().decode()
        conn.close()
        return out

    huge = json.dumps({"model": "gpt2", "prompt": "a" * (MAX_BODY_BYTES + 10)}).encode()
    assert post(huge, chunked=True)[0] == 413
    for raw in (b'{"model": "gpt2", "prompt": "\\ud800", "max_tokens": 2}',
                b'{"model": "gpt2", "prompt": "\xff\xfe", "max_tokens": 2}',
                b'{"model": "gpt2", "prompt": "x", "stop": "\\udfff", "max_tokens": 2}',
                b'{"model": "gpt2", "messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}'):
        path_chat = b"messages" in raw
        conn = http.client.HTTPConnection(gateway, timeout=120)
        conn.request("POST", "/v1/chat/completions" if path_chat else "/v1/completions", body=raw,
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        status, text = r.status, r.read().decode()
        conn.close()
        assert status == 400 and "error" in json.loads(text), (raw, status, text)
    assert api.completions.create(model="gpt2", prompt="我", max_tokens=2, temperature=0).choices[0].text == "我我"


def test_integers_are_range_checked_before_any_cast(served):
    """numpy wraps an out-of-range int on the way to INT32: max_new_tokens 2**32+5 became 5, token id 2**40
    token 0. The client library and the gateway refuse them (InvalidRequest / 400 naming the range)."""
    from lsgpt.client.api import Client, InvalidRequest

    server, gateway, tok = served
    with Client(server.grpc_url, "gpt2", tok, retries=0) as cl:
        with pytest.raises(InvalidRequest, match="out of range"):
            cl.generate_ids([PROMPT], max_new_tokens=2**32 + 5)
        with pytest.raises(InvalidRequest, match="out of range"):
            cl.generate_ids([[2, 2**40]], max_new_tokens=2)
        with pytest.raises(InvalidRequest, match="out of range"):
            list(cl.stream_ids([2, -(2**33)], max_new_tokens=2))
        with pytest.raises(InvalidRequest, match="out of range"):
            cl.generate_ids([PROMPT], top_k=2**40)
    api = openai.OpenAI(base_url=f"http://{gateway}/v1", api_key="unused", max_retries=0)
    for kwargs in ({"max_tokens": 2**32 + 5}, {"max_tokens": 2, "seed": 2**64}, {"max_tokens": 2, "extra_body": {"top_k": 2**40}},
                   {"max_tokens": 2, "temperature": 1e300}):
        with pytest.raises(openai.BadRequestError, match="out of range"):
            api.completions.create(model="gpt2", prompt="我", **kwargs)
