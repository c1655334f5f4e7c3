"""The device-independent logic of the CUDA-only paths, run on the CPU (tests/test_gpu.py and
tests/test_engine_gpu.py run the real thing and skip without CUDA):

* the ``_int_mm`` backend of ``IntGemm`` (row padding to > 16, column-major weight) through a stand-in that
  enforces CUDA ``torch._int_mm``'s documented preconditions (rows > 16, K and N multiples of 8) and computes
  on the CPU; oracle: the exact int64 product, and the FBGEMM backend's logits (both exact integer sums);
* the decode step as a ``GraphedDecode`` (static input buffers, one max_step cache reused across calls, capture
  on zeros before prefill, the whole cache read under the mask, finished rows' clamped positions) with CUDA
  graph capture/replay emulated: replay re-runs the captured step on the same static tensors, and any host
  synchronisation during capture or replay raises, as it does on a capturing CUDA stream; ``compile=True``
  wraps that step in ``torch.compile`` (dynamo with the eager backend here: the tracing, not the codegen);
  oracle: the eager engine (no graph) on the same model, token for token;
* the fp16 residual stream the CUDA reference path uses (``GPT`` / ``QuantGPT`` with dtype float16): oracles HF
  fp32 and the fp64 int8 reference with fp16 storage (tests/oracles), as in tests/test_engine_gpu.py.

What stays GPU-only: the real cuBLASLt / CUDA-graph / inductor code generation, timing.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from oracles import reference_int8 as R
from oracles import tiny

torch = pytest.importorskip("torch")

NL, NH, V, MAX_STEP = 2, 4, 1000, 64
STEP = 16.0 / 127.0  # one int8 logit step at logits_clip 16
PROMPTS = [[5, 6, 7], [9] * 11, [100, 200]]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from tiny.one_torch_thread()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpu_logic")
    m = tiny.make_model(seed=11, wide=True)
    ls = R.hf_to_ls(tiny.state_dict_np(m), NL, MAX_STEP)
    rng = np.random.default_rng(11)
    clips = R.calibrate_clips(ls, [rng.integers(0, V, 48) for _ in range(3)], NH, NL, frac=0.9)
    fp = R.write_ls_fp16(d / "fp.hdf5", ls, n_layer=NL, n_head=NH, pad_id=tiny.PAD_ID, eos_id=tiny.EOS_ID)
    q = R.write_ls_int8(d / "q.hdf5", ls, clips, n_layer=NL, n_head=NH, pad_id=tiny.PAD_ID, eos_id=tiny.EOS_ID)
    return m, fp, q


# ------------------------------------------------------------------------------------------------------------
# torch._int_mm with CUDA's preconditions


def cuda_int_mm_standin(calls: list):
    real = torch._int_mm

    def int_mm(a, b):
        calls.append(tuple(a.shape))
        # aten/src/ATen/native/cuda/Blas.cpp (_int_mm_out_cuda): these are checked before cuBLASLt runs
        assert a.dtype == torch.int8 and b.dtype == torch.int8, (a.dtype, b.dtype)
        assert a.shape[0] > 16, f"_int_mm on CUDA needs more than 16 rows, got {a.shape[0]}"
        assert a.shape[1] % 8 == 0 and b.shape[1] % 8 == 0, f"K and N must be multiples of 8: {a.shape} {b.shape}"
        assert a.shape[1] == b.shape[0]
        return real(a, b)

    return int_mm


def to_int_mm_backend(g) -> None:
    """What IntGemm.__init__ does for a CUDA device: the int8 weight column-major, backend cuda_int_mm."""
    w = g.wf.to(torch.int8) if g.backend == "float" else None
    if w is None:  # fbgemm-packed: rebuild the int8 weight from its packed form
        w = torch.ops.quantized.linear_unpack(g.packed)[0].int_repr().t()
    g.backend = "cuda_int_mm"
    g.wt = g.w = w.t().contiguous().t()


@pytest.mark.parametrize("m", [1, 2, 15, 16, 17, 40])
def test_int_mm_backend_pads_small_batches_and_is_exact(monkeypatch, m):
    """The reference CUDA path's GEMM: IntGemm pads 16 rows or fewer (CUDA's _int_mm refuses them) and slices
    the answer back; the CPU's _int_mm takes any row count, hence the stand-in that enforces CUDA's rule."""
    from lsgpt.engine.int8 import IntGemm

    calls: list = []
    monkeypatch.setattr(torch, "_int_mm", cuda_int_mm_standin(calls))
    g = torch.Generator().manual_seed(m)
    w = torch.randint(-127, 128, (64, 24), generator=g, dtype=torch.int8)
    gemm = IntGemm(w, torch.device("cpu"))
    to_int_mm_backend(gemm)
    assert torch.equal(gemm.wt, w) and gemm.wt.stride() == (1, 64), "column-major [K, N]"
    a = torch.randint(-127, 128, (m, 64), generator=g).float()
    got = gemm(a)
    assert got.shape == (m, 24) and got.dtype == torch.float32
    assert torch.equal(got.double(), (a.double() @ w.double())), "exact int32 sums"
    assert len(calls) == 1 and calls[0][0] > 16


def test_int8_model_on_the_int_mm_backend_equals_fbgemm(monkeypatch, files):
    """Every GEMM of the int8 model through the _int_mm backend (prefill of 3x11 rows, decode of 3 rows) gives
    the FBGEMM backend's logits exactly, and greedy decoding the same tokens."""
    from lsgpt.engine.engine import Engine, SamplingParams

    ref = Engine.load(files[2], device="cpu")
    if ref.backend != "reference/fbgemm":
        pytest.skip(f"no FBGEMM here ({ref.backend})")
    toks = torch.as_tensor(np.random.default_rng(3).integers(1, 990, size=(3, 11)))
    want_logits = ref.logits(toks)
    sp = SamplingParams(max_new_tokens=12, top_k=1, ignore_eos=True)
    want = ref.generate(PROMPTS, sp)
    calls: list = []
    monkeypatch.setattr(torch, "_int_mm", cuda_int_mm_standin(calls))
    e = Engine.load(files[2], device="cpu")
    m = e.model
    for g in [m.lm_head] + [layer[k] for layer in m.layers for k in layer if hasattr(layer[k], "backend")]:
        to_int_mm_backend(g)
    assert e.backend == "reference/cuda_int_mm"
    assert torch.equal(e.logits(toks), want_logits)
    assert e.generate(PROMPTS, sp) == want
    assert {c[0] for c in calls} >= {32, 33}, "decode rows (3) padded to 32, prefill rows (33) as they are"


