"""In-flight batching (lsgpt/engine/scheduler.py) in process, on the CPU.

Oracles: HF transformers' greedy generate (each request of a crowd that joins and leaves at different steps
gets exactly HF's continuation of its own prompt); the order in which requests finish (a short request that
joins a running long one finishes first: counted in decode steps, not seconds); the scheduler's bounds.
"""

from __future__ import annotations

import shutil
import threading
import time

import pytest

from oracles import tiny

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from tiny.one_torch_thread()


@pytest.fixture(scope="module")
def model():
    return tiny.make_model(seed=0, wide=True)


@pytest.fixture(scope="module")
def engine(model, tmp_path_factory):
    return tiny.cpu_engine(model, tmp_path_factory.mktemp("sched"), max_step=128)


class Collector:
    def __init__(self):
        self.done: dict[str, tuple] = {}
        self.order: list[str] = []
        self.ev = threading.Event()
        self.lock = threading.Lock()

    def cb(self, name):
        def done(ids, err):
            with self.lock:
                self.done[name] = (ids, err)
                self.order.append(name)
                self.ev.set()
        return done

    def wait(self, n, timeout=120):
        t0 = time.time()
        while len(self.done) < n:
            assert time.time() - t0 < timeout, f"only {len(self.done)}/{n} requests answered"
            time.sleep(0.01)


@pytest.mark.parametrize("defer_first, ahead", [(False, 1), (True, 1), (True, 2), (True, 3)],
                         ids=["first-token-at-once", "first-token-deferred", "2-steps-ahead", "3-steps-ahead"])
def test_crowd_joining_and_leaving_gets_hf_greedy(engine, model, defer_first, ahead):
    """Requests of different prompt lengths and lengths join while others run; every one equals HF greedy.
    Deferred: the CUDA way (a prefill's first tokens read back after the next decode step is queued), on the
    CPU; with a 1-token request, which ends on its first token while the step after its prefill includes it.
    Ahead: tokens read back 2 or 3 steps after their step (LSGPT_DECODE_AHEAD): rows that finished keep
    computing until noticed, their slots reused at once, without a token of theirs reaching the next request."""
    from lsgpt.engine.engine import SamplingParams
    from lsgpt.engine.scheduler import Scheduler

    prompts = [[5, 17, 300], [42, 7, 7, 900, 13, 2, 64], [101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 1], [9],
               [700, 701], [33, 34]]
    lengths = [30, 5, 12, 20, 3, 1]
    # fewer rows than requests: some wait for a row, and (admit_every 1) take it the step after it is noticed free
    s = Scheduler(engine, max_rows=3, max_queue=16, ahead=ahead, admit_every=1)
    s.defer_first = defer_first
    try:
        c = Collector()
        with s._cv:  # the loop is held off: the first three join together (one padded prefill, 3 slots)
            for i in range(3):
                s.submit(prompts[i], SamplingParams(max_new_tokens=lengths[i], top_k=1, ignore_eos=True), c.cb(i))
        for i in range(3, len(prompts)):
            time.sleep(0.01 * i)  # arrive while others are mid-generation
            s.submit(prompts[i], SamplingParams(max_new_tokens=lengths[i], top_k=1, ignore_eos=True), c.cb(i))
        c.wait(len(prompts))
        assert s.stats.prefills < len(prompts)
        for i, (p, n) in enumerate(zip(prompts, lengths)):
            ids, err = c.done[i]
            assert err is None
            assert ids == tiny.hf_greedy(model, p, n), f"request {i} differs from HF greedy"
        assert s.running == 0 and s.stats.generated_tokens == sum(lengths)
    finally:
        s.close()


