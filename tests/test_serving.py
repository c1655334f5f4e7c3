"""A real tritonserver (the nvidia-pytriton wheel's binary, Python backend) serving tiny exported models,
driven with raw tritonclient: LightSeq tensors, dynamic batching of unequal prompts, every kind of bad
input, streaming, and a new version going live while the server runs."""

from __future__ import annotations

import queue
import re
import time
from pathlib import Path

import numpy as np
import pytest

tritonclient_grpc = pytest.importorskip("tritonclient.grpc")
from conftest import make_repository, make_tiny_gpt2, scrape_metrics  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from lsgpt.engine.engine import Engine, SamplingParams  # noqa: E402
from lsgpt.repository import publish, versions  # noqa: E402
from lsgpt.serving.launcher import LaunchError, TritonServer, free_port  # noqa: E402
from lsgpt.text import IncrementalDecoder, decode, encode_prompt, load_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MAX_BATCH = 8


@pytest.fixture(scope="module")
def served(tiny_models, tmp_path_factory):
    repo = make_repository(tmp_path_factory.mktemp("repo"), tiny_models)
    server = TritonServer(repo, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(), poll_secs=1)
    with server:
        server.wait_ready(180)
        yield server, repo


@pytest.fixture(scope="module")
def grpc(served):
    c = tritonclient_grpc.InferenceServerClient(served[0].grpc_url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def engines(tiny_models):
    return {"gpt2": Engine.load(tiny_models.fp16, device="cpu"), "gpt2_int8": Engine.load(tiny_models.int8, device="cpu")}


@pytest.fixture(scope="module")
def tok(tiny_models):
    return load_tokenizer(tiny_models.tokenizer)


def tensor(name: str, arr, dtype: str | None = None):
    arr = np.asarray(arr)
    dt = dtype or {np.dtype(np.int32): "INT32", np.dtype(np.int64): "INT64", np.dtype(np.float32): "FP32"}[arr.dtype]
    t = tritonclient_grpc.InferInput(name, list(arr.shape), dt)
    t.set_data_from_numpy(arr)
    return t


def request(prompts, **params):
    """Inputs of one request: rows of equal length plus per-row parameters ([b, 1])."""
    ids = np.asarray(prompts, dtype=np.int32)
    out = [tensor("token_ids", ids)]
    np_types = {"max_new_tokens": np.int32, "top_k": np.int32, "top_p": np.float32, "temperature": np.float32,
                "seed": np.int64, "repetition_penalty": np.float32, "presence_penalty": np.float32,
                "frequency_penalty": np.float32}
    for k, v in params.items():
        out.append(tensor(k, np.full((len(ids), 1), v, dtype=np_types[k])))
    return out


def unpad(row, prompt_len: int, eos: int) -> list[int]:
    row = [int(x) for x in row]
    for i in range(prompt_len, len(row)):
        if row[i] == eos:
            return row[: i + 1]
    return row


# ---------------------------------------------------------------------------------------------
# Repository layout.


def test_repository_layout_matches_lightseq_and_templates():
    repo = ROOT / "model_repository"
    for name, kind in (("gpt2_lightseq", "Gpt"), ("gpt2_lightseq_int8", "QuantGpt")):
        cfg = (repo / name / "config.pbtxt").read_text()
        assert f'name: "{name}"' in cfg and 'backend: "lightseq"' in cfg
        assert re.search(rf'key: "model_type"\s*value: \{{\s*string_value: "{kind}"', cfg)
        assert 'default_model_filename: "model.hdf5"' in cfg
        assert (repo / name / "1" / ".gitignore").is_file()  # the empty version folder LightSeq needs
    for name in ("gpt2", "gpt2_int8", "gpt2_stream", "gpt2_int8_stream"):
        assert not list((repo / name).rglob("*.py"))  # code lives in the backend (lsgpt/serving/backend/model.py)
        cfg = (repo / name / "config.pbtxt").read_text()
        assert 'backend: "lsgpt"' in cfg and "latest: { num_versions: 1 }" in cfg and "KIND_AUTO" in cfg
        # inputs, outputs and their types: tests/test_contract.py (parsed with Triton's schema)
        assert re.search(r'key: "max_running_rows", value: \{ string_value: "(\d+|auto)" \}', cfg)
        assert ("decoupled: true" in cfg) == name.endswith("_stream")


def test_publish_rejects_wrong_format_and_keeps_versions(tiny_models, tmp_path):
    with pytest.raises(ValueError, match="int8"):
        publish(tiny_models.fp16, tmp_path, "gpt2_int8")
    with pytest.raises(ValueError, match="unknown model"):
        publish(tiny_models.fp16, tmp_path, "nope")
    for _ in range(4):
        res = publish(tiny_models.fp16, tmp_path, "gpt2", keep=2)
    assert res.versions["gpt2"].name == "4" and res.versions["gpt2_stream"].name == "4"
    assert versions(tmp_path / "gpt2") == [3, 4]  # older versions pruned
    assert not [p for p in (tmp_path / "gpt2").iterdir() if p.name.startswith(".")]  # no staging left
    assert (tmp_path / "gpt2_lightseq" / "model.hdf5").read_bytes() == tiny_models.fp16.read_bytes()
    assert [p.name for p in (tmp_path / "gpt2_lightseq").iterdir()] == ["model.hdf5"]


def test_launcher_serves_only_portable_models(served):
    import tempfile

    server, _ = served
    assert server.models == ["gpt2", "gpt2_int8", "gpt2_int8_stream", "gpt2_stream"]  # no LightSeq backend here
    before = set(Path(tempfile.gettempdir()).glob("lsgpt-triton-*"))
    with pytest.raises(LaunchError, match="lightseq"):
        TritonServer(served[1], models=["gpt2_lightseq"], grpc_port=free_port()).start()
    assert set(Path(tempfile.gettempdir()).glob("lsgpt-triton-*")) == before, "a failed start left its folder"


def test_launcher_errors_are_clear(tmp_path, monkeypatch):
    from lsgpt.serving.launcher import find_tritonserver, servable

    monkeypatch.setenv("TRITONSERVER", str(tmp_path / "nope"))
    with pytest.raises(LaunchError, match="not an executable"):
        find_tritonserver()
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "config.pbtxt").write_text('backend: "lsgpt"\n')
    ok, why = servable(tmp_path / "m", tmp_path)
    assert not ok and "backend 'lsgpt'" in why
    (tmp_path / "lsgpt").mkdir()
    ok, why = servable(tmp_path / "m", tmp_path)
    assert not ok and "export" in why
    with pytest.raises(LaunchError, match="not found"):
        TritonServer(tmp_path / "missing").start()


