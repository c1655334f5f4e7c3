"""Stream cancellation through the real tritonserver: a client that closes its gRPC stream after 2 tokens of a
long streamed request (the decoupled twin gpt2_stream, in-flight batching) frees the request's row at once.

Oracle: what the server itself reports (its Prometheus metrics: lsgpt_generated_tokens_total,
lsgpt_cancelled_requests_total, lsgpt_running_rows, lsgpt_requests_total) and a following request, against the engine in process. The served
model is a small GPT-2 with 1024 positions whose final LayerNorm has zero gain: its logits are the same whatever
the input (ln_f's bias times the embedding), so its greedy continuation is one token, never EOS, and a request
left running generates exactly MAX_NEW tokens (full decode steps: seconds on a CPU). A cancelled one stops
within a few steps; the test allows half of MAX_NEW (the gRPC cancellation reaches the model asynchronously).
The twin runs one row at a time (max_running_rows 1), so the following request can only start once the cancelled
one has left. No wall-clock assertions: deadlines are hang guards only."""

from __future__ import annotations

import dataclasses
import re
import threading
import time

import numpy as np
import pytest

grpcclient = pytest.importorskip("tritonclient.grpc")
from conftest import TINY_VOCAB, make_repository, scrape_metrics  # noqa: E402

from lsgpt.engine.engine import Engine, SamplingParams  # noqa: E402
from lsgpt.serving.launcher import TritonServer, free_port  # noqa: E402

MAX_STEP = 1024
MAX_NEW = 1000  # left to run, the request generates exactly this many tokens (no EOS: see the fixture)
TOKEN = TINY_VOCAB.index("我")  # the model's only greedy token
MODEL, LABELS = "gpt2_stream", '{model="gpt2_stream",version="1"}'


@pytest.fixture(scope="module")
def long_served(tiny_models, tmp_path_factory):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from lsgpt.export.convert import export_model

    d = tmp_path_factory.mktemp("cancel")
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=4, n_embd=128, n_head=4, vocab_size=len(TINY_VOCAB), n_positions=MAX_STEP,
                     bos_token_id=2, eos_token_id=3, pad_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # logits = wte @ ln_f.bias whatever the input: TOKEN wins by a wide margin
        wte = model.transformer.wte.weight
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(wte[TOKEN] / wte[TOKEN].dot(wte[TOKEN]) * 10)  # its logit: 10
        top2 = (wte @ model.transformer.ln_f.bias).topk(2)
    assert top2.indices[0] == TOKEN and top2.values[0] - top2.values[1] > 2.0, top2
    path = export_model(model, d / "long.hdf5", max_step=MAX_STEP, eos_id=3)
    (d / "repo").mkdir()
    repo = make_repository(d / "repo", dataclasses.replace(tiny_models, fp16=path, max_step=MAX_STEP))
    config = repo / MODEL / "config.pbtxt"
    text, n = re.subn(r'(key: "max_running_rows", value: \{ string_value: ")[^"]+', r"\g<1>1", config.read_text())
    assert n == 1
    config.write_text(text)
    server = TritonServer(repo, models=[MODEL], grpc_port=free_port(), http_port=free_port(),
                          metrics_port=free_port())
    with server:
        server.wait_ready(180)
        yield server, Engine.load(path, device="cpu")


def tensor(name: str, value, dtype: str):
    arr = np.asarray([value], dtype={"INT32": np.int32}[dtype])
    t = grpcclient.InferInput(name, list(arr.shape), dtype)
    t.set_data_from_numpy(arr)
    return t


def inputs(prompt: list[int], max_new_tokens: int) -> list:
    return [tensor("token_ids", prompt, "INT32"), tensor("max_new_tokens", [max_new_tokens], "INT32"),
            tensor("top_k", [1], "INT32")]


