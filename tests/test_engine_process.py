"""The engine in a process of its own (lsgpt/serving/engine_process.py), on the CPU, through the real child process.

Oracles: HF transformers' greedy generate for every request of a crowd (tokens streamed in order, ends as
submitted); the scheduler's refusals (RequestError at once, in the stub); cancellation and shutdown answers; a
killed engine process fails every live request and calls on_lost.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from oracles import tiny

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def model():
    return tiny.make_model(seed=0, wide=True)


@pytest.fixture(scope="module")
def hdf5(model, tmp_path_factory):
    from lsgpt.export.convert import export_model

    return export_model(model, tmp_path_factory.mktemp("eproc") / "m.hdf5", max_step=128, eos_id=tiny.EOS_ID)


@pytest.fixture()
def proc(hdf5, monkeypatch):
    from lsgpt.serving.engine_process import EngineProcess

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the child's torch: one thread on the 2-core test machines
    lost: list[str] = []
    p = EngineProcess(hdf5, "cpu", None, max_rows=4, max_queue=8, prefill_tokens=None, admit_every=None,
                      on_lost=lost.append, start_timeout=120)
    p.lost = lost
    yield p
    p.close()


class Box:
    def __init__(self):
        self.tokens: list[int] = []
        self.result = None
        self.ev = threading.Event()

    def done(self, ids, err):
        self.result = (ids, err)
        self.ev.set()

    def wait(self, timeout=60):
        assert self.ev.wait(timeout), "no answer from the engine process"
        return self.result


def test_a_crowd_gets_hf_greedy_and_streams_its_tokens_in_order(proc, model):
    from lsgpt.engine.sampling import SamplingParams

    prompts = [[5, 17, 300], [42, 7, 7, 900], [9], [700, 701], [33, 34], [101, 102, 103]]
    lengths = [12, 5, 20, 3, 1, 9]
    boxes = [Box() for _ in prompts]
    for p, n, b in zip(prompts, lengths, boxes):  # more requests than rows: some queue in the engine process
        proc.submit(p, SamplingParams(max_new_tokens=n, top_k=1, ignore_eos=True), b.done, on_token=b.tokens.append)
    for p, n, b in zip(prompts, lengths, boxes):
        ids, err = b.wait()
        assert err is None
        assert ids == tiny.hf_greedy(model, p, n)
        assert b.tokens == ids[len(p):]  # streamed: each new token once, in order, before the end
    deadline = time.monotonic() + 5
    while proc.stats.generated_tokens < sum(lengths) and time.monotonic() < deadline:
        time.sleep(0.05)  # counters come every STATS_S
    assert proc.stats.generated_tokens == sum(lengths) and proc.stats.requests == len(prompts)


def test_an_engine_process_that_cannot_start_runs_the_engine_here_by_default_and_fails_the_load_when_asked(
        hdf5, model, monkeypatch):
    """start_engine (the served model's choice): "auto" (the GPU default) falls back to the engine in the model
    process with a warning naming why, and that engine answers as HF does; "asked" (engine_process "true") fails."""
    from lsgpt.engine.engine import Engine
    from lsgpt.engine.sampling import SamplingParams
    from lsgpt.serving.engine_process import EngineProcess
    from lsgpt.serving.triton_model import start_engine

    monkeypatch.setenv("LSGPT_PYTHON", "/bin/false")  # exits at once, as a python3 without our packages would
    warned: list[str] = []
    args = dict(hdf5=hdf5, device="cpu", tokenizer=None, vocab=None, max_rows=4, on_lost=None, warn=warned.append,
                sched_args=dict(max_queue=8, prefill_tokens=None, admit_every=None))
    engine, sched = start_engine("auto", **args)
    try:
        assert isinstance(engine, Engine) and not isinstance(sched, EngineProcess)
        assert len(warned) == 1 and "engine process did not start" in warned[0] and "/bin/false" in warned[0]
        ids = sched.generate([5, 17, 300], SamplingParams(max_new_tokens=6, top_k=1, ignore_eos=True), timeout=60)
        assert ids == tiny.hf_greedy(model, [5, 17, 300], 6)
    finally:
        sched.close()
    with pytest.raises(RuntimeError, match="engine process"):
        start_engine("asked", **args)
    assert start_engine(None, **args)[1].close() is None and len(warned) == 1  # None: here, nothing tried


def test_refusals_cancellation_and_close(proc):
    from lsgpt.engine.sampling import RequestError, SamplingParams
    from lsgpt.engine.scheduler import Cancelled, ShuttingDown

    with pytest.raises(RequestError, match="vocabulary"):  # checked in the stub, nothing sent
        proc.submit([5, 10**6], SamplingParams(max_new_tokens=3), Box().done)
    with pytest.raises(RequestError, match="empty"):
        proc.validate([], SamplingParams())
    flag = threading.Event()
    long = Box()
    proc.submit([5, 6], SamplingParams(max_new_tokens=100, top_k=1, ignore_eos=True), long.done,
                on_token=long.tokens.append, cancelled=flag.is_set)
    while len(long.tokens) < 3:
        time.sleep(0.01)
    flag.set()
    ids, err = long.wait()
    assert ids is None and isinstance(err, Cancelled) and len(long.tokens) < 100
    left = Box()
    proc.submit([8, 9], SamplingParams(max_new_tokens=100, top_k=1, ignore_eos=True), left.done,
                on_token=left.tokens.append)
    while not left.tokens:
        time.sleep(0.01)
    proc.close()
    ids, err = left.wait(10)
    assert ids is None and isinstance(err, ShuttingDown)
    with pytest.raises(ShuttingDown):
        proc.submit([8], SamplingParams(max_new_tokens=2), Box().done)
    assert proc.proc.poll() == 0 and not proc.lost


def test_a_killed_engine_process_fails_its_requests_and_says_so(proc):
    from lsgpt.engine.sampling import SamplingParams
    from lsgpt.engine.scheduler import ShuttingDown

    b = Box()
    proc.submit([5, 6], SamplingParams(max_new_tokens=100, top_k=1, ignore_eos=True), b.done,
                on_token=b.tokens.append)
    while not b.tokens:
        time.sleep(0.01)
    os.kill(proc.proc.pid, signal.SIGKILL)
    ids, err = b.wait(10)
    assert ids is None and isinstance(err, ShuttingDown) and "ended unexpectedly" in str(err)
    deadline = time.monotonic() + 5
    while not proc.lost and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.lost and "ended unexpectedly" in proc.lost[0]


def _engine_processes() -> list[int]:
    pids = []
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                if b"lsgpt.serving.engine_process" in f.read():
                    pids.append(int(d))
        except (OSError, ValueError):
            continue
    return pids


def test_served_through_tritonserver_with_engine_processes(tiny_models, tmp_path, monkeypatch):
    """LSGPT_ENGINE_PROCESS=1: every model of a real tritonserver runs its engine in a child process; unary and
    streamed answers equal the engine's in process (itself checked against HF: tests/test_engine_*.py), a bad
    token id is INVALID_ARGUMENT at once, and no engine process outlives the server."""
    grpcclient = pytest.importorskip("tritonclient.grpc")
    import queue

    import numpy as np
    from conftest import make_repository

    from lsgpt.engine.engine import Engine, SamplingParams
    from lsgpt.serving.launcher import TritonServer, free_port

    monkeypatch.setenv("LSGPT_ENGINE_PROCESS", "1")
    before = set(_engine_processes())
    repo = make_repository(tmp_path / "repo", tiny_models)
    want = Engine.load(tiny_models.int8, device="cpu").generate([[5, 17, 30]], SamplingParams(max_new_tokens=6, top_k=1))[0]
    server = TritonServer(repo, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(), poll_secs=1)
    with server:
        server.wait_ready(180)
        assert len(set(_engine_processes()) - before) >= 2  # one per loaded model
        c = grpcclient.InferenceServerClient(server.grpc_url)

        def inputs(ids):
            ins = [grpcclient.InferInput("token_ids", [1, len(ids)], "INT32"),
                   grpcclient.InferInput("max_new_tokens", [1, 1], "INT32"), grpcclient.InferInput("top_k", [1, 1], "INT32")]
            for t, v in zip(ins, (np.array([ids], np.int32), np.array([[6]], np.int32), np.array([[1]], np.int32))):
                t.set_data_from_numpy(v)
            return ins

        row = c.infer("gpt2_int8", inputs([5, 17, 30])).as_numpy("result")[0].tolist()
        assert row[: len(want)] == want
        with pytest.raises(Exception, match="vocabulary"):
            c.infer("gpt2_int8", inputs([5, 10**6]))
        got: queue.Queue = queue.Queue()
        c.start_stream(callback=lambda result, error: got.put((result, error)))
        c.async_stream_infer("gpt2_int8_stream", inputs([5, 17, 30]), enable_empty_final_response=True)
        toks = []
        while True:
            result, error = got.get(timeout=60)
            assert error is None
            ids = result.as_numpy("result")
            toks += [] if ids is None else ids.reshape(-1).tolist()
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
        c.stop_stream()
        c.close()
        assert toks == want[3:]
    deadline = time.monotonic() + 10
    while set(_engine_processes()) - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not set(_engine_processes()) - before, "an engine process outlived the server"