# ---------------------------------------------------------------------------------------------
# Generation through the server = the engine in process.


@pytest.mark.parametrize("model", ["gpt2", "gpt2_int8"])
def test_greedy_matches_engine(grpc, engines, tok, model):
    prompt = encode_prompt(tok, "我今天很开心，")
    r = grpc.infer(model, request([prompt], top_k=1, max_new_tokens=12))
    out = r.as_numpy("result")
    assert out.dtype == np.int32 and out.shape[0] == 1
    want = engines[model].generate([prompt], SamplingParams(top_k=1, max_new_tokens=12))[0]
    assert unpad(out[0], len(prompt), 3) == want


def test_http_like_lightseqs_example_client(served, grpc, tok):
    """LightSeq's example client speaks HTTP: same tensors, same answer as gRPC."""
    import tritonclient.http as httpclient

    prompt = encode_prompt(tok, "hello world")
    c = httpclient.InferenceServerClient(served[0].http_url)
    ids = httpclient.InferInput("token_ids", [1, len(prompt)], "INT32")
    ids.set_data_from_numpy(np.asarray([prompt], dtype=np.int32))
    n = httpclient.InferInput("max_new_tokens", [1, 1], "INT32")
    n.set_data_from_numpy(np.array([[6]], dtype=np.int32))
    got = c.infer("gpt2_int8", [ids, n]).as_numpy("result")
    assert (got == grpc.infer("gpt2_int8", request([prompt], max_new_tokens=6)).as_numpy("result")).all()
    c.close()


def test_file_defaults_without_parameters(grpc, engines, tok, tiny_models):
    prompt = encode_prompt(tok, "hello")  # the file says topk=1: greedy up to max_step
    out = grpc.infer("gpt2", request([prompt])).as_numpy("result")
    assert unpad(out[0], len(prompt), 3) == engines["gpt2"].generate([prompt], SamplingParams())[0]
    assert out.shape[1] <= tiny_models.max_step