# ------------------------------------------------------------------------------------------------------------
# GraphedDecode with CUDA graph capture/replay emulated on the CPU


class _NoSync:
    """While the (emulated) stream captures or replays: host reads of tensor values raise, as on CUDA."""

    NAMES = ("item", "tolist", "numpy", "__int__", "__float__", "__bool__", "__index__")

    def __init__(self):
        self.saved = {n: getattr(torch.Tensor, n) for n in self.NAMES}

    def __enter__(self):
        def refuse(name):
            def f(*a, **k):
                raise RuntimeError(f"Tensor.{name}: host synchronisation while the stream is capturing")
            return f

        for n in self.NAMES:
            setattr(torch.Tensor, n, refuse(n))

    def __exit__(self, *exc):
        for n, f in self.saved.items():
            setattr(torch.Tensor, n, f)


class _FakeGraph:
    replay_fn = None
    replays = 0

    def replay(self):
        with _NoSync():
            type(self).replays += 1
            self.replay_fn()


@contextlib.contextmanager
def _capture(graph, **kw):
    with _NoSync():
        yield


@pytest.fixture
def emulated_graphs(monkeypatch):
    """torch.cuda's stream and graph API replaced by CPU stand-ins; GraphedDecode itself unchanged."""
    from lsgpt.engine import engine as eng

    class Stream:
        def __init__(self, device=None):
            pass

        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", _capture)
    captured: list = []
    init = eng.GraphedDecode.__init__

    def recording_init(self, step, cache, batch, device, compile=False):
        init(self, step, cache, batch, device, compile)
        graph = self.graph

        def replay():  # the captured kernels re-run on the same static tensors, output in place
            self.logits.copy_(self._step())

        graph.replay_fn = replay
        captured.append(self)

    monkeypatch.setattr(eng.GraphedDecode, "__init__", recording_init)
    _FakeGraph.replays = 0
    return captured