@pytest.mark.parametrize("ahead", [1, 2, 3])
def test_slots_reused_while_steps_are_in_flight_get_no_stale_token(engine, model, ahead):
    """Tokens read back `ahead` steps late (LSGPT_DECODE_AHEAD): a queue longer than the running set, admitted
    the step a row is noticed finished, puts each new request in a slot whose earlier occupant still has steps in
    flight. Every request must equal HF greedy of its own prompt (a token of the slot's earlier occupant handed
    to the newcomer would show)."""
    from lsgpt.engine.engine import SamplingParams
    from lsgpt.engine.scheduler import Scheduler

    prompts = [[5 + i, 17, 300 + i] for i in range(7)]
    lengths = [3, 9, 2, 6, 4, 1, 5]
    s = Scheduler(engine, max_rows=2, max_queue=16, ahead=ahead, admit_every=1)
    try:
        c = Collector()
        with s._cv:  # all queued at once: two run, five wait for a slot
            for i, (p, n) in enumerate(zip(prompts, lengths)):
                s.submit(p, SamplingParams(max_new_tokens=n, top_k=1, ignore_eos=True), c.cb(i))
        c.wait(len(prompts))
        for i, (p, n) in enumerate(zip(prompts, lengths)):
            assert c.done[i] == (tiny.hf_greedy(model, p, n), None), f"request {i} (ahead {ahead})"
        assert s.running == 0 and s.stats.generated_tokens == sum(lengths)
    finally:
        s.close()


def test_short_request_overtakes_a_long_one(engine):
    from lsgpt.engine.engine import SamplingParams
    from lsgpt.engine.scheduler import Scheduler

    s = Scheduler(engine, max_rows=4)
    try:
        c = Collector()
        tokens = []
        s.submit([5, 6, 7], SamplingParams(max_new_tokens=100, top_k=1, ignore_eos=True), c.cb("long"),
                 on_token=tokens.append)
        while len(tokens) < 5:  # the long one is running
            time.sleep(0.001)
        s.submit([8, 9], SamplingParams(max_new_tokens=5, top_k=1, ignore_eos=True), c.cb("short"))
        c.wait(2)
        assert c.order == ["short", "long"]
        assert len(c.done["long"][0]) == 103 and len(c.done["short"][0]) == 7
    finally:
        s.close()


@pytest.mark.parametrize("defer_first", [False, True], ids=["first-token-at-once", "first-token-deferred"])
def test_sampled_rows_do_not_depend_on_batch_mates(engine, defer_first):
    """Per-row generator and penalties: a seeded request gives the same tokens alone and in a crowd of
    different requests (metamorphic check; the sampler's distribution is tested in test_sampling_distribution).
    The penalised request also runs beside rows without penalties, in a slot a penalised row used before (a
    prefill sets the penalty state up only when a joining row has a penalty)."""
    from lsgpt.engine.engine import SamplingParams
    from lsgpt.engine.scheduler import Scheduler

    sp = SamplingParams(max_new_tokens=20, top_k=50, temperature=1.3, seed=7, repetition_penalty=1.2,
                        ignore_eos=True)
    s = Scheduler(engine, max_rows=4)
    s.defer_first = defer_first
    try:
        alone = s.generate([5, 17, 300], sp, timeout=60)
        c = Collector()
        for i in range(3):
            s.submit([11 + i, 12], SamplingParams(max_new_tokens=25, top_p=0.9, seed=i, frequency_penalty=0.5),
                     c.cb(i))
        crowd = s.generate([5, 17, 300], sp, timeout=60)
        c.wait(3)
        assert crowd == alone
        assert len(set(tuple(c.done[i][0]) for i in range(3))) == 3
        plain = SamplingParams(max_new_tokens=30, top_k=1, ignore_eos=True)
        want = s.generate([21, 22], plain, timeout=60)  # unpenalised, alone
        for i in range(3):  # unpenalised rows in the slots the penalised crowd used, the penalised one beside
            s.submit([21, 22], plain, c.cb(f"plain{i}"))
        assert s.generate([5, 17, 300], sp, timeout=60) == alone
        c.wait(6)
        assert all(c.done[f"plain{i}"] == (want, None) for i in range(3))
    finally:
        s.close()


def test_bounds_cancellation_and_shutdown(engine):
    from lsgpt.engine.engine import RequestError, SamplingParams
    from lsgpt.engine.scheduler import Cancelled, QueueFull, Scheduler, ShuttingDown

    long = SamplingParams(max_new_tokens=120, top_k=1, ignore_eos=True)
    s = Scheduler(engine, max_rows=1, max_queue=1)
    c = Collector()
    tokens = []
    stop = threading.Event()
    s.submit([5, 6], long, c.cb("a"), on_token=tokens.append, cancelled=stop.is_set)
    while not tokens:
        time.sleep(0.001)
    s.submit([7, 8], long, c.cb("b"))  # waits for the only row
    with pytest.raises(QueueFull, match="max_queued_requests=1"):
        s.submit([9], long, c.cb("c"))
    with pytest.raises(RequestError, match="outside the vocabulary"):
        s.submit([10**6], long, c.cb("d"))
    stop.set()  # cancel a: its row goes to b within a step
    c.wait(1)
    assert isinstance(c.done["a"][1], Cancelled) and len(tokens) < 120
    s.close()  # b is running or queued: it gets ShuttingDown, nothing hangs
    c.wait(2)
    assert isinstance(c.done["b"][1], ShuttingDown)
    with pytest.raises(ShuttingDown):
        s.submit([5], long, c.cb("e"))
    assert s.stats.rejected == 1 and s.stats.cancelled == 1