@pytest.mark.parametrize("model", ["gpt2", "gpt2_int8"])
def test_penalties_served_equal_in_process(grpc, engines, tok, model):
    """repetition / presence / frequency penalties are optional inputs of every served model: the same request
    in process gives the same tokens; out-of-range values are INVALID_ARGUMENT."""
    prompt = encode_prompt(tok, "我今天很开心")
    params = dict(top_k=1, max_new_tokens=12, repetition_penalty=1.6, presence_penalty=0.5, frequency_penalty=0.3)
    got = unpad(grpc.infer(model, request([prompt], **params)).as_numpy("result")[0], len(prompt), 3)
    want = engines[model].generate([prompt], SamplingParams(**params))[0]
    plain = engines[model].generate([prompt], SamplingParams(top_k=1, max_new_tokens=12))[0]
    assert got == want
    assert want != plain, "test premise: the penalties change this greedy continuation"
    with pytest.raises(InferenceServerException, match="presence_penalty"):
        grpc.infer(model, request([prompt], presence_penalty=3.0))


def test_penalties_streamed_equal_in_process(served, engines, tok):
    prompt = encode_prompt(tok, "我今天很开心")
    params = dict(top_k=1, max_new_tokens=12, repetition_penalty=1.6, presence_penalty=0.5, frequency_penalty=0.3)
    ids, _ = stream(served[0].grpc_url, request([prompt], **params))
    assert prompt + ids == engines["gpt2"].generate([prompt], SamplingParams(**params))[0]


def test_rows_padded_with_eos(grpc, engines, tok):
    prompts = [encode_prompt(tok, "我要找"), encode_prompt(tok, "个男朋")]
    ids = np.asarray(prompts, dtype=np.int32)
    inputs = [tensor("token_ids", ids), tensor("max_new_tokens", np.array([[2], [7]], dtype=np.int32)),
              tensor("top_k", np.array([[1], [1]], dtype=np.int32))]
    out = grpc.infer("gpt2", inputs).as_numpy("result")
    assert out.shape == (2, len(prompts[0]) + 7)
    assert (out[0, len(prompts[0]) + 2 :] == 3).all()  # the shorter row is padded with EOS, like LightSeq
    for row, p, n in zip(out, prompts, (2, 7)):
        assert unpad(row, len(p), 3)[: len(p) + n] == engines["gpt2"].generate([p], SamplingParams(top_k=1, max_new_tokens=n))[0]


def test_dynamic_batch_of_unequal_prompts_with_a_bad_request(grpc, engines, tok):
    texts = ["我", "今天很开心", "hello world", "我要找个男朋友，这是", "the models"]
    prompts = [encode_prompt(tok, t) for t in texts]
    before = grpc.get_inference_statistics("gpt2").model_stats[0]
    results: queue.Queue = queue.Queue()
    for i, p in enumerate(prompts):
        seed = 100 + i  # seeded sampling: each row's draw must not depend on its batch-mates
        grpc.async_infer("gpt2", request([p], top_k=0, top_p=0.9, seed=seed, max_new_tokens=10),
                         lambda result, error, i=i: results.put((i, result, error)))
    grpc.async_infer("gpt2", request([[2, 10_000]]), lambda result, error: results.put(("bad", result, error)))
    plain = encode_prompt(tok, "这是")  # no optional inputs at all: the file's defaults (greedy to max_step)
    grpc.async_infer("gpt2", request([plain]), lambda result, error: results.put(("plain", result, error)))
    got = {k: (r, e) for k, r, e in (results.get(timeout=60) for _ in range(len(prompts) + 2))}
    r, e = got.pop("plain")
    assert e is None and unpad(r.as_numpy("result")[0], len(plain), 3) == engines["gpt2"].generate([plain])[0]
    r, e = got.pop("bad")
    assert r is None and "StatusCode.INVALID_ARGUMENT" in str(e.status()) and "10000" in e.message()
    for i, p in enumerate(prompts):
        r, e = got[i]
        assert e is None, e
        want = engines["gpt2"].generate([p], SamplingParams(top_k=0, top_p=0.9, seed=100 + i, max_new_tokens=10))[0]
        assert unpad(r.as_numpy("result")[0], len(p), 3) == want
    after = grpc.get_inference_statistics("gpt2").model_stats[0]
    n_req = after.inference_count - before.inference_count
    n_exec = after.execution_count - before.execution_count
    # Every request was counted. Whether they shared executions depends on arrival times inside the 5 ms
    # queue delay (a loaded machine can spread them out), so batching itself is not asserted here: that each
    # row's output equals its own in-process output above is what sharing a batch must not change.
    assert n_req == len(prompts) + 2, (n_req, n_exec)
    assert 1 <= n_exec <= n_req