def _graphed(engine, compile: bool = False):
    from lsgpt.engine.engine import Engine

    g = Engine(engine.config, engine.model, engine.device, fused=False)
    g.cuda_graphs, g.compile = True, compile  # what Engine.__init__ sets on a CUDA device
    return g


@pytest.mark.parametrize("which", ["fp", "int8"])
def test_graphed_decode_equals_eager_decode(emulated_graphs, files, which):
    """Greedy and seeded sampling, unequal prompts, rows that hit max_step (clamped positions), the captured
    step reused by a second batch of the same size (its cache then holds the first batch's keys), a new capture
    for another batch size."""
    from lsgpt.engine.engine import Engine, SamplingParams

    eager = Engine.load(files[1 if which == "fp" else 2], device="cpu")
    graphed = _graphed(eager)
    greedy = SamplingParams(max_new_tokens=20, top_k=1, ignore_eos=True)
    sampled = [SamplingParams(max_new_tokens=20, temperature=1.3, top_k=0, seed=s, ignore_eos=True) for s in (1, 2, 3)]
    assert graphed.generate(PROMPTS, greedy) == eager.generate(PROMPTS, greedy)
    assert len(emulated_graphs) == 1 and emulated_graphs[0].cache.k[0].shape[1] == MAX_STEP
    assert _FakeGraph.replays >= 19, "the decode steps ran through the graph"
    assert graphed.generate(PROMPTS[::-1], sampled) == eager.generate(PROMPTS[::-1], sampled)
    assert len(emulated_graphs) == 1, "same batch size: the captured step is reused"
    long = [[7] * 50, [8] * 3, [9] * 40]  # row 0 and 2 reach max_step (64) while row 1 runs on
    to_end = SamplingParams(max_new_tokens=60, top_k=1, ignore_eos=True)
    assert graphed.generate(long, to_end) == eager.generate(long, to_end)
    assert graphed.generate(PROMPTS[:2], greedy) == eager.generate(PROMPTS[:2], greedy)
    assert len(emulated_graphs) == 2 and sorted(graphed._graphs) == [2, 3]


def test_compiled_graphed_decode_equals_eager(emulated_graphs, files, monkeypatch):
    """compile=True: the reference int8 step goes through torch.compile (dynamo, eager backend) inside the
    graph; the tokens equal the eager engine's."""
    from lsgpt.engine.engine import Engine, SamplingParams

    torch._dynamo.reset()
    real = torch.compile
    compiled = []

    def eager_backend_compile(fn, **kw):
        compiled.append(fn)
        return real(fn, backend="eager", **kw)

    monkeypatch.setattr(torch, "compile", eager_backend_compile)
    eager = Engine.load(files[2], device="cpu")
    graphed = _graphed(eager, compile=True)
    sp = SamplingParams(max_new_tokens=10, top_k=1, ignore_eos=True)
    try:
        assert graphed.generate(PROMPTS[:2], sp) == eager.generate(PROMPTS[:2], sp)
    finally:
        torch._dynamo.reset()
    assert compiled == [graphed._decode_fn], "the decode step, and only it, is compiled"


# ------------------------------------------------------------------------------------------------------------
# fp16 residual stream (what the CUDA reference path runs)


