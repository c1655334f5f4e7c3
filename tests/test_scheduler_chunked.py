"""Prefill under a token budget (lsgpt/engine/scheduler.py, issue 29), in process on the CPU, and the running set
sized "auto".

Oracles: HF transformers' greedy generate on a model whose argmax margins are wide (tests/oracles/tiny.py's
`wide` model: a token does not depend on float rounding), for prompts at, just over and far over the budget,
alone and joining running rows; the whole-prompt forward's logits for a prompt prefilled chunk by chunk into a
cache row (a tolerance, not bit equality); the decode-step counter between chunks (running rows are not stalled
by a long prompt); the KV-cache formula of `kv_rows`, computed by hand.
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest

from oracles import tiny

torch = pytest.importorskip("torch")

MAX_STEP = 128


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from tiny.one_torch_thread()


@pytest.fixture(scope="module")
def model():
    return tiny.make_model(seed=0, wide=True)


@pytest.fixture(scope="module")
def engine(model, tmp_path_factory):
    return tiny.cpu_engine(model, tmp_path_factory.mktemp("chunk"), max_step=MAX_STEP)


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 990, (n,), generator=g).tolist()


def _greedy(n: int):
    from lsgpt.engine.engine import SamplingParams

    return SamplingParams(max_new_tokens=n, top_k=1, ignore_eos=True)


def _hf(model, ids: list[int], prompt: list[int], n: int) -> bool:
    """ids (ignore_eos) = HF greedy's continuation; HF stops at EOS even when told not to, so its output may be a
    prefix that ends with EOS."""
    want = tiny.hf_greedy(model, prompt, n)
    return ids[: len(want)] == want and (len(want) == len(ids) == len(prompt) + n or want[-1] == tiny.EOS_ID)


def _run(sched, jobs: list[tuple[list[int], int]], timeout: float = 120) -> list[list[int]]:
    """Submit every (prompt, new tokens) at once; each one's result (errors raised)."""
    out: dict[int, tuple] = {}
    ev = threading.Event()

    def cb(i):
        def done(ids, err):
            out[i] = (ids, err)
            if len(out) == len(jobs):
                ev.set()
        return done

    for i, (p, n) in enumerate(jobs):
        sched.submit(p, _greedy(n), cb(i))
    assert ev.wait(timeout), f"{len(out)}/{len(jobs)} answered"
    for _ids, err in out.values():
        if err is not None:
            raise err
    return [out[i][0] for i in range(len(jobs))]


@pytest.mark.parametrize("which", ["fp", "int8"])
def test_chunks_into_a_cache_row_give_the_whole_prompts_logits(tiny_models, which):
    """The forward the scheduler runs per chunk (a slot's row of a bigger cache, positions offset) ends with the
    logits of the whole prompt's single forward, within float tolerance (fp: 1e-4 of the logit range; int8: the
    integer path requantizes, so a few clip steps)."""
    from lsgpt.engine.engine import Engine
    from lsgpt.engine.scheduler import Scheduler

    e = Engine.load(tiny_models.fp16 if which == "fp" else tiny_models.int8, device="cpu")
    prompt = torch.tensor([_prompt(tiny_models.max_step - 1, seed=3)]) % e.config.vocab
    whole, _ = e.prefill(prompt, torch.tensor([prompt.shape[1] - 1]))
    s = Scheduler(e, max_rows=3, prefill_tokens=10)
    try:
        with torch.inference_mode():
            for start in range(0, prompt.shape[1], 10):  # into slot 2: rows 0, 1 stay untouched
                got = s._chunk_forward(prompt[:, start: start + 10], start, 2)
        assert all(float(k[:2].abs().max()) == 0 for k in s.cache.k)
    finally:
        s.close()
    scale = float(whole.abs().max())
    tol = 1e-4 * scale if which == "fp" else 8 * e.model.head_scales.deq
    assert float((got - whole).abs().max()) <= tol


@pytest.mark.parametrize("length, chunks", [(8, 0), (9, 2), (MAX_STEP - 1, 16)],
                         ids=["at-budget", "budget+1", "max_step-1"])