# ---------------------------------------------------------------------------------------------
# Bad input: INVALID_ARGUMENT naming the problem; the server keeps serving.

GOOD = [2, 5, 6]


def _bad_cases(max_step: int):
    i32 = np.int32
    return {
        "empty prompt": ([tensor("token_ids", np.zeros((1, 0), i32))], "empty"),
        "prompt at max_step": ([tensor("token_ids", np.full((1, max_step), 5, i32))], "max_step"),
        "prompt over max_step": ([tensor("token_ids", np.full((1, max_step + 3), 5, i32))], "max_step"),
        "id over vocab": ([tensor("token_ids", np.array([[2, 5, 99999]], i32))], "vocabulary"),
        "negative id": ([tensor("token_ids", np.array([[2, -4]], i32))], "vocabulary"),
        "wrong dtype": ([tensor("token_ids", np.array([GOOD], np.int64))], "INT64"),
        "wrong rank": ([tensor("token_ids", np.array([[GOOD]], i32))], "shape"),
        "no batch dim": ([tensor("token_ids", np.array(GOOD, i32))], "shape"),
        "batch over max": ([tensor("token_ids", np.array([GOOD] * (MAX_BATCH + 1), i32))], "batch"),
        "param batch mismatch": (request([GOOD, GOOD])[:1] + [tensor("top_k", np.array([[1]], i32))], "batch size"),
        "top_k negative": (request([GOOD], top_k=-1), "top_k"),
        "top_p zero": (request([GOOD], top_p=0.0), "top_p"),
        "top_p over 1": (request([GOOD], top_p=1.5), "top_p"),
        "top_p nan": (request([GOOD], top_p=float("nan")), "top_p"),
        "temperature negative": (request([GOOD], temperature=-1.0), "temperature"),
        "temperature inf": (request([GOOD], temperature=float("inf")), "temperature"),
        "max_new_tokens zero": (request([GOOD], max_new_tokens=0), "max_new_tokens"),
        "seed negative": (request([GOOD], seed=-5), "seed"),
        "unknown input": (request([GOOD]) + [tensor("foo", np.array([[1]], i32))], "foo"),
        "stream flags differ": (request([GOOD, GOOD]) + [tensor("stream", np.array([[True], [False]]), "BOOL")],
                                "stream"),
        "text and ids": (request([GOOD]) + [tensor("text_input", np.array([[b"x"]], dtype=np.object_), "BYTES")],
                         "not both"),
        "stop id over vocab": (request([GOOD]) + [tensor("stop_words", np.array([[5, -1, 99999]], i32))],
                               "vocabulary"),
        "stop rows mismatch": (request([GOOD, GOOD]) + [tensor("stop_words", np.array([[5]], i32))], "batch size"),
    }


@pytest.mark.parametrize("case", list(_bad_cases(64)))
def test_bad_input_is_invalid_argument(grpc, tiny_models, case):
    inputs, word = _bad_cases(tiny_models.max_step)[case]
    with pytest.raises(InferenceServerException) as ei:
        grpc.infer("gpt2", inputs)
    assert str(ei.value.status()).endswith("INVALID_ARGUMENT"), ei.value
    assert word.lower() in ei.value.message().lower(), ei.value.message()


def test_server_still_serves_after_bad_input(grpc, served):
    assert grpc.is_server_live() and served[0].proc.poll() is None
    # Polling saw no change since start-up (a stub writing bytecode into a version folder used to trigger one).
    assert served[0].log_tail(100_000).count('"loading: gpt2:1"') == 1
    out = grpc.infer("gpt2", request([GOOD], max_new_tokens=2)).as_numpy("result")
    assert out.shape[1] >= 3


# ---------------------------------------------------------------------------------------------
# Streaming.


def stream(url: str, inputs, model: str = "gpt2_stream", on_response=None) -> tuple[list[int], list[str]]:
    c = tritonclient_grpc.InferenceServerClient(url)
    q: queue.Queue = queue.Queue()
    c.start_stream(callback=lambda result, error: q.put((result, error)))
    c.async_stream_infer(model, inputs, enable_empty_final_response=True)
    ids, texts = [], []
    try:
        while True:
            result, error = q.get(timeout=60)
            if error is not None:
                raise error
            ids += result.as_numpy("result").reshape(-1).tolist()
            texts.append(result.as_numpy("text").reshape(-1)[0].decode())
            if on_response is not None:
                on_response(ids)
            if result.get_response().parameters["triton_final_response"].bool_param:
                return ids, texts
    finally:
        c.stop_stream()
        c.close()


