"""CUDA paths of the engine (skipped without a GPU): the fused fast path (default) and the reference path,
fp16 against HF transformers, int8 against the CPU's exact integer path (also on the article's 12-layer
shape), CUDA-graph decode against eager decode."""

from __future__ import annotations

import math
import time

import pytest
import torch

from lsgpt.contract import VOCAB_SIZE

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture(scope="module")
def peaky_model():
    """A random GPT-2 whose logits have clear margins (scaled embedding), so fp16 rounding rarely flips argmax."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=256, n_head=8, n_positions=256, vocab_size=4096)).eval()
    with torch.no_grad():
        m.transformer.wte.weight.mul_(8)
    return m


@pytest.fixture(scope="module")
def files(peaky_model, tmp_path_factory):
    from lsgpt.export.convert import (
        calibrate,
        export_model,
        float_arrays,
        gpt_config,
        load_checkpoint,
        quantize_arrays,
    )
    from lsgpt.format import write_hdf5

    d = tmp_path_factory.mktemp("gpu")
    fp = export_model(peaky_model, d / "fp.hdf5", max_step=256)
    config, sd, _ = load_checkpoint(peaky_model)
    cfg = gpt_config(config, 256, True)
    fa = float_arrays(cfg, sd)
    rows = torch.randint(0, 4096, (4, 64), generator=torch.Generator().manual_seed(1)).tolist()
    q = write_hdf5(d / "q.hdf5", cfg, quantize_arrays(cfg, fa, calibrate(cfg, fa, rows)))
    return fp, q


def test_fp16_matches_hf(peaky_model, files):
    from lsgpt.engine.engine import Engine, SamplingParams

    eng = Engine.load(files[0], "cuda")
    x = torch.randint(0, 4096, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = peaky_model(x).logits
    err = (eng.logits(x) - ref).abs().max().item()
    scale = ref.abs().max().item()
    print(f"fp16 CUDA max logit error {err:.4f} (logit range ±{scale:.1f})")
    assert err < 2e-3 * scale + 0.05
    assert eng.backend == "triton-fused"
    for prompt in (x[0, :6].tolist(), x[1, :3].tolist()):
        hf = peaky_model.generate(torch.tensor([prompt]), max_new_tokens=100, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0].tolist()
        ours = eng.generate([prompt], SamplingParams(max_new_tokens=100, top_k=1, ignore_eos=True))[0]
        agree = sum(a == b for a, b in zip(ours, hf))
        print(f"fp16 CUDA greedy: {agree}/{len(ours)} tokens equal HF fp32")
        assert ours == hf


def test_int8_cuda_matches_cpu_integer_path(files):
    from lsgpt.engine.engine import Engine

    cpu = Engine.load(files[1], "cpu")
    x = torch.randint(0, 4096, (3, 50), generator=torch.Generator().manual_seed(3))
    lc = cpu.logits(x)
    for fused in (True, False):
        gpu = Engine.load(files[1], "cuda", fused=fused)
        lg = gpu.logits(x)
        step = 16 / 127
        frac = ((lg - lc).abs() <= step + 1e-4).float().mean().item()
        print(f"int8 CUDA ({gpu.backend}) vs CPU: {frac:.4%} of logits within one quantization step; "
              f"max diff {(lg - lc).abs().max():.3f}")
        assert frac > (0.999 if fused else 0.99)


@pytest.mark.parametrize("which", [0, 1])
def test_cuda_graph_decode_equals_eager(files, which):
    from lsgpt.engine.engine import Engine, SamplingParams

    graphed = Engine.load(files[which], "cuda")
    eager = Engine(graphed.config, graphed.model, graphed.device, cuda_graphs=False)
    prompts = [[5, 6, 7], [9] * 11, [100, 200]]
    sp = SamplingParams(max_new_tokens=40, top_k=1, ignore_eos=True)
    a, b = graphed.generate(prompts, sp), eager.generate(prompts, sp)
    assert a == b
    # and again, reusing the captured graph for a new batch of the same size
    assert graphed.generate(prompts[::-1], sp) == eager.generate(prompts[::-1], sp)


def test_compiled_decode_equals_eager(files):
    from lsgpt.engine.engine import Engine, SamplingParams

    for path in files:
        compiled = Engine.load(path, "cuda", compile=True, fused=False)  # compile applies to the reference path
        eager = Engine(compiled.config, compiled.model, compiled.device, cuda_graphs=False)
        prompts = [[5, 6, 7], [9] * 11]
        sp = SamplingParams(max_new_tokens=30, top_k=1, ignore_eos=True)
        a, b = compiled.generate(prompts, sp), eager.generate(prompts, sp)
        agree = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb)) / sum(map(len, a))
        print(f"{path.name}: compiled vs eager token agreement {agree:.2%}")
        assert a[0][:15] == b[0][:15] and agree > 0.9  # fusion may reorder fp16 rounding


@pytest.fixture(scope="module")
def article_int8(tmp_path_factory):
    """The article's shape (12 layers, 768 hidden, vocab 21128), random weights with a scaled embedding so that
    logits have real margins, int8 by calibration; engines on the CPU (exact integer path) and on CUDA (fused)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lsgpt.engine.engine import Engine
    from lsgpt.export.convert import calibrate, float_arrays, gpt_config, load_checkpoint, quantize_arrays
    from lsgpt.format import write_hdf5

    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=512, vocab_size=VOCAB_SIZE)).eval()
    with torch.no_grad():
        m.transformer.wte.weight.mul_(4)
    config, sd, _ = load_checkpoint(m)
    cfg = gpt_config(config, 256, True)
    fa = float_arrays(cfg, sd)
    rows = torch.randint(0, VOCAB_SIZE, (4, 128), generator=torch.Generator().manual_seed(1)).tolist()
    q = write_hdf5(tmp_path_factory.mktemp("a12") / "q.hdf5", cfg, quantize_arrays(cfg, fa, calibrate(cfg, fa, rows)))
    return Engine.load(q, "cpu"), Engine.load(q, "cuda")