def test_fp16_model_matches_hf_within_fp16_rounding(files):
    from lsgpt.engine.engine import Engine
    from lsgpt.engine.model import GPT
    from lsgpt.format import read_hdf5

    hf, path, _ = files
    cfg, arrays = read_hdf5(path)
    e = Engine(cfg, GPT(cfg, arrays, torch.device("cpu"), torch.float16), torch.device("cpu"), fused=False)
    toks = np.random.default_rng(1).integers(1, 990, size=(2, 40))
    with torch.no_grad():
        ref = hf(torch.as_tensor(toks)).logits.double().numpy()
    got = e.logits(torch.as_tensor(toks)).double().numpy()
    f32 = Engine.load(path, device="cpu").logits(torch.as_tensor(toks)).double().numpy()
    err, err32 = np.abs(got - ref).max(), np.abs(f32 - ref).max()
    scale = max(1.0, float(np.abs(ref).max()))
    print(f"fp16 residual stream vs HF fp32: max |dlogit| {err:.3g} (fp32 engine {err32:.3g}), max |logit| {scale:.3g}")
    # measured: 2.8e-3 relative (fp32: 4e-7). This checks the fp16 dataflow (casts, fp16 KV cache, no overflow;
    # a 1/d attention scale or a cache read in the wrong dtype moves logits by units); op variants as small as erf
    # vs tanh GELU (2.5e-4 relative here) are pinned by the fp32 tests in tests/test_engine_fp16.py.
    assert err <= 1e-2 * scale
    assert err > 10 * err32, "test premise: this really ran in fp16"


def test_fp16_int8_model_matches_the_fp16_storage_reference(files):
    """The CUDA reference int8 path's dataflow (residual, V, attention in fp16) on the CPU, against the fp64
    reference with fp16 storage; the bound is the one tests/test_engine_gpu.py derives for the fused path."""
    from lsgpt.engine.engine import Engine
    from lsgpt.engine.int8 import QuantGPT
    from lsgpt.format import read_hdf5

    path = files[2]
    cfg, arrays = read_hdf5(path)
    e = Engine(cfg, QuantGPT(cfg, arrays, torch.device("cpu"), torch.float16), torch.device("cpu"), fused=False)
    eps = float(cfg.layer_norm_eps)
    ref, ref16 = R.Int8Model(*R.read_ls(path), eps=eps), R.Int8Model(*R.read_ls(path), eps=eps, fp16_storage=True)
    toks = np.random.default_rng(7).integers(1, 990, size=(2, 40))
    got = e.logits(torch.as_tensor(toks)).double().numpy()
    want = np.stack([ref.forward(t) for t in toks])
    w16 = np.stack([ref16.forward(t) for t in toks])

    def within2(x):
        return (np.abs(x - want) / STEP <= 2 + 1e-6).mean(), (x.argmax(-1) == want.argmax(-1)).mean()

    (g2, g1), (r2, r1) = within2(got), within2(w16)
    exact = (np.abs(got - want) / STEP < 1e-3).mean()
    print(f"cpu fp16 int8 vs fp64 reference: within 2 steps {g2:.4f}, top-1 {g1:.3f}, exact {exact:.4f}; "
          f"fp16-storage reference: {r2:.4f}, {r1:.3f}")
    assert np.abs(got / STEP - np.round(got / STEP)).max() < 1e-2, "logits on the 16/127 grid"
    # measured here: 0.965 / 0.913 vs the fp16-storage reference's 0.992 / 0.925 (CPU half kernels round at
    # other places than LightSeq's CUDA build: the gap the margin allows); truncating instead of rounding at the
    # quantization points gives 0.73 / 0.74, the fp32 path 1.0 (excluded by the premise below).
    assert g2 >= r2 - 0.06 and g1 >= r1 - 0.05
    assert exact < 1.0, "test premise: fp16 storage moved some values (else this is the fp32 path)"