def flag(name: str, value: bool):
    return tensor(name, np.array([[value]]), "BOOL")


def test_stream_tokens_and_text_match_non_streamed(served, grpc, engines, tok):
    prompt = encode_prompt(tok, "我今天很开心，hello")
    params = dict(top_k=0, top_p=0.95, seed=7, max_new_tokens=24)
    ids, texts = stream(served[0].grpc_url, request([prompt], **params))
    full = grpc.infer("gpt2", request([prompt], **params)).as_numpy("result")[0]
    assert prompt + ids == unpad(full, len(prompt), 3) == engines["gpt2"].generate([prompt], SamplingParams(**params))[0]
    assert len(texts) == len(ids) + 1  # one response per token, then the final one
    assert decode(tok, prompt) + "".join(texts) == decode(tok, prompt + ids)  # no broken or lost characters/spaces
    dec = IncrementalDecoder(tok, prompt)
    assert "".join(texts) == "".join(dec.push(t) for t in ids) + dec.flush()


def test_stream_bad_input(served):
    with pytest.raises(InferenceServerException, match="empty"):
        stream(served[0].grpc_url, [tensor("token_ids", np.zeros((1, 0), np.int32))])
    with pytest.raises(InferenceServerException, match="batch"):
        stream(served[0].grpc_url, request([GOOD, GOOD]))


def test_int8_streams_from_its_own_twin(served, grpc, engines, tok):
    """gpt2_int8_stream streams the int8 model (not the fp16 one): its tokens are gpt2_int8's and the int8
    engine's; stream=false sends the whole result (+ text) in one response; stream=true on a model that
    answers once is refused with the twin's name; the client picks the twin."""
    from lsgpt.client.api import Client

    params = dict(top_k=0, seed=3, max_new_tokens=20)
    prompt = encode_prompt(tok, "我要找个男朋友")
    # the tiny model's fp16 and int8 files sample the same tokens; the model's start-up line names its file
    assert "gpt2_int8_stream v1: int8 engine" in served[0].log_tail(100_000)
    ids, texts = stream(served[0].grpc_url, request([prompt], **params), model="gpt2_int8_stream")
    want = engines["gpt2_int8"].generate([prompt], SamplingParams(**params))[0]
    assert prompt + ids == want == unpad(grpc.infer("gpt2_int8", request([prompt], **params)).as_numpy("result")[0],
                                         len(prompt), 3)
    n = []
    whole, text = stream(served[0].grpc_url, request([prompt], **params) + [flag("stream", False)],
                         model="gpt2_int8_stream", on_response=lambda got: n.append(1))
    assert len(n) == 1 and whole == want and text == [decode(tok, want[len(prompt):])]
    with pytest.raises(InferenceServerException, match="gpt2_int8_stream") as ei:
        grpc.infer("gpt2_int8", request([prompt], **params) + [flag("stream", True)])
    assert str(ei.value.status()).endswith("INVALID_ARGUMENT")
    c = Client(served[0].grpc_url, "gpt2_int8", tok)
    assert c.stream_model == "gpt2_int8_stream"
    assert "".join(c.stream(decode(tok, prompt), **params)) == "".join(texts)
    c.close()
    from lsgpt.client.api import ModelNotReady

    with pytest.raises(ModelNotReady, match="twin of 'gpt2_nope'"):
        list(Client(served[0].grpc_url, "gpt2_nope", tok).stream("我"))