def test_article_shape_int8_cuda_within_one_step_of_cpu(article_int8):
    cpu, gpu = article_int8
    assert gpu.backend == "triton-fused"
    x = torch.randint(1, VOCAB_SIZE, (2, 120), generator=torch.Generator().manual_seed(5))
    lc, lg = cpu.logits(x), gpu.logits(x)
    d = (lg - lc).abs()
    within = (d <= 16 / 127 + 1e-4).float().mean().item()
    top1 = (lg.argmax(-1) == lc.argmax(-1)).float().mean().item()
    print(f"12-layer int8, CUDA fused vs CPU integer path: {within:.4%} of logits within one step "
          f"({(d < 1e-4).float().mean().item():.4%} equal), teacher-forced argmax agreement {top1:.2%}")
    # A random 12-layer net is chaotic: one float rounding that moves a value across an int8 step in an early
    # layer moves many logits by a step at the end (measured on an H100: about 91% within one step, 43% equal).
    # The 99.9% bar is held on the 4-layer model above; here the bar is greedy agreement (>= 99%).
    assert within >= 0.85
    assert top1 >= 0.99


def test_article_shape_int8_greedy_tracks_cpu(article_int8):
    """Greedy tokens generated on CUDA, checked step by step against the CPU integer path (teacher forced)."""
    from lsgpt.engine.engine import SamplingParams

    cpu, gpu = article_int8
    prompts = [[101, 2769, 1962], [101, 791, 1921, 2523, 2458, 2552]]
    outs = gpu.generate(prompts, SamplingParams(max_new_tokens=100, top_k=1, ignore_eos=True))
    total = same = 0
    for p, out in zip(prompts, outs):
        lc = cpu.logits(torch.tensor([out]))[0]
        for j in range(len(p), len(out)):
            total += 1
            same += int(lc[j - 1].argmax()) == out[j] or bool(lc[j - 1, out[j]] >= lc[j - 1].max())  # ties count
    print(f"12-layer int8 greedy on CUDA: {same}/{total} steps are the CPU integer path's argmax")
    assert same / total >= 0.99


@pytest.mark.parametrize("graphs", ["1", "0"], ids=["prefill-graphs", "eager-prefill"])
@pytest.mark.parametrize("budget", [None, 64], ids=["default-budget", "chunking-budget"])
@pytest.mark.parametrize("which", [0, 1])
def test_scheduler_warm_up_leaves_no_prefill_shape_to_compile(files, which, budget, graphs, monkeypatch):
    """After the served model's warm-up, a prefill of any group size and prompt length under the prefill budget,
    and (budget 64 < max_step) a chunk of any length at any position into a slot's row of the running cache,
    compiles no kernel: a Triton compile mid-serving stalls every running row (seen on the H100: p95 latency
    0.31 -> 0.83 s on a cold kernel cache). Counts the compiled variants of every fused kernel before and after
    all the shapes; groups go through the scheduler's own prefill (a captured graph of the group's bucket, or
    the eager forward)."""
    from lsgpt.engine import kernels
    from lsgpt.engine.engine import Engine
    from lsgpt.engine.scheduler import Request, SamplingParams, Scheduler

    monkeypatch.setenv("LSGPT_PREFILL_GRAPHS", graphs)
    e = Engine.load(files[which], "cuda")
    sched = Scheduler(e, max_rows=4, prefill_tokens=budget)
    assert sched.graphed_prefill == (graphs == "1")
    sched.close()  # its loop stopped: the test drives the prefill itself
    jits = [kernels._linear_kernel, kernels._attention_kernel, kernels._layer_norm_kernel, kernels._embed_kernel]
    dev = torch.cuda.current_device()

    def compiled() -> int:
        return sum(len(j.device_caches[dev][0]) for j in jits)

    before = compiled()
    S, B = e.config.max_step, sched.prefill_tokens
    sp = SamplingParams(max_new_tokens=1, top_k=1, seed=0)
    with torch.inference_mode():
        for k in range(1, 5):
            for t in range(1, min(S - 1, B) + 1):
                if math.prod(sched.group_shape(k, t)) > B:
                    continue  # admission never forms this group (_take)
                group = [Request(torch.randint(1, e.config.vocab, (t,)).tolist(), sp, lambda *a: None)
                         for _ in range(k)]
                for slot, r in enumerate(group):
                    r.slot = slot
                sched._prefill(group)
        for t in range(1, B + 1) if B < S - 1 else ():
            for start in (0, S - 1 - t):
                sched._chunk_forward(torch.randint(0, e.config.vocab, (1, t), device="cuda"), start, 3)
    torch.cuda.synchronize()
    assert compiled() == before, f"{compiled() - before} kernel variants compiled after the warm-up"