def test_prompt_at_over_and_far_over_the_budget_gets_hf_greedy(engine, model, length, chunks):
    """Budget 8: a prompt of 8 goes whole, 9 in two chunks (8 + 1), max_step-1 in 16; each equals HF greedy,
    alone and while two other rows run."""
    from lsgpt.engine.scheduler import Scheduler

    long, new = _prompt(length, seed=length), min(6, MAX_STEP - length)
    others = [(_prompt(3, seed=1), 40), (_prompt(5, seed=2), 30)]
    s = Scheduler(engine, max_rows=4, prefill_tokens=8)
    try:
        assert _hf(model, _run(s, [(long, new)])[0], long, new)
        assert s.stats.chunks == chunks
        got = _run(s, others + [(long, new)])
        assert s.stats.chunks == 2 * chunks
        for (p, n), ids in zip(others + [(long, new)], got):
            assert _hf(model, ids, p, n)
    finally:
        s.close()


def test_running_rows_keep_stepping_between_chunks(engine, model):
    """A 100-token prompt joins (budget 8: 13 chunks) in a slot *below* a running row, so between its chunks the
    decode steps compute that slot as a free one (its pos kept past what the chunks wrote): a decode step runs
    between every two chunks, every output equals HF greedy (no cache row corrupted), and the scheduler's
    counters add up."""
    from lsgpt.engine.scheduler import Scheduler

    s = Scheduler(engine, max_rows=4, prefill_tokens=8, admit_every=1)
    at_chunk: list[int] = []
    forward = s._chunk_forward

    def spy(tokens, start, slot):  # the real forward, with the decode-step count at each chunk
        at_chunk.append((s.stats.steps, slot))
        return forward(tokens, start, slot)

    s._chunk_forward = spy
    try:
        a, b, c = (_prompt(2, seed=10), 60), (_prompt(2, seed=11), 2), (_prompt(2, seed=12), 70)
        s.generate(*b[:1], _greedy(1))  # warm, and slot 0 gets a stale pos from an earlier occupant
        with s._cv:  # the loop held off: a, b, c join in one prefill (3 x 2 tokens), slots 0, 1, 2
            ra, rb, rc = _run_async(s, [a, b, c])
        while len(rb) == 0:  # b (slot 1) finishes after 2 tokens; a (slot 0) and c (slot 2) run on
            time.sleep(0.001)
        long = (_prompt(100, seed=13), 5)
        (rl,) = _run_async(s, [long])
        _wait([ra, rc, rl])
        slots = {slot for _, slot in at_chunk[-13:]}
        steps = [n for n, _ in at_chunk[-13:]]
        assert len(at_chunk) == 13 and slots == {1}
        assert all(y > x for x, y in zip(steps, steps[1:])), f"decode steps at each chunk: {steps}"
        for (p, n), r in zip([a, b, c, long], [ra, rb, rc, rl]):
            assert _hf(model, r[0], p, n)
        assert s.stats.prompt_tokens == 2 + 3 * 2 + 100 and s.running == 0
    finally:
        s.close()


def _run_async(sched, jobs) -> list[list]:
    boxes = [[] for _ in jobs]
    for box, (p, n) in zip(boxes, jobs):
        sched.submit(p, _greedy(n), lambda ids, err, box=box: box.append(ids if err is None else err))
    return boxes


def _wait(boxes, timeout: float = 120) -> None:
    t0 = time.time()
    while not all(boxes):
        assert time.time() - t0 < timeout
        time.sleep(0.005)


def test_few_waiting_requests_wait_for_admit_every_however_many_rows_are_free(engine, model):
    """32 rows, 4 running: one request left over by the budget (4 x 2 tokens fill 8) is admitted admit_every
    steps after the first group, not at the next step (with the running set sized from memory most rows are free
    at low concurrency: admitting whenever rows are free would prefill at every step); a burst (as many waiting
    as rows decode) is admitted at once. Counted in decode steps at each prefill."""
    from lsgpt.engine.scheduler import Scheduler

    s = Scheduler(engine, max_rows=32, prefill_tokens=8, admit_every=8)
    at: list[tuple[int, int]] = []
    prefill = s._prefill

    def spy(group):
        at.append((s.stats.steps, len(group)))
        return prefill(group)

    s._prefill = spy
    try:
        jobs = [(_prompt(2, seed=50 + i), 30) for i in range(5)]
        with s._cv:
            boxes = _run_async(s, jobs)
        _wait(boxes)
        assert at == [(0, 4), (9, 1)]  # admitted with the group at step 0; then 8 steps waited, at the 9th
        for (p, n), box in zip(jobs, boxes):
            assert _hf(model, box[0], p, n)
        at.clear()
        with s._cv:  # 2 running, then 4 arrive at once: 4 >= 2 rows decoding, no waiting
            boxes = _run_async(s, [(_prompt(2, seed=60 + i), 30) for i in range(2)])
        while not at or s.stats.steps < at[0][0] + 2:
            time.sleep(0.001)
        with s._cv:  # the 4 queued together (the loop waits on this lock at its next iteration): on a busy machine,
            boxes += _run_async(s, [(_prompt(2, seed=70 + i), 10) for i in range(4)])  # unlocked, 8 steps once
        _wait(boxes)  # passed between the first and the second
        assert len(at) == 2 and at[1][1] == 4 and at[1][0] - at[0][0] < 8, at
    finally:
        s.close()