def post(server, path: str, body: dict) -> tuple[int, str]:
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"http://{server.http_url}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_text_in_text_out_through_triton_generate_endpoints(served, engines, tok):
    """Triton's generate extension over HTTP: POST /v2/models/gpt2/generate {"text_input": ...} answers
    text_output = the engine's continuation of [CLS] text; /generate_stream on the int8 twin sends SSE events
    whose text_output pieces join to the int8 engine's continuation; bad input is a clear 400."""
    import json

    server = served[0]
    params = dict(max_new_tokens=12, top_k=1)
    prompt = encode_prompt(tok, "我今天很开心")
    code, body = post(server, "/v2/models/gpt2/generate", {"text_input": "我今天很开心", **params})
    assert code == 200, body
    want = engines["gpt2"].generate([prompt], SamplingParams(**params))[0]
    assert json.loads(body)["text_output"] == decode(tok, want[len(prompt):])
    code, body = post(server, "/v2/models/gpt2_int8_stream/generate_stream", {"text_input": "我今天很开心", **params})
    assert code == 200, body
    events = [json.loads(line[len("data: "):]) for line in body.splitlines() if line.startswith("data: ")]
    want8 = engines["gpt2_int8"].generate([prompt], SamplingParams(**params))[0]
    assert "".join(e["text_output"] for e in events) == decode(tok, want8[len(prompt):])
    assert len(events) == len(want8) - len(prompt) + 1  # a piece per token, then the final one
    code, body = post(server, "/v2/models/gpt2/generate", {"text_input": "我", "top_p": 7.0})
    assert code == 400 and "top_p" in body
    code, body = post(server, "/v2/models/gpt2/generate", {"max_new_tokens": 3})
    assert code == 400 and "text_input" in body


def test_token_metrics_on_the_metrics_port(served, grpc, tok):
    """Prometheus metrics from the model: the token counters move by exactly what a request consumed and
    produced (counted from its answer), the TTFT histogram by one observation, the ITL one by tokens - 1."""
    server = served[0]
    lab = '{model="gpt2",version="1"}'
    names = [f"lsgpt_prompt_tokens_total{lab}", f"lsgpt_generated_tokens_total{lab}", f"lsgpt_requests_total{lab}",
             f"lsgpt_time_to_first_token_seconds_count{lab}", f"lsgpt_inter_token_latency_seconds_count{lab}"]
    time.sleep(1.2)  # let earlier tests' numbers be published
    before = scrape_metrics(server)
    assert all(n in before for n in names), sorted(k for k in before if k.startswith("lsgpt"))
    assert f"lsgpt_running_rows{lab}" in before and f"lsgpt_queued_requests{lab}" in before
    prompt = encode_prompt(tok, "我今天很开心")
    out = unpad(grpc.infer("gpt2", request([prompt], max_new_tokens=12, top_k=1)).as_numpy("result")[0], len(prompt), 3)
    new = len(out) - len(prompt)
    want = [len(prompt), new, 1, 1, new - 1]
    deadline = time.time() + 10
    while True:
        after = scrape_metrics(server)
        got = [after[n] - before[n] for n in names]
        if got == want or time.time() > deadline:
            break
        time.sleep(0.2)
    assert got == want
    assert after[f"lsgpt_running_rows{lab}"] == 0


def _long_then_short(url: str, prompt: list[int], long_params: dict) -> tuple[list[int], list[int]]:
    """A 60-token streamed request, and a 3-token one sent right behind it on the same gRPC stream: (the long
    one's tokens in stream order, how many of them had come when the short one's final response came)."""
    c = tritonclient_grpc.InferenceServerClient(url)
    answers: queue.Queue = queue.Queue()
    c.start_stream(callback=lambda result, error: answers.put((result, error)))
    seen: list[int] = []
    short_done_at, finals = [], set()
    try:
        c.async_stream_infer("gpt2_stream", request([prompt], **long_params), request_id="long",
                             enable_empty_final_response=True)
        c.async_stream_infer("gpt2_stream", request([[2, 7]], top_k=1, max_new_tokens=3) + [flag("stream", False)],
                             request_id="short", enable_empty_final_response=True)
        while finals != {"long", "short"}:
            result, error = answers.get(timeout=60)
            assert error is None, error
            rid = result.get_response().id
            if rid == "long":
                seen += result.as_numpy("result").reshape(-1).tolist()
            if result.get_response().parameters["triton_final_response"].bool_param:
                finals.add(rid)
                if rid == "short":
                    short_done_at.append(len(seen))
    finally:
        c.stop_stream()
        c.close()
    return seen, short_done_at


