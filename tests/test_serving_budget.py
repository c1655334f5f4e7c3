"""The scheduler's config.pbtxt parameters through a real tritonserver (issue 29): max_running_rows "auto" as
shipped, and a prefill budget of 8 tokens on gpt2 and its twin, so that a 40-token prompt is prefilled in 5
chunks while other requests run. Oracle: the engine in process (Engine.generate on the same file), token for
token, unary and streamed; the server log names the numbers the model chose."""

from __future__ import annotations

import queue
import re
import threading

import numpy as np
import pytest

tritonclient_grpc = pytest.importorskip("tritonclient.grpc")
from conftest import make_repository  # noqa: E402

from lsgpt.engine.engine import Engine, SamplingParams  # noqa: E402
from lsgpt.serving.launcher import TritonServer, free_port  # noqa: E402


@pytest.fixture(scope="module")
def served(tiny_models, tmp_path_factory):
    repo = make_repository(tmp_path_factory.mktemp("repo"), tiny_models)
    for name in ("gpt2", "gpt2_stream"):
        cfg = repo / name / "config.pbtxt"
        text, n = re.subn(r'(key: "max_prefill_tokens", value: \{ string_value: ")[^"]+', r"\g<1>8", cfg.read_text())
        assert n == 1
        cfg.write_text(text)
    server = TritonServer(repo, models=["gpt2", "gpt2_stream", "gpt2_int8"], grpc_port=free_port(),
                          http_port=free_port(), metrics_port=free_port())
    with server:
        server.wait_ready(180)
        yield server


def _inputs(prompt: list[int], new: int) -> list:
    out = []
    for name, arr in (("token_ids", np.array([prompt], dtype=np.int32)), ("max_new_tokens", np.array([[new]], np.int32)),
                      ("top_k", np.array([[1]], np.int32))):
        t = tritonclient_grpc.InferInput(name, list(arr.shape), "INT32")
        t.set_data_from_numpy(arr)
        out.append(t)
    return out


def _streamed(url: str, prompt: list[int], new: int) -> list[int]:
    c = tritonclient_grpc.InferenceServerClient(url)
    q: queue.Queue = queue.Queue()
    c.start_stream(callback=lambda result, error: q.put((result, error)))
    c.async_stream_infer("gpt2_stream", _inputs(prompt, new), enable_empty_final_response=True)
    ids: list[int] = []
    try:
        while True:
            result, error = q.get(timeout=60)
            assert error is None, error
            ids += result.as_numpy("result").reshape(-1).tolist()
            if result.get_response().parameters["triton_final_response"].bool_param:
                return prompt + ids
    finally:
        c.stop_stream()
        c.close()


def test_the_log_names_the_chosen_rows_and_budget(served):
    log = served.log_path.read_text(errors="replace")
    assert re.search(r"gpt2 v1: .*up to 32 rows \(max_running_rows auto\).*prefill budget 8 tokens, admission every 8", log)
    assert re.search(r"gpt2_int8 v1: .*up to 32 rows \(max_running_rows auto\).*prefill budget 512 tokens", log)


def test_a_prompt_over_the_budget_is_served_in_chunks_as_in_process(served, tiny_models):
    """A 40-token prompt (5 chunks of 8) and three short ones (whole) at once, unary and one streamed: every
    answer equals the in-process engine's."""
    eng = Engine.load(tiny_models.fp16, device="cpu")
    rng = np.random.default_rng(3)
    prompts = [rng.integers(5, eng.config.vocab, n).tolist() for n in (40, 4, 6, 8)]
    want = [eng.generate([p], SamplingParams(top_k=1, max_new_tokens=12))[0] for p in prompts]
    got: dict = {}

    def unary(i: int) -> None:
        c = tritonclient_grpc.InferenceServerClient(served.grpc_url)
        row = c.infer("gpt2", _inputs(prompts[i], 12)).as_numpy("result")[0].tolist()
        c.close()
        got[i] = row[: len(want[i])]  # one row: EOS padding only beyond its own end
        assert all(t == tiny_models.eos_id for t in row[len(want[i]):])

    threads = [threading.Thread(target=unary, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    streamed = _streamed(served.grpc_url, prompts[0], 12)
    for t in threads:
        t.join(120)
    assert [got.get(i) for i in range(len(prompts))] == want
    assert streamed == want[0]
