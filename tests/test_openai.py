"""The OpenAI-compatible API (lsgpt/serving/openai_api.py: /v1/completions, /v1/chat/completions) in front of the real
tritonserver, driven by the official `openai` Python package. Oracle: the engine in process on the same prompt
([CLS] text, greedy); for chat, on the documented template (the contents joined by newlines)."""

from __future__ import annotations

import threading
import time

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
from conftest import make_repository  # noqa: E402

from lsgpt.engine.engine import Engine, SamplingParams
from lsgpt.serving.launcher import TritonServer, free_port
from lsgpt.text import decode, encode_prompt, load_tokenizer

SERVED: dict[str, str] = {}  # the api fixture's tritonserver: its gRPC address


@pytest.fixture(scope="module")
def api(tiny_models, tmp_path_factory):
    from lsgpt.serving.openai_api import create_app

    repo = make_repository(tmp_path_factory.mktemp("repo"), tiny_models)
    server = TritonServer(repo, models=["gpt2", "gpt2_int8", "gpt2_stream", "gpt2_int8_stream"],
                          grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())
    with server:
        server.wait_ready(180)
        port = free_port()
        web = uvicorn.Server(uvicorn.Config(create_app(server.grpc_url, str(tiny_models.tokenizer)), host="127.0.0.1",
                                            port=port, log_level="warning"))
        t = threading.Thread(target=web.run, daemon=True)
        t.start()
        while not web.started:
            time.sleep(0.05)
        SERVED["grpc"] = server.grpc_url
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0), tiny_models
        web.should_exit = True
        t.join(10)


def test_models_and_completions_equal_the_engine(api):
    c, tiny = api
    assert {m.id for m in c.models.list().data} == {"gpt2", "gpt2_int8"}
    tok = load_tokenizer(tiny.tokenizer)
    for model, path in (("gpt2", tiny.fp16), ("gpt2_int8", tiny.int8)):
        r = c.completions.create(model=model, prompt=["我今天很开心", "hello world"], max_tokens=10, temperature=0)
        e = Engine.load(path, device="cpu")
        for choice, text in zip(r.choices, ["我今天很开心", "hello world"]):
            p = encode_prompt(tok, text)
            want = e.generate([p], SamplingParams(max_new_tokens=10, top_k=1))[0]
            assert choice.text == decode(tok, want[len(p):])
            assert choice.finish_reason == ("stop" if want[-1] == tiny.eos_id else "length")
        assert r.usage.completion_tokens == sum(
            len(e.generate([encode_prompt(tok, t)], SamplingParams(max_new_tokens=10, top_k=1))[0])
            - len(encode_prompt(tok, t)) for t in ["我今天很开心", "hello world"])
    # streamed through the int8 twin: the pieces join to the non-streamed text
    whole = c.completions.create(model="gpt2_int8", prompt="我要找个", max_tokens=12, temperature=0).choices[0].text
    pieces = [ch.choices[0].text for ch in c.completions.create(model="gpt2_int8", prompt="我要找个", max_tokens=12,
                                                                 temperature=0, stream=True)]
    assert "".join(pieces) == whole


def test_bad_requests_are_clear_400s(api):
    c, _ = api
    with pytest.raises(openai.NotFoundError, match="not served"):
        c.completions.create(model="gpt3", prompt="x")
    with pytest.raises(openai.BadRequestError, match="top_p"):
        c.completions.create(model="gpt2", prompt="x", top_p=3.0)
    with pytest.raises(openai.BadRequestError, match="'suffix' is not supported"):
        c.completions.create(model="gpt2", prompt="x", suffix="y")
    with pytest.raises(openai.BadRequestError, match="at most"):
        c.completions.create(model="gpt2", prompt="x", stop=[str(i) for i in range(17)])
    with pytest.raises(openai.BadRequestError, match="n > 1"):
        c.completions.create(model="gpt2", prompt="x", n=2)
    assert c.completions.create(model="gpt2", prompt="x", max_tokens=2, temperature=0).choices[0].text is not None