def test_short_request_overtakes_a_running_long_one(served, engines, tok):
    """In-flight batching through the real server: a 3-token request sent right behind a 60-token one to the
    same model is answered long before the long one ends, counted in the long one's tokens that came before
    the short one's answer on the same gRPC stream (the order the model sent them: neither seconds nor the
    client's threads matter); batched to completion, it would come after all 60, in every try.

    Up to three tries: the tiny model's 60 tokens take ~30 ms on the CPU, and on 2 cores busy with a parallel test
    run the short request once reached the model only after the long one had ended (53 of 60 another time)."""
    e = engines["gpt2"]
    long_params = dict(top_k=1, max_new_tokens=60)
    # a prompt whose greedy continuation runs the full 60 tokens (no EOS): the engine in process decides
    prompt = next(p for p in ([2, a, b] for a in range(5, 40) for b in range(5, 40))
                  if len(e.generate([p], SamplingParams(**long_params))[0]) == 63)
    tries = []
    for _ in range(3):
        seen, short_done_at = _long_then_short(served[0].grpc_url, prompt, long_params)
        assert len(seen) == 60 and len(short_done_at) == 1, (seen, short_done_at)
        tries.append(short_done_at[0])
        if short_done_at[0] < 60:
            break
    print(f"the short request was answered when the long one had {tries} of 60 tokens (one number a try)")
    assert tries[-1] < 60, tries


# ---------------------------------------------------------------------------------------------
# A new export goes live without restarting the server (runs last: it changes the served model).


def test_new_version_goes_live(served, grpc, tok, tmp_path):
    from lsgpt.export.convert import export_model

    server, repo = served
    new = export_model(make_tiny_gpt2(seed=1), tmp_path / "new.hdf5", max_step=64, eos_id=3)
    prompt = encode_prompt(tok, "我今天")
    want = Engine.load(new, device="cpu").generate([prompt], SamplingParams(top_k=1, max_new_tokens=8))[0]
    old = unpad(grpc.infer("gpt2", request([prompt], top_k=1, max_new_tokens=8)).as_numpy("result")[0], len(prompt), 3)
    assert old != want  # a different model
    res = publish(new, repo, "gpt2")
    assert res.versions["gpt2"].name == "2"
    deadline = time.monotonic() + 90
    asked = served_ok = 0
    while not server.is_model_ready("gpt2", "2"):
        assert time.monotonic() < deadline, server.log_tail()  # hang guard
        asked += 1  # v1 keeps serving while v2 loads: every request in this window gets one row back
        served_ok += grpc.infer("gpt2", request([prompt], max_new_tokens=1)).as_numpy("result").shape[0]
        time.sleep(0.5)
    assert served_ok == asked
    got = unpad(grpc.infer("gpt2", request([prompt], top_k=1, max_new_tokens=8)).as_numpy("result")[0], len(prompt), 3)
    assert got == want
    deadline = time.monotonic() + 30
    while server.is_model_ready("gpt2", "1"):  # latest 1: the old version is retired
        assert time.monotonic() < deadline
        time.sleep(0.5)


def test_stop_words_end_the_continuation_through_the_server(grpc, served, tok, tiny_models):
    """stop_words (ids, -1 between sequences) through Triton: the served greedy continuation without stops, cut
    right after the first stop sequence generated (the rule tests/test_scheduler.py checks against HF); the
    client's stop strings are encoded the same way. The continuation comes from the server itself: other tests
    of this module publish new versions of gpt2."""
    from lsgpt.client.api import Client

    eos = tiny_models.eos_id
    # presence_penalty: no token twice, whatever version of gpt2 is loaded (a small model repeats one token)
    params = dict(max_new_tokens=12, top_k=1, presence_penalty=2.0)
    plain = unpad(grpc.infer("gpt2", request([GOOD], **params)).as_numpy("result")[0], len(GOOD), eos)
    new = plain[len(GOOD):]
    # a token's first appearance, before any EOS, whose text encodes back to it (a stop *string* for the client)
    k = next((i for i in range(1, len(new)) if new[i] not in new[:i] and new[i] != eos
              and tok.encode(tok.convert_ids_to_tokens(new[i]), add_special_tokens=False) == [new[i]]), None)
    assert k is not None, f"no usable stop token in {new}"
    want = plain[: len(GOOD) + k + 1]
    stops = np.array([[new[k], -1, 1, 2, 3]], np.int32)  # the second sequence never occurs
    inputs = request([GOOD], **params) + [tensor("stop_words", stops)]
    assert unpad(grpc.infer("gpt2", inputs).as_numpy("result")[0], len(GOOD), eos) == want
    with Client(served[0].grpc_url, "gpt2", tiny_models.tokenizer) as c:
        assert c.generate_ids([GOOD], stop=[[new[k]]], **params) == [want]
        assert c.generate_ids([GOOD], stop=tok.convert_ids_to_tokens(new[k]), **params) == [want]