def test_penalties_and_stop_sequences_of_a_chunked_prompt(engine):
    """A chunked prompt's penalties count its whole prompt, and stop sequences end it, as unchunked: the same
    tokens with budget 4 (chunked) as with the default budget (whole), among other rows."""
    from lsgpt.engine.engine import SamplingParams
    from lsgpt.engine.scheduler import Scheduler

    p = _prompt(30, seed=20)
    sp = SamplingParams(max_new_tokens=25, top_k=1, repetition_penalty=1.3, frequency_penalty=0.4, ignore_eos=True)
    whole = Scheduler(engine, max_rows=2)
    try:
        want = whole.generate(p, sp, timeout=60)
        stop = tuple(want[len(p) + 10: len(p) + 12])
        want_stop = whole.generate(p, replace(sp, stop=(stop,)), timeout=60)
    finally:
        whole.close()
    assert len(want_stop) <= len(p) + 12
    s = Scheduler(engine, max_rows=3, prefill_tokens=4)
    try:
        (other,) = _run_async(s, [(_prompt(3, seed=21), 40)])
        assert s.generate(p, sp, timeout=60) == want
        assert s.generate(p, replace(sp, stop=(stop,)), timeout=60) == want_stop
        _wait([other])
        assert s.stats.chunks == 2 * 8
    finally:
        s.close()


def test_cancelled_while_in_chunks_frees_its_slot(engine, model):
    """One row (max_rows 1), budget 4: a 120-token prompt cancelled after its second chunk gets Cancelled, and
    the next request runs in that slot and equals HF greedy."""
    from lsgpt.engine.scheduler import Cancelled, Scheduler

    s = Scheduler(engine, max_rows=1, prefill_tokens=4)
    try:
        box: list = []
        s.submit(_prompt(120, seed=30), _greedy(5), lambda ids, err: box.append((ids, err)),
                 cancelled=lambda: s.stats.chunks >= 2)
        nxt = _prompt(4, seed=31)  # = the budget: one whole prefill
        assert _hf(model, s.generate(nxt, _greedy(8), timeout=60), nxt, 8)
        assert box and box[0][0] is None and isinstance(box[0][1], Cancelled)
        assert s.stats.chunks == 2 and s.stats.cancelled == 1 and s.running == 0
    finally:
        s.close()


def test_close_while_in_chunks_answers_shutting_down(engine):
    from lsgpt.engine.scheduler import Scheduler, ShuttingDown

    s = Scheduler(engine, max_rows=1, prefill_tokens=1)
    box: list = []
    gate = threading.Event()
    s.submit(_prompt(100, seed=40), _greedy(5), lambda ids, err: box.append(err),
             cancelled=lambda: gate.wait(10) and False)  # each chunk waits for the gate: it is mid-prompt at close
    time.sleep(0.2)
    threading.Timer(0.3, gate.set).start()
    s.close(timeout=30)
    assert len(box) == 1 and isinstance(box[0], ShuttingDown) and s.stats.chunks < 100


# --------------------------------------------------------------------------------------------------------------
# The running set's size