@pytest.mark.parametrize("which", [0, 1])
def test_scheduler_prefill_graphs_generate_what_eager_prefill_and_alone_do(files, which, monkeypatch):
    """Groups of whole prompts through the captured prefill graphs (a group padded up to its bucket, spare rows
    into the sink row) generate what the eager prefill generates and what each prompt generates alone
    (Engine.generate), greedy on the peaky model, while other rows run: prompts of 3..70 tokens arriving
    together (groups of 1..8 prompts, so buckets with spare rows) and a second wave joining running rows."""
    from lsgpt.engine.engine import Engine, SamplingParams
    from lsgpt.engine.scheduler import Scheduler

    e = Engine.load(files[which], "cuda")
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(1, e.config.vocab, (n,), generator=g).tolist() for n in (3, 17, 70, 5, 33, 9, 64, 12, 40)]
    sp = SamplingParams(max_new_tokens=24, top_k=1, ignore_eos=True)
    alone = [e.generate([p], sp)[0] for p in prompts]

    def served(graphs: str) -> tuple[list, Scheduler]:
        monkeypatch.setenv("LSGPT_PREFILL_GRAPHS", graphs)
        s = Scheduler(e, max_rows=8)
        assert s.graphed_prefill == (graphs == "1")
        got: dict = {}
        try:
            for i, p in enumerate(prompts[:5]):
                s.submit(p, sp, lambda ids, err, i=i: got.__setitem__(i, (ids, err)))
            time.sleep(0.05)  # the second wave joins rows already decoding
            for i, p in enumerate(prompts[5:], 5):
                s.submit(p, sp, lambda ids, err, i=i: got.__setitem__(i, (ids, err)))
            for _ in range(600):
                if len(got) == len(prompts):
                    break
                time.sleep(0.1)
            return [got.get(i) for i in range(len(prompts))], s
        finally:
            s.close()

    graphed, s = served("1")
    assert s.prefill_graphs and s.stats.prefills < len(prompts)  # some prompts were prefilled together
    assert graphed == [(a, None) for a in alone]
    eager, _ = served("0")
    assert eager == graphed


@pytest.mark.parametrize("which", [0, 1])
def test_scheduler_chunked_prefill_on_cuda_generates_what_whole_does(files, which):
    """The fused kernels' chunk path (a slot's row of the running cache at offset positions, the captured decode
    steps computing that slot as a free one between chunks): a 200-token prompt prefilled in chunks of 16 while
    two rows run generates what the same scheduler code generates with the prompt whole, and so do the running
    rows (greedy on the peaky model, whose argmax margins fp16 rounding rarely crosses)."""
    from lsgpt.engine.engine import Engine, SamplingParams
    from lsgpt.engine.scheduler import Scheduler

    e = Engine.load(files[which], "cuda")
    g = torch.Generator().manual_seed(5)
    long = torch.randint(1, e.config.vocab, (200,), generator=g).tolist()
    short = [torch.randint(1, e.config.vocab, (6,), generator=g).tolist() for _ in range(2)]
    sp = SamplingParams(max_new_tokens=40, top_k=1, ignore_eos=True)
    whole = Scheduler(e, max_rows=4)
    try:
        want = [whole.generate(p, sp, timeout=120) for p in [long, *short]]
    finally:
        whole.close()
    s = Scheduler(e, max_rows=4, prefill_tokens=16)
    try:
        got: dict = {}
        for i, p in enumerate(short):
            s.submit(p, sp, lambda ids, err, i=i: got.__setitem__(i, (ids, err)))
        assert s.generate(long, sp, timeout=120) == want[0]
        for _ in range(600):
            if len(got) == 2:
                break
            time.sleep(0.1)
        assert [got[i] for i in range(2)] == [(want[1], None), (want[2], None)]
        assert s.stats.chunks == 13
    finally:
        s.close()
