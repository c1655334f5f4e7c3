"""The client library (client/) and client/generate.py against a real tritonserver with tiny models."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("tritonclient.grpc")

from conftest import make_repository  # noqa: E402

from lsgpt.client import Client, InvalidRequest, ModelNotReady, RequestTimeout, ServerUnavailable  # noqa: E402
from lsgpt.engine.engine import Engine, SamplingParams  # noqa: E402
from lsgpt.serving.launcher import TritonServer, free_port  # noqa: E402
from lsgpt.text import decode, encode_prompt, load_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    repo = make_repository(tmp_path_factory.mktemp("repo"), tiny_models)
    ports = dict(grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())
    with TritonServer(repo, models=["gpt2", "gpt2_stream"], **ports) as s:
        s.wait_ready(180)
        yield s


@pytest.fixture(scope="module")
def client(server, tiny_models):
    with Client(server.grpc_url, "gpt2", tiny_models.tokenizer, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def local(tiny_models):
    """The in-process reference: engine + tokenizer."""
    eng = Engine.load(tiny_models.fp16, device="cpu")
    tok = load_tokenizer(tiny_models.tokenizer)

    def gen(text: str, **p) -> str:
        return decode(tok, eng.generate([encode_prompt(tok, text)], SamplingParams(**p))[0])

    return gen


def test_client_imports_without_torch(server, tiny_models):
    code = (
        "import sys, json\n"
        "from lsgpt.client import Client\n"
        f"c = Client({server.grpc_url!r}, 'gpt2', {str(tiny_models.tokenizer)!r})\n"
        "text = c.generate('我今天', max_new_tokens=3, top_k=1)\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'text': text}))\n"
    )
    out = subprocess.run([PY, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["torch"] is False and res["text"].startswith("我今天")


def test_text_round_trip_equals_engine_for_same_seed(client, local):
    p = dict(max_new_tokens=20, top_k=0, top_p=0.9, temperature=0.8, seed=1234)
    assert client.generate("我今天很开心，hello", **p) == local("我今天很开心，hello", **p)
    assert client.generate("hello", max_new_tokens=5, top_k=1) == local("hello", max_new_tokens=5, top_k=1)


def test_many_prompts_batched(client, local):
    texts = ["我", "今天很开心", "the model", "我要找个男朋友，"]
    got = client.generate(texts, max_new_tokens=12, top_p=0.8, top_k=0, seed=9)
    assert got == [local(t, max_new_tokens=12, top_p=0.8, top_k=0, seed=9) for t in texts]


def test_stream_text_equals_generate(server, tiny_models, client):
    c = Client(server.grpc_url, "gpt2", tiny_models.tokenizer)
    p = dict(max_new_tokens=25, top_k=0, top_p=0.95, seed=3)
    pieces = list(c.stream("我今天很开心，hello", **p))
    head = decode(c.tok, c.encode("我今天很开心，hello"))
    assert head + "".join(pieces) == client.generate("我今天很开心，hello", **p)
    ids = [t for t, _ in c.stream_ids(c.encode("我今天"), max_new_tokens=6, top_k=1) if t is not None]
    assert c.encode("我今天") + ids == c.generate_ids([c.encode("我今天")], max_new_tokens=6, top_k=1)[0]


def test_asyncio(client):
    async def run():
        texts = await client.agenerate(["我今天", "hello"], max_new_tokens=6, top_k=1)
        pieces = [p async for p in client.astream("我今天", max_new_tokens=6, top_k=1)]
        await client.aclose()
        return texts, pieces

    texts, pieces = asyncio.run(run())
    assert texts == client.generate(["我今天", "hello"], max_new_tokens=6, top_k=1)
    assert decode(client.tok, client.encode("我今天")) + "".join(pieces) == texts[0]


def test_errors(server, client, tiny_models):
    with pytest.raises(InvalidRequest, match="max_step"):
        client.generate("我" * (tiny_models.max_step + 5))
    with pytest.raises(InvalidRequest, match="top_p"):
        client.generate("我", top_p=2.0)
    with pytest.raises(InvalidRequest, match="max_new_tokens"):
        client.generate("我", max_new_tokens="3")
    with pytest.raises(TypeError, match="unknown sampling parameter"):
        client.generate("我", topk=3)
    with pytest.raises(InvalidRequest, match="empty"):  # the server's check (the client sends [CLS] otherwise)
        client.generate_ids([[]])
    with pytest.raises(InvalidRequest, match="vocabulary"):
        list(client.stream_ids([2, 99999]))
    with pytest.raises(RequestTimeout):
        Client(server.grpc_url, "gpt2", tiny_models.tokenizer, timeout=0.001).generate("我", max_new_tokens=40)
    with pytest.raises(ModelNotReady, match="nope"):
        Client(server.grpc_url, "nope", tiny_models.tokenizer, retries=0).generate("我")
    t = time.monotonic()
    with pytest.raises(ServerUnavailable, match="running"):
        Client(f"127.0.0.1:{free_port()}", "gpt2", tiny_models.tokenizer, retries=2).generate("我")
    assert time.monotonic() - t < 300  # hang guard only: retried with backoff, then a clear error


def test_generate_cli_local_and_served(server, tiny_models):
    common = ["-p", str(tiny_models.tokenizer), "-i", "我今天很开心，", "--top-k", "1", "--max-new-tokens", "8"]
    local = subprocess.run([PY, "client/generate.py", "-m", str(tiny_models.fp16), *common],
                           cwd=ROOT, capture_output=True, text=True, timeout=180)
    served = subprocess.run([PY, "client/generate.py", "-m", "gpt2", "--url", server.grpc_url, *common],
                            cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert local.returncode == 0 and served.returncode == 0, local.stderr + served.stderr
    text = [ln for ln in local.stdout.splitlines() if ln.startswith("我今天")]
    assert text and text == [ln for ln in served.stdout.splitlines() if ln.startswith("我今天")]
    assert "time:" in local.stdout and "time:" in served.stdout and "=" * 40 in served.stdout
    bad = subprocess.run([PY, "client/generate.py", "--url", f"127.0.0.1:{free_port()}", *common],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "cannot reach Triton" in bad.stderr


def test_generate_cli_user_mistakes_get_one_line_errors(tmp_path):
    """A mistyped model file (also one ending in .h5) or tokenizer path: exit 2, one line, no traceback."""
    for args in (["-m", str(tmp_path / "model.h5")], ["-m", "model/fp16/pytorch_model.hdf"],
                 ["-m", "gpt2", "--url", "localhost:1", "-p", str(tmp_path / "tokenizr")]):
        proc = subprocess.run([PY, "client/generate.py", *args, "-i", "我"], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr and proc.stderr.startswith("error:"), proc.stderr


def test_penalties_through_the_client_and_the_cli(server, client, tiny_models):
    with pytest.raises(InvalidRequest, match="repetition_penalty"):
        client.generate("我", repetition_penalty=0.0)  # refused by the client, before the server
    with pytest.raises(InvalidRequest, match="frequency_penalty"):
        client.generate("我", frequency_penalty=2.5)
    plain = client.generate("我今天很开心，", top_k=1, max_new_tokens=10)
    penalized = client.generate("我今天很开心，", top_k=1, max_new_tokens=10, repetition_penalty=1.8,
                                presence_penalty=1.0)
    cli = subprocess.run([PY, "client/generate.py", "-m", str(tiny_models.fp16), "-p", str(tiny_models.tokenizer),
                          "-i", "我今天很开心，", "--top-k", "1", "--max-new-tokens", "10", "--repetition-penalty", "1.8",
                          "--presence-penalty", "1.0"], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert cli.returncode == 0, cli.stderr
    assert [ln for ln in cli.stdout.splitlines() if ln.startswith("我今天")] == [penalized]  # same tokens in process
    assert penalized != plain


def test_generate_cli_samples_when_asked_and_notes_a_lowered_limit(server, tiny_models):
    """Issue 26: --temperature / --seed without --top-k sample (top_k 0), in process and served: seeds 1, 2, 3 give
    different texts (the file's greedy top_k 1 gave one); --max-new-tokens beyond what the model allows is lowered to
    it with one note line on stderr (as export.py's -l), in process and served, plain and streamed."""
    def run(*args):
        r = subprocess.run([PY, "client/generate.py", "-p", str(tiny_models.tokenizer), "-i", "我今天很开心，", *args],
                           cwd=ROOT, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stderr
        return [ln for ln in r.stdout.splitlines() if ln.startswith("我今天")], r.stderr

    for where in (["-m", str(tiny_models.fp16)], ["-m", "gpt2", "--url", server.grpc_url]):
        texts = [run(*where, "--temperature", "1.0", "--seed", str(s), "--max-new-tokens", "12")[0] for s in (1, 2, 3)]
        assert len({tuple(t) for t in texts}) >= 2, texts
        n = len(encode_prompt(load_tokenizer(tiny_models.tokenizer), "我今天很开心，"))
        allowed = tiny_models.max_step - n
        for extra in ([], ["--stream"]) if "--url" in where else ([],):
            lowered, err = run(*where, *extra, "--top-k", "1", "--max-new-tokens", "100000")
            notes = [ln for ln in err.splitlines() if "note:" in ln]
            assert len(notes) == 1 and "--max-new-tokens 100000 is more than the model allows" in notes[0] \
                and notes[0].endswith(f"using {allowed}"), err
            if not extra:
                assert lowered == run(*where, "--top-k", "1", "--max-new-tokens", str(allowed))[0]
        assert "note:" not in run(*where, "--top-k", "1", "--max-new-tokens", str(allowed))[1]