def test_stop_ends_the_text_before_the_stop_sequence(api):
    """OpenAI semantics: the completion ends where a stop sequence was generated and does not contain it,
    finish_reason "stop"; streamed pieces join to the same text. Oracle: the engine's greedy continuation."""
    c, tiny = api
    tok = load_tokenizer(tiny.tokenizer)
    p = encode_prompt(tok, "我今天很开心")
    sp = SamplingParams(max_new_tokens=10, top_k=1, presence_penalty=2.0)  # a penalty: no repeated token
    new = Engine.load(tiny.fp16, device="cpu").generate([p], sp)[0][len(p):]
    k = next((i for i in range(1, len(new)) if new[i] not in new[:i] and new[i] != tiny.eos_id
              and tok.encode(tok.convert_ids_to_tokens(new[i]), add_special_tokens=False) == [new[i]]), None)
    assert k is not None, f"no usable stop token in {new}"
    stop = tok.convert_ids_to_tokens(new[k])
    r = c.completions.create(model="gpt2", prompt="我今天很开心", max_tokens=10, temperature=0, presence_penalty=2.0, stop=stop)
    assert r.choices[0].text == decode(tok, new[:k]) and r.choices[0].finish_reason == "stop"
    chunks = list(c.completions.create(model="gpt2", prompt="我今天很开心", max_tokens=10, temperature=0, presence_penalty=2.0, stop=[stop],
                                       stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == decode(tok, new[:k])
    assert chunks[-1].choices[0].finish_reason == "stop"


# ---------------------------------------------------------------------------------------------
# /v1/chat/completions: the prompt is the messages' contents joined by newlines (GPT-2 has no chat template).

CHAT = [{"role": "system", "content": "我今天"},
        {"role": "user", "content": [{"type": "text", "text": "很开心"}, {"type": "text", "text": "hello"}]},
        {"role": "assistant", "content": "world"}, {"role": "user", "content": "我要找个"}]
TEMPLATED = "我今天\n很开心\nhello\nworld\n我要找个"  # the contents (and text parts) joined by newlines


def test_chat_equals_the_engines_completion_of_the_templated_prompt(api):
    """Chat answers, plain and streamed, on both models: the engine's greedy continuation of [CLS] + the
    templated prompt, computed in process; usage counts its tokens; the stream is OpenAI's chunk sequence."""
    c, tiny = api
    tok = load_tokenizer(tiny.tokenizer)
    p = encode_prompt(tok, TEMPLATED)
    for model, path, limit in (("gpt2", tiny.fp16, {"max_completion_tokens": 10}),
                               ("gpt2_int8", tiny.int8, {"max_tokens": 10})):
        want = Engine.load(path, device="cpu").generate([p], SamplingParams(max_new_tokens=10, top_k=1))[0][len(p):]
        text, finish = decode(tok, want), ("stop" if want[-1] == tiny.eos_id else "length")
        r = c.chat.completions.create(model=model, messages=CHAT, temperature=0, **limit)
        assert r.object == "chat.completion" and r.model == model and len(r.choices) == 1
        assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == text
        assert r.choices[0].finish_reason == finish
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
            len(p), len(want), len(p) + len(want))
        chunks = list(c.chat.completions.create(model=model, messages=CHAT, temperature=0, stream=True,
                                                stream_options={"include_usage": True}, **limit))
        assert {ch.object for ch in chunks} == {"chat.completion.chunk"} and len({ch.id for ch in chunks}) == 1
        assert chunks[0].choices[0].delta.role == "assistant" and not chunks[0].choices[0].delta.content
        body, last, usage = chunks[1:-2], chunks[-2], chunks[-1]
        assert all(ch.choices[0].finish_reason is None and ch.choices[0].delta.content for ch in body)
        assert "".join(ch.choices[0].delta.content for ch in body) == text
        assert last.choices[0].finish_reason == finish and not last.choices[0].delta.content
        assert usage.choices == [] and usage.usage.completion_tokens == len(want)
    # the same answer as /v1/completions on the templated prompt (the documented template)
    assert c.completions.create(model="gpt2", prompt=TEMPLATED, max_tokens=10, temperature=0).choices[0].text == \
        c.chat.completions.create(model="gpt2", messages=CHAT, max_tokens=10, temperature=0).choices[0].message.content


def test_chat_stop_and_sampling(api):
    """stop through chat, plain and streamed: the text ends before the stop string, finish_reason "stop" (oracle:
    the engine's greedy continuation); a seeded sampled answer is the engine's with the same seed."""
    c, tiny = api
    tok = load_tokenizer(tiny.tokenizer)
    msgs = [{"role": "user", "content": "我今天很开心"}]
    p = encode_prompt(tok, "我今天很开心")
    e = Engine.load(tiny.fp16, device="cpu")
    new = e.generate([p], SamplingParams(max_new_tokens=10, top_k=1, presence_penalty=2.0))[0][len(p):]
    k = next((i for i in range(1, len(new)) if new[i] not in new[:i] and new[i] != tiny.eos_id
              and tok.encode(tok.convert_ids_to_tokens(new[i]), add_special_tokens=False) == [new[i]]), None)
    assert k is not None, f"no usable stop token in {new}"
    stop = tok.convert_ids_to_tokens(new[k])
    args = dict(model="gpt2", messages=msgs, max_tokens=10, temperature=0, presence_penalty=2.0, stop=[stop, "1 2"])
    r = c.chat.completions.create(**args)
    assert r.choices[0].message.content == decode(tok, new[:k]) and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == k + 1  # the stop token was generated, not returned
    chunks = list(c.chat.completions.create(**args, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == decode(tok, new[:k])
    assert chunks[-1].choices[0].finish_reason == "stop"
    # top_k 0: the gateway samples from the whole distribution, as OpenAI does (issue 26), not the file's top_k 1
    sp = SamplingParams(max_new_tokens=8, top_k=0, temperature=0.9, top_p=0.9, seed=11, frequency_penalty=0.5)
    want = e.generate([p], sp)[0][len(p):]
    r = c.chat.completions.create(model="gpt2", messages=msgs, max_completion_tokens=8, temperature=0.9, top_p=0.9,
                                  seed=11, frequency_penalty=0.5)
    assert r.choices[0].message.content == decode(tok, want)


def post(url: str, data: bytes) -> tuple[int, dict]:
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_chat_bad_requests_are_clear_4xx(api):
    import json

    c, _ = api
    ok = [{"role": "user", "content": "我"}]
    with pytest.raises(openai.NotFoundError, match="not served"):
        c.chat.completions.create(model="gpt3", messages=ok)
    cases = [  # (what the request changes, what the 400 must name)
        (dict(messages=[]), "messages"),
        (dict(messages=None), "messages"),
        (dict(messages=["我"]), "messages\\[0\\]"),
        (dict(messages=[{"role": "robot", "content": "我"}]), "role 'robot'"),
        (dict(messages=[{"role": "tool", "content": "我", "tool_call_id": "x"}]), "role 'tool'"),
        (dict(messages=[{"role": "user"}]), "messages\\[0\\].content"),
        (dict(messages=[*ok, {"role": "user", "content": " "}]), "messages\\[1\\].content"),
        (dict(messages=[{"role": "user", "content": []}]), "content"),
        (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
         "only text parts"),
        (dict(n=2), "n > 1"),
        (dict(tools=[{"type": "function", "function": {"name": "f"}}]), "'tools' is not supported"),
        (dict(logprobs=True), "'logprobs' is not supported"),
        (dict(top_p=3.0), "top_p"),
        (dict(temperature=-1), "temperature"),
        (dict(max_tokens=0), "max_tokens=0"),
        (dict(max_tokens=None, max_completion_tokens=0), "max_completion_tokens=0"),
        (dict(max_tokens=4, max_completion_tokens=5), "differ"),
        (dict(stop=[str(i) for i in range(17)]), "at most"),
        (dict(stop=5), "stop must be"),
        (dict(stream_options={"include_usage": True}), "stream_options"),
        (dict(top_p=3.0, stream=True), "top_p"),  # streamed requests are checked before the stream starts
        (dict(messages=[{"role": "user", "content": "我" * 100}], stream=True), "prompt too long: 101 tokens"),
        (dict(messages=[{"role": "user", "content": "我" * 100}]), "prompt too long: 101 tokens"),
    ]
    for change, match in cases:
        with pytest.raises(openai.BadRequestError, match=match):
            c.chat.completions.create(**{"model": "gpt2", "messages": ok, "max_tokens": 2, **change})
    # bodies the openai package would not send: still an OpenAI-style 400, never a 500
    url = str(c.base_url).rstrip("/")
    for body in ({"model": "gpt2"}, [1, 2], "not json", {"model": "gpt2", "messages": ok, "stream": "yes"}):
        code, answer = post(f"{url}/chat/completions", (body if isinstance(body, str) else json.dumps(body)).encode())
        assert code == 400 and answer["error"]["type"] == "invalid_request_error", (body, answer)
    assert c.chat.completions.create(model="gpt2", messages=ok, max_tokens=2).choices[0].message.content is not None


# ---------------------------------------------------------------------------------------------
# Issue 26


def test_sampling_follows_openai_defaults(api):
    """temperature (default 1) samples from the whole distribution, not the file's greedy top_k 1: seeds 1, 2, 3 give
    different texts, the same seed the same text; temperature 0 (or vLLM's extra top_k 1) is the engine's greedy
    text; an unknown field is a 400 naming it (the openai package sends extra_body's fields as they are)."""
    c, tiny = api
    tok = load_tokenizer(tiny.tokenizer)
    p = encode_prompt(tok, "我今天很开心")
    greedy = decode(tok, Engine.load(tiny.fp16, device="cpu").generate([p], SamplingParams(max_new_tokens=12,
                                                                                         top_k=1))[0][len(p):])
    for create, text in ((lambda **kw: c.completions.create(prompt="我今天很开心", **kw), lambda r: r.choices[0].text),
                         (lambda **kw: c.chat.completions.create(messages=[{"role": "user", "content": "我今天很开心"}],
                                                                 **kw), lambda r: r.choices[0].message.content)):
        sampled = [text(create(model="gpt2", max_tokens=12, temperature=1.0, seed=s)) for s in (1, 2, 3)]
        assert len(set(sampled)) >= 2, sampled
        assert text(create(model="gpt2", max_tokens=12, temperature=1.0, seed=1)) == sampled[0]
        assert len({text(create(model="gpt2", max_tokens=12, seed=s)) for s in (1, 2, 3)}) >= 2  # default: 1
        assert text(create(model="gpt2", max_tokens=12, temperature=0, seed=1)) == greedy
        assert text(create(model="gpt2", max_tokens=12, seed=2, extra_body={"top_k": 1})) == greedy
        assert text(create(model="gpt2", max_tokens=12, seed=2, extra_body={"top_k": -1, "repetition_penalty": 1.0})) \
            == text(create(model="gpt2", max_tokens=12, seed=2))
        with pytest.raises(openai.BadRequestError, match="unknown parameter 'min_p'"):
            create(model="gpt2", max_tokens=2, extra_body={"min_p": 0.1})
        with pytest.raises(openai.BadRequestError, match="top_k"):
            create(model="gpt2", max_tokens=2, extra_body={"top_k": -2})


def test_special_tokens_are_never_generated(api):
    """Issue 26: the tiny model continues "x" ([CLS] [UNK]) with [UNK] forever when allowed (test_scheduler.py): the
    served models never generate [PAD], [UNK], [CLS] or [MASK], so the text is not empty, plain or streamed, and the
    token ids Triton returns hold none of them."""
    from lsgpt.client import Client

    c, tiny = api
    tok = load_tokenizer(tiny.tokenizer)
    specials = {tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.mask_token_id}
    for model in ("gpt2", "gpt2_int8"):
        for kw in ({"temperature": 0}, {"seed": 5}):
            assert c.completions.create(model=model, prompt="x", max_tokens=20, **kw).choices[0].text.strip()
            chunks = c.completions.create(model=model, prompt="x", max_tokens=20, stream=True, **kw)
            assert "".join(ch.choices[0].text for ch in chunks).strip()
        with Client(SERVED["grpc"], model, tiny.tokenizer) as g:
            p = g.encode("x")
            for sampling in ({"top_k": 1}, {"top_k": 0, "temperature": 2.0, "seed": 3}):
                new = g.generate_ids([p], max_new_tokens=30, **sampling)[0][len(p):]
                assert new and not specials & set(new), new
                assert not specials & {t for t, _ in g.stream_ids(p, max_new_tokens=30, **sampling) if t is not None}


def test_max_tokens_beyond_the_model_is_a_400_naming_the_limit(api):
    """As OpenAI answers a request over the context length: max_tokens (completions, chat) or max_completion_tokens
    beyond what the model allows after the prompt is a 400 naming the limit, not lowered silently; at the limit
    it is served."""
    c, tiny = api
    n = len(encode_prompt(load_tokenizer(tiny.tokenizer), "我今天很开心"))
    allowed = tiny.max_step - n
    msgs = [{"role": "user", "content": "我今天很开心"}]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError, match=f"max_tokens=100000 is more than .* at most {allowed} new"):
            c.completions.create(model="gpt2", prompt="我今天很开心", max_tokens=100000, stream=stream)
        with pytest.raises(openai.BadRequestError, match=f"max_completion_tokens={allowed + 1} .* at most {allowed} "):
            c.chat.completions.create(model="gpt2_int8", messages=msgs, max_completion_tokens=allowed + 1, stream=stream)
    r = c.completions.create(model="gpt2", prompt="我今天很开心", max_tokens=allowed, temperature=0,
                             extra_body={"repetition_penalty": 1.0})
    assert r.usage.completion_tokens <= allowed
    assert c.chat.completions.create(model="gpt2", messages=msgs, temperature=0).usage.completion_tokens <= allowed


def test_models_and_completions_answer_503_while_triton_is_down(tiny_models):
    """Issue 26: /v1/models listed the models while Triton was down; now it answers 503, as the completions do."""
    from lsgpt.serving.openai_api import create_app

    port = free_port()
    web = uvicorn.Server(uvicorn.Config(create_app(f"127.0.0.1:{free_port()}", str(tiny_models.tokenizer)),
                                        host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=web.run, daemon=True)
    t.start()
    try:
        while not web.started:
            time.sleep(0.05)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError, match="not reachable") as e:
            c.models.list()
        assert e.value.status_code == 503
        with pytest.raises(openai.InternalServerError) as e:
            c.completions.create(model="gpt2", prompt="x", max_tokens=2)
        assert e.value.status_code == 503
    finally:
        web.should_exit = True
        t.join(10)