def _cut_after_stop(full: list[int], n_prompt: int, stops: list[tuple[int, ...]]) -> list[int]:
    """The oracle's rule for stop sequences: the continuation ends right after the first place where one of
    them has just been generated (matched within the continuation only)."""
    new = full[n_prompt:]
    for end in range(1, len(new) + 1):
        if any(end >= len(s) and tuple(new[end - len(s):end]) == s for s in stops):
            return full[: n_prompt + end]
    return full


def test_stop_sequences_end_a_row_like_hf_greedy_cut_there(engine, model):
    """Stop sequences taken from HF's own greedy continuation (a 2-token and a 1-token one, and one that never
    occurs): the engine and the scheduler end each row right after its first stop; a batch-mate without stop
    sequences is unaffected."""
    from lsgpt.engine.engine import SamplingParams
    from lsgpt.engine.scheduler import Scheduler

    p1, p2, n = [5, 17, 300], [42, 7, 7, 900], 24
    full1, full2 = tiny.hf_greedy(model, p1, n), tiny.hf_greedy(model, p2, n)
    new1 = full1[len(p1):]
    stops = [tuple(new1[9:11]), (new1[15],), (998, 997, 996)]
    want1 = _cut_after_stop(full1, len(p1), stops)
    assert len(p1) < len(want1) < len(full1)  # the stop really cuts this continuation short
    sp_stop = SamplingParams(max_new_tokens=n, top_k=1, ignore_eos=True, stop=tuple(stops))
    sp_plain = SamplingParams(max_new_tokens=n, top_k=1, ignore_eos=True)
    assert engine.generate([p1, p2], [sp_stop, sp_plain]) == [want1, full2]
    assert list(engine.stream(p1, sp_stop)) == want1[len(p1):]
    s = Scheduler(engine, max_rows=2, max_queue=4)
    try:
        assert s.generate(p1, sp_stop) == want1
        assert s.generate(p2, SamplingParams(max_new_tokens=n, top_k=1, ignore_eos=True, stop=((p2[-1],),))) == \
            _cut_after_stop(full2, len(p2), [(p2[-1],)])  # the prompt's own last token does not count
    finally:
        s.close()


@pytest.mark.parametrize("stop, word", [(((),), "1.."), (((5, 10**6),), "vocabulary"), (((5,),) * 17, "at most"),
                                        (((-3,),), "vocabulary")])
def test_bad_stop_sequences_are_refused(engine, stop, word):
    from lsgpt.engine.engine import RequestError, SamplingParams

    with pytest.raises(RequestError, match=word):
        engine.validate([[5, 6]], SamplingParams(stop=stop))


@pytest.mark.parametrize("prompt, kw, word", [
    ([], {}, "empty"), ([5] * 128, {}, "max_step"), ([5, 10**6], {}, "outside the vocabulary"),
    ([5, -1], {}, "outside the vocabulary"), ([5, 2.0], {}, "not an integer"), ("ab", {}, "sequence of token ids"),
    ([5], {"top_p": 0.0}, "top_p"), ([5], {"temperature": float("nan")}, "temperature"),
    ([5], {"stop": ((5, 10**6),)}, "vocabulary"), ([5], {"stop": (("x",),)}, "not an integer"),
])
def test_submit_validates_the_whole_request(engine, prompt, kw, word):
    """Scheduler.submit is the served model's one check of a request: a bad one raises RequestError, nothing
    is queued."""
    from lsgpt.engine.engine import RequestError, SamplingParams
    from lsgpt.engine.scheduler import Scheduler

    s = Scheduler(engine, max_rows=1, max_queue=4)
    try:
        with pytest.raises(RequestError, match=word):
            s.submit(prompt, SamplingParams(**kw), lambda ids, err: None)
        assert s.queued == 0 and s.stats.requests == 0
    finally:
        s.close()