def test_kv_rows_is_the_largest_bucket_whose_cache_fits():
    from lsgpt.engine.scheduler import kv_rows

    per_row = 12 * 2 * 1024 * 768 * 2  # 12 layers, k and v, 1024 steps, hidden 768, fp16: 37.7 MB a row
    assert kv_rows(80 * 10**9, 12, 1024, 768, 2) == 256  # 0.4 x 80 GB holds 847 rows: capped at 256
    assert kv_rows(int(128 * per_row / 0.4), 12, 1024, 768, 2) == 128  # exactly 128 rows' worth
    assert kv_rows(int(128 * per_row / 0.4) - 1, 12, 1024, 768, 2) == 64
    assert kv_rows(4 * 10**9, 12, 1024, 768, 2) == 32  # 1.6 GB: 42 rows -> the bucket 32
    assert kv_rows(4 * 10**9, 12, 1024, 768, 1) == 64  # int8 cache: half the bytes, 84 rows
    assert kv_rows(10**6, 12, 1024, 768, 2) == 1  # nothing fits: one row
    assert kv_rows(80 * 10**9, 12, 1024, 768, 2, fraction=0.9, cap=64) == 64


def test_auto_rows_on_the_cpu_and_integers(engine):
    from lsgpt.engine.scheduler import CPU_ROWS, Scheduler, running_rows

    assert running_rows(engine, "auto") == running_rows(engine, " AUTO ") == CPU_ROWS == 32
    assert running_rows(engine, "7") == running_rows(engine, 7) == 7
    for bad in ("0", "-3", "lots"):
        with pytest.raises(ValueError):
            running_rows(engine, bad)
    s = Scheduler(engine, max_rows="auto")
    try:
        assert s.max_rows == 32 and s.buckets[-1] == 32 and s.cache.k[0].shape[0] == 32
    finally:
        s.close()


def test_served_model_reads_auto_or_an_integer():
    """config.pbtxt's scheduler parameters as triton_model reads them ("auto" in any case, an integer, absent)."""
    from lsgpt.serving.triton_model import _param

    cfg = {"parameters": {"max_running_rows": {"string_value": "Auto"}, "admit_every": {"string_value": " 4 "},
                          "max_prefill_tokens": {"string_value": ""}}}
    assert _param(cfg, "max_running_rows", 32) == "auto"
    assert _param(cfg, "admit_every", "auto") == 4
    assert _param(cfg, "max_prefill_tokens", "auto") == "auto" and _param(cfg, "absent", 256) == 256
    with pytest.raises(ValueError):
        _param({"parameters": {"k": {"string_value": "many"}}}, "k", 1)


def test_served_model_reads_the_gil_switch_interval(monkeypatch):
    """LSGPT_SWITCH_INTERVAL_MS: milliseconds (default 0.5, 0 keeps Python's); anything else names the variable."""
    from lsgpt.serving.triton_model import _switch_interval_s

    monkeypatch.delenv("LSGPT_SWITCH_INTERVAL_MS", raising=False)
    assert _switch_interval_s() == 0.0005
    for raw, want in ((" 2 ", 0.002), ("0", 0.0)):
        monkeypatch.setenv("LSGPT_SWITCH_INTERVAL_MS", raw)
        assert _switch_interval_s() == want
    for raw in ("fast", "-1", "nan"):
        monkeypatch.setenv("LSGPT_SWITCH_INTERVAL_MS", raw)
        with pytest.raises(RuntimeError, match="LSGPT_SWITCH_INTERVAL_MS=.*milliseconds"):
            _switch_interval_s()


def test_served_model_reads_the_engine_process_switch(monkeypatch):
    """engine_process: the config parameter as written in config.pbtxt ("true", any case), or LSGPT_ENGINE_PROCESS,
    which wins; absent or "auto": on for an engine on a GPU only; anything else: an error naming it."""
    from lsgpt.serving.triton_model import _engine_process

    monkeypatch.delenv("LSGPT_ENGINE_PROCESS", raising=False)
    on = {"parameters": {"engine_process": {"string_value": " True "}}}
    assert _engine_process(on, "cpu") and not _engine_process({}, "cpu")
    assert _engine_process({}, "cuda:0") and _engine_process({"parameters": {"engine_process": {"string_value": "auto"}}}, "cuda")
    assert not _engine_process({"parameters": {"engine_process": {"string_value": "false"}}}, "cuda:0")
    monkeypatch.setenv("LSGPT_ENGINE_PROCESS", "0")
    assert not _engine_process(on, "cuda:0")
    monkeypatch.setenv("LSGPT_ENGINE_PROCESS", "yes")
    assert _engine_process({}, "cpu")
    monkeypatch.setenv("LSGPT_ENGINE_PROCESS", "maybe")
    with pytest.raises(RuntimeError, match="maybe"):
        _engine_process({}, "cpu")
