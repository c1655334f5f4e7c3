"""The OpenAI-compatible API (client/openai_server.py) in front of the real tritonserver, driven by the
official `openai` Python package. Oracle: the engine in process on the same prompt ([CLS] text, greedy)."""

from __future__ import annotations

import threading
import time

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
from conftest import make_repository  # noqa: E402

from lsgpt.engine import Engine, SamplingParams
from lsgpt.launcher import TritonServer, free_port
from lsgpt.text import decode, encode_prompt, load_tokenizer


@pytest.fixture(scope="module")
def api(tiny_models, tmp_path_factory):
    from client.openai_server import create_app

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