def test_non_text_special_tokens_are_never_generated(tiny_models, tmp_path):
    """Issue 26: the tiny model continues the prompt "x" ([CLS] [UNK]) with [UNK] forever, which decodes to no text.
    The vocabulary's non-text special tokens ([PAD], [UNK], [CLS], [MASK]; not [SEP], the EOS) are never generated,
    greedy or sampled, through Engine and Scheduler alike; SamplingParams(suppress=()) allows them again."""
    from lsgpt.engine.engine import Engine, SamplingParams
    from lsgpt.engine.scheduler import Scheduler
    from lsgpt.text import encode_prompt, load_tokenizer

    tok = load_tokenizer(tiny_models.tokenizer)
    specials = {tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.mask_token_id}
    p = encode_prompt(tok, "x")
    eng = Engine.load(tiny_models.fp16, device="cpu")  # vocab.txt beside the file, as in a version folder
    assert set(eng.suppress) == specials and tok.sep_token_id not in eng.suppress
    allowed = eng.generate([p], SamplingParams(max_new_tokens=20, top_k=1, suppress=()))[0][len(p):]
    assert set(allowed) == {tok.unk_token_id}  # what the user saw
    sched = Scheduler(eng, max_rows=4)
    try:
        for sp in [SamplingParams(max_new_tokens=20, top_k=1), SamplingParams(max_new_tokens=20, ignore_eos=True),
                   *(SamplingParams(max_new_tokens=20, top_k=0, temperature=2.0, seed=s) for s in range(4))]:
            for new in (eng.generate([p], sp)[0][len(p):], sched.generate(p, sp)[len(p):]):
                assert new and not specials & set(new), (sp, new)
        assert sched.generate(p, SamplingParams(max_new_tokens=20, top_k=1, suppress=()))[len(p):] == allowed
    finally:
        sched.close()
    # no vocabulary known (a file without vocab.txt beside it, not the 21128-token vocabulary): nothing suppressed,
    # so the golden outputs of vocabulary-less tiny models stay as recorded
    shutil.copy(tiny_models.fp16, tmp_path / "m.hdf5")
    assert Engine.load(tmp_path / "m.hdf5", device="cpu").suppress == ()
    assert Engine.load(tmp_path / "m.hdf5", device="cpu", vocab=tok).suppress == eng.suppress


@pytest.mark.parametrize("budget,max_step,max_rows", [(2048, 500, 256), (2048, 1024, 3), (64, 256, 8), (1000, 1024, 32)])
def test_every_group_admission_forms_has_a_prefill_graph(budget, max_step, max_rows):
    """With prefill graphs (CUDA), a group of k whole prompts padded to t tokens runs the graph of its bucket
    (group_shape): every group _take can form (k <= MAX_GROUP and the rows, bucket within the budget) has a bucket
    among those captured at start-up (prefill_shapes), every single prompt up to the budget and max_step - 1 can
    be admitted alone, and a bucket holds its group (k' >= k, t' >= t) within the budget. The logic of the CUDA
    path, checked here on the CPU without a GPU (the GPU tests replay the graphs)."""
    import math
    from types import SimpleNamespace

    from lsgpt.engine.scheduler import MAX_GROUP, Scheduler

    s = SimpleNamespace(graphed_prefill=True, prefill_tokens=budget, max_rows=max_rows,
                        engine=SimpleNamespace(fused=SimpleNamespace(variant=lambda B, T, R, S=None: T), config=SimpleNamespace(max_step=max_step)))
    s.group_shape = lambda k, t: Scheduler.group_shape(s, k, t)
    groups, chunks = Scheduler.prefill_shapes(s)
    assert len(chunks) == (budget if budget < max_step - 1 else 0)  # (chunks: each length a variant here)
    assert len(groups) == len(set(groups)) <= 64
    captured = set(groups)
    longest = min(budget, max_step - 1)
    for t in range(1, longest + 1):
        assert math.prod(s.group_shape(1, t)) <= budget, t  # a prompt within the budget is admitted whole
        for k in range(1, min(MAX_GROUP, max_rows) + 1):
            K, T = s.group_shape(k, t)
            assert K >= k and T >= t
            if K * T <= budget:
                assert (K, T) in captured, (k, t)
    assert all(k * t <= budget and t <= longest for k, t in groups)