def settled(server, timeout: float = 120.0) -> dict[str, float]:
    """The model's metrics once no row runs and the counters stopped moving (the metrics thread publishes every
    0.5 s: two scrapes a second apart agree). The timeout is a hang guard."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        now = scrape_metrics(server)
        key = (now[f"lsgpt_generated_tokens_total{LABELS}"], now[f"lsgpt_requests_total{LABELS}"])
        if last == key and now[f"lsgpt_running_rows{LABELS}"] == 0 and now[f"lsgpt_queued_requests{LABELS}"] == 0:
            return now
        assert time.monotonic() < deadline, server.log_tail()
        last = key
        time.sleep(1.0)


def stream(url: str, prompt: list[int], max_new_tokens: int, cancel_after: int | None = None) -> tuple[list[int], bool]:
    """Stream a request; with cancel_after, close the stream (cancel_requests=True) once that many tokens came.
    -> (tokens received, whether the final response came)."""
    c = grpcclient.InferenceServerClient(url)
    got: list[int] = []
    errors: list = []
    final, ended, enough = threading.Event(), threading.Event(), threading.Event()

    def callback(result, error) -> None:
        if error is not None:
            errors.append(error)
            ended.set()
            return
        got.extend(result.as_numpy("result").reshape(-1).tolist())
        if cancel_after is not None and len(got) >= cancel_after:
            enough.set()
        if result.get_response().parameters["triton_final_response"].bool_param:
            final.set()
            ended.set()

    try:
        c.start_stream(callback=callback)
        c.async_stream_infer(MODEL, inputs(prompt, max_new_tokens), enable_empty_final_response=True)
        if cancel_after is not None:
            assert enough.wait(120) or ended.is_set(), "no tokens within 120 s"  # hang guard
            c.stop_stream(cancel_requests=True)  # the callback then gets the stream's own CANCELLED error
            assert all("CANCELLED" in str(e.status()) for e in errors), [(e.status(), e.message()) for e in errors]
            return list(got), final.is_set()
        assert ended.wait(300), "no final response within 300 s"  # hang guard
        assert not errors, errors
        return list(got), True
    finally:
        c.stop_stream(cancel_requests=True)
        c.close()


def test_cancelled_stream_frees_its_row_and_stops_generating(long_served):
    server, engine = long_served
    gen, req = f"lsgpt_generated_tokens_total{LABELS}", f"lsgpt_requests_total{LABELS}"
    cancelled = f"lsgpt_cancelled_requests_total{LABELS}"
    prompt = [2, 7, 8, 9]  # [CLS] 我今天
    assert engine.generate([prompt], SamplingParams(max_new_tokens=8, top_k=1))[0][len(prompt):] == [TOKEN] * 8
    before = settled(server)

    got, finished = stream(server.grpc_url, prompt, MAX_NEW, cancel_after=2)
    assert not finished and len(got) >= 2
    after = settled(server)
    generated = after[gen] - before[gen]
    print(f"cancelled after {len(got)} tokens received: the server generated {generated:.0f} of {MAX_NEW}")
    assert after[req] - before[req] == 1
    assert after[cancelled] - before[cancelled] == 1  # the scheduler's count, published as a counter
    assert len(got) <= generated < MAX_NEW // 2  # the row stopped (left running: exactly MAX_NEW)
    assert got == engine.generate([prompt], SamplingParams(max_new_tokens=len(got), top_k=1))[0][len(prompt):]

    # The row is free: with one row, the next request runs to its end, and only its tokens are counted.
    short, finished = stream(server.grpc_url, prompt, 5)
    assert finished and short == engine.generate([prompt], SamplingParams(max_new_tokens=5, top_k=1))[0][len(prompt):]
    final = settled(server)
    assert final[gen] - after[gen] == len(short) and final[req] - after[req] == 1
    assert final[cancelled] == after[cancelled]  # a request that ran to its end is not counted


def test_client_streams_leave_no_thread_behind(long_served, tiny_models):
    """lsgpt.client.api's streams, cancelled or run to their end, end gRPC's request-reader thread. tritonclient 2.51's
    stop_stream(cancel_requests=True) alone leaves it waiting forever: one thread per stream (a soak client stalled
    after ~3,000 cancelled streams; the OpenAI frontend streams every completion through this path)."""
    from lsgpt.client.api import Client

    server, _ = long_served
    c = Client(server.grpc_url, "gpt2", tiny_models.tokenizer, stream_model=MODEL, timeout=120)
    prompt = [2, 7, 8, 9]
    assert len(list(c.stream_ids(prompt, max_new_tokens=3, top_k=1))) == 3  # gRPC's own threads start here
    time.sleep(0.5)
    before = threading.active_count()
    for _ in range(12):
        it = c.stream_ids(prompt, max_new_tokens=200, top_k=1)
        assert [t for t, _ in zip(it, range(2))]  # two tokens, then the caller goes away
        it.close()
        assert [t for t, _ in c.stream_ids(prompt, max_new_tokens=2, top_k=1)] == [TOKEN, TOKEN]
    deadline = time.monotonic() + 30
    while threading.active_count() > before + 2 and time.monotonic() < deadline:  # let finished threads exit
        time.sleep(0.2)
    assert threading.active_count() <= before + 2, (before, [t.name for t in threading.enumerate()])
    settled(server)  # and the server freed every row


def test_in_band_cancel_stops_the_row_and_the_call_ends_without_a_grpc_cancel(long_served):
    """lsgpt.client.api.close_stream(c, cancel=(model, request id, key)): the model is asked on the stream itself
    (contract.CANCEL, with the key the request carried: contract.CANCEL_KEY) to stop the request, the stream is half-closed, and the server ends the call — no gRPC
    cancellation, which tritonserver 2.51's gRPC frontend can answer by corrupting its heap (a CPU soak with
    half the streams cancelled so hung it within a minute). Oracles: the server's metrics (one cancelled request,
    far fewer tokens than asked), the model's own CANCELLED answer on the stream, and no local gRPC cancel."""
    import secrets
    import uuid

    from lsgpt.client.api import close_stream
    from lsgpt.contract import CANCEL_KEY

    server, engine = long_served
    gen, cancelled = f"lsgpt_generated_tokens_total{LABELS}", f"lsgpt_cancelled_requests_total{LABELS}"
    prompt = [2, 7, 8, 9]
    before = settled(server)
    c = grpcclient.InferenceServerClient(server.grpc_url)
    got, errors, empty, two = [], [], [], threading.Event()

    def callback(result, error) -> None:
        if error is not None:
            errors.append(error)
            return
        ids = result.as_numpy("result")
        if ids is None:
            empty.append(result)  # the answer to the cancel request itself
            return
        got.extend(ids.reshape(-1).tolist())
        if len(got) >= 2:
            two.set()

    rid, key = uuid.uuid4().hex, secrets.token_hex(16)
    try:
        c.start_stream(callback=callback)
        c.async_stream_infer(MODEL, inputs(prompt, MAX_NEW), request_id=rid, parameters={CANCEL_KEY: key})
        assert two.wait(120), "no tokens within 120 s"  # hang guard
        handler = c._stream._handler
        close_stream(c, cancel=(MODEL, rid, key), wait=120)
        assert not handler.is_alive()  # the server ended the call: close_stream had no need to cancel it
    finally:
        c.close()
    messages = [str(e) for e in errors]
    assert len(errors) == 1 and "cancelled" in messages[0].lower(), messages  # the model's FINAL for the request
    assert not any("Locally cancelled" in m for m in messages), messages
    assert len(empty) == 1
    after = settled(server)
    assert after[cancelled] - before[cancelled] == 1
    assert len(got) <= after[gen] - before[gen] < MAX_NEW // 2
    assert got == engine.generate([prompt], SamplingParams(max_new_tokens=len(got), top_k=1))[0][len(prompt):]

    # an in-band cancel that names no running request is answered and changes nothing
    c = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        c.start_stream(callback=callback)
        short = stream(server.grpc_url, prompt, 3)
        close_stream(c, cancel=(MODEL, "no-such-request", key), wait=60)
    finally:
        c.close()
    assert short == ([TOKEN] * 3, True) and len(empty) == 2 and len(errors) == 1


def test_ctrl_c_of_a_streaming_cli_stops_the_request_on_the_server(long_served, tiny_models):
    """client/generate.py --stream interrupted (SIGINT, what Ctrl-C sends) mid-stream: it says so in one line and
    exits 130, no traceback; the server counts one cancelled request and stops generating (the stream's request
    is stopped in band as the iterator closes)."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    server, _ = long_served
    gen, cancelled = f"lsgpt_generated_tokens_total{LABELS}", f"lsgpt_cancelled_requests_total{LABELS}"
    root = Path(__file__).resolve().parents[1]
    for attempt in range(3):
        before = settled(server)
        proc = subprocess.Popen([sys.executable, "client/generate.py", "-m", "gpt2", "--url", server.grpc_url,
                                 "--stream", "-i", "我今天", "-p", str(tiny_models.tokenizer), "--max-new-tokens",
                                 str(MAX_NEW), "--top-k", "1"], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                # Ctrl-C reaches a terminal's foreground job; a job started in the background
                                # (nohup, make from a script) inherits SIGINT ignored and would never see it
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        seen = b""
        while seen.count("我".encode()) < 4:  # the prompt's 我, then streamed ones
            chunk = proc.stdout.read1(64)
            assert chunk, proc.stderr.read().decode()[-2000:]
            seen += chunk
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        err = err.decode()
        if proc.returncode == 0 and (seen + out).count("我".encode()) == MAX_NEW + 1:
            # all 1,000 tokens (1-2 s here) came before the signal did (a busy machine kept this process waiting
            # that long): no answer, so ask again; a CLI that ignores Ctrl-C does this every time
            print(f"attempt {attempt + 1}: the stream ended before SIGINT; again")
            continue
        break
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, (proc.returncode, err[-2000:])
    after = settled(server)
    assert after[cancelled] - before[cancelled] == 1
    assert after[gen] - before[gen] < MAX_NEW // 2


def test_no_cancellation_check_overlaps_or_follows_the_final_response():
    """tritonserver 2.51 frees a request's response factory when its FINAL response is sent and does not guard an
    is_cancelled() that reaches it later (a GPU soak's streaming twin stopped answering for good). Watched.close(),
    taken before every FINAL, waits for a check in flight and no check runs after it. Oracle: the order of events
    logged by the check itself and by the closer."""
    from lsgpt.serving.cancel import CancelWatch

    events: list[str] = []
    inside, release = threading.Event(), threading.Event()

    def check() -> bool:
        events.append("check")
        inside.set()
        release.wait(10)
        events.append("check end")
        return False

    watch = CancelWatch("test")
    try:
        w = watch.watch(check)
        assert inside.wait(10)  # the watcher's thread is inside a check
        closer = threading.Thread(target=lambda: (w.close(), events.append("closed")))
        closer.start()
        time.sleep(0.3)
        assert "closed" not in events  # the FINAL waits for the check in flight
        release.set()
        closer.join(10)
        assert events[-2:] == ["check end", "closed"], events
        n = len(events)
        time.sleep(0.3)  # 30 of the watcher's periods
        assert len(events) == n and not w(), events  # no check after the FINAL
    finally:
        watch.close()


def test_a_stalled_response_send_is_reported_then_ends_the_model_process(capfd):
    """A send that never returns (the server no longer takes the model's messages) must not leave a model that
    Triton calls ready while every request hangs: the outbox reports the stall with every thread's stack, then
    ends the process (here: a stand-in for SIGKILL), which the launcher's supervisor turns into a restart. A send
    that returns in time triggers neither."""
    from lsgpt.serving.outbox import Outbox

    exits, release = [], threading.Event()
    box = Outbox("stall-test", stall_report_s=0.4, stall_exit_s=1.2, exit_process=lambda: exits.append(1))
    try:
        box.put(lambda: time.sleep(0.05))  # a slow but healthy send
        time.sleep(0.6)
        assert "has not returned" not in capfd.readouterr().err and not exits
        box.put(lambda: release.wait(30))  # a send that does not come back
        deadline = time.monotonic() + 20
        while not exits and time.monotonic() < deadline:
            time.sleep(0.05)
        err = capfd.readouterr().err
        assert exits == [1], err
        assert "stall-test: a response send has not returned" in err and "test_cancellation.py" in err, err  # the stack
        assert err.count("has not returned") == 1  # once per stall
    finally:
        release.set()
        box.close()


WEDGED_CONFIG = """name: "wedged"
backend: "python"
max_batch_size: 1
model_transaction_policy { decoupled: true }
input [ { name: "token_ids" data_type: TYPE_INT32 dims: [ -1 ] } ]
input [ { name: "max_new_tokens" data_type: TYPE_INT32 dims: [ 1 ] optional: true } ]
input [ { name: "top_k" data_type: TYPE_INT32 dims: [ 1 ] optional: true } ]
output [ { name: "result" data_type: TYPE_INT32 dims: [ -1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""
WEDGED_MODEL = """class TritonPythonModel:
    def execute(self, requests):
        self.senders = [r.get_response_sender() for r in requests]  # taken, never answered
        return None
"""


@pytest.mark.timeout(150)  # a hang (the failure this test is about) fails it
def test_a_stream_from_a_model_that_never_answers_times_out_and_leaves_nothing(tmp_path, tiny_models):
    """A streaming model that takes requests and never answers (what the GPU soak's wedged twin did): the client
    library gets RequestTimeout after its timeout, every time, and keeps no thread. tritonclient's close() alone
    waits for the stream's answer; the stream's deadline and close_stream() each end that wait (without both,
    this test hangs into its pytest timeout; the soak client, with neither, hung for good)."""
    from lsgpt.client.api import Client, RequestTimeout

    (tmp_path / "wedged" / "1").mkdir(parents=True)
    (tmp_path / "wedged" / "config.pbtxt").write_text(WEDGED_CONFIG)
    (tmp_path / "wedged" / "1" / "model.py").write_text(WEDGED_MODEL)
    with TritonServer(tmp_path, models=["wedged"], grpc_port=free_port(), http_port=free_port(),
                      metrics_port=free_port()) as server:
        server.wait_ready(120)
        c = Client(server.grpc_url, "wedged", tiny_models.tokenizer, stream_model="wedged", timeout=2)
        before = threading.active_count()
        for _ in range(3):
            t = time.monotonic()
            with pytest.raises(RequestTimeout):
                list(c.stream_ids([2, 7, 8], max_new_tokens=4, top_k=1))
            assert time.monotonic() - t < 30  # a hang guard, not a timing assertion
        time.sleep(0.5)
        assert threading.active_count() <= before + 2, [t.name for t in threading.enumerate()]
