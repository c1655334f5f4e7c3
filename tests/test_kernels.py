"""Every fused Triton kernel (lsgpt/engine/kernels.py) against a plain float64 reference written from the
formulas of docs/format.md §5.2, over shapes that are not multiples of the tiles. On the GPU: real kernels,
batch 1..256. Without a GPU: the same kernels in the Triton interpreter (TRITON_INTERPRET=1, numpy on the
CPU), smaller shapes.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first @triton.jit of lsgpt.engine.kernels
pytest.importorskip("triton")
from lsgpt.engine import kernels as K  # noqa: E402
from lsgpt.engine.fused import FUSED_LN_MAX_ROWS  # noqa: E402

DEV = torch.device("cuda" if CUDA else "cpu")
ROWS = [1, 2, 7, 16, 17, 33, 64, 100, 256] if CUDA else [1, 5, 17, 33]
KDIM, NDIM = (200, 216) if CUDA else (72, 48)  # K and N off the 64/128 tiles; N = 3·H for the QKV scatter


def q8(x: torch.Tensor) -> torch.Tensor:
    """docs/format.md §5.2: float2int8 of an already scaled value, in float64."""
    return torch.floor(x.double() + 0.5).clamp(-127, 127)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def layer_norm(x, g, b, eps):
    x = x.double()
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * g.double() + b.double()


def rand_i8(*shape, gen):
    return torch.randint(-127, 128, shape, generator=gen, dtype=torch.int8)


def k_contiguous(w: torch.Tensor) -> torch.Tensor:
    """[K, N] with K contiguous: the int8 layout the engine keeps (IntGemm.w)."""
    return w.t().contiguous().t()


def agree(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    d = (got.double().cpu() - want.double().cpu()).abs()
    return float((d == 0).double().mean()), float(d.max())


@pytest.mark.parametrize("M", ROWS)
def test_int8_linear_ln_requant_bias_gelu_quant(M):
    """FFN1 shape: LN(x) q8 -> int8 GEMM -> requant(alpha) -> dequant + bias -> GELU -> q8."""
    g = torch.Generator().manual_seed(M)
    x = (torch.randn(M, KDIM, generator=g) * 3 + 0.5).half()
    ln_w, ln_b = torch.rand(KDIM, generator=g).half() + 0.5, (torch.randn(KDIM, generator=g) * 0.1).half()
    w = rand_i8(KDIM, NDIM, gen=g)
    bias = (torch.randn(NDIM, generator=g) * 0.3).half()
    c_ln, c_w, c_out, c_act = 4.0, 1.0, 30.0, 6.0
    alpha, deq, in_s, out_s = c_w * c_ln / (c_out * 127), c_out / 127, 127 / c_ln, 127 / c_act
    got = K.linear(x.to(DEV), k_contiguous(w).to(DEV), torch.full((M, NDIM), -99, dtype=torch.int8, device=DEV),
                   ln=(ln_w.to(DEV), ln_b.to(DEV), 1e-5), in_scale=in_s, alpha=alpha, deq_scale=deq,
                   bias=bias.to(DEV), gelu=True, out_scale=out_s)
    a = q8(layer_norm(x, ln_w, ln_b, 1e-5) * in_s)
    acc = a @ w.double()
    want = q8(gelu_tanh(q8(acc * alpha) * deq + bias.double()) * out_s)
    exact, worst = agree(got, want)
    print(f"M={M}: int8 LN+GEMM+GELU exact {exact:.5f}, max diff {worst}")
    # fp32 vs fp64 only moves values sitting on a rounding boundary: one LN-output flip moves an output by at
    # most one step; one requantization flip (acc·alpha on a .5) moves it by deq·out_s·max GELU' (< 1.13) steps
    assert exact >= 0.995 and worst <= math.ceil(deq * out_s * 1.13) + 1


@pytest.mark.parametrize("M", ROWS)
def test_int8_linear_int32_dequant_residual(M):
    """FFN2 shape: int8 x int8 -> int32 sums dequantized (no requant) + bias + fp16 residual, in place."""
    g = torch.Generator().manual_seed(100 + M)
    a, w = rand_i8(M, NDIM, gen=g), rand_i8(NDIM, KDIM, gen=g)
    res = torch.randn(M, KDIM, generator=g).half()
    bias = torch.randn(KDIM, generator=g).half()
    deq = 1.0 * 6.0 / 127**2
    out = res.clone().to(DEV)
    K.linear(a.to(DEV), k_contiguous(w).to(DEV), out, deq_scale=deq, bias=bias.to(DEV), residual=out)
    want = res.double() + (a.double() @ w.double()) * deq + bias.double()
    err = float((out.double().cpu() - want).abs().max())
    print(f"M={M}: FFN2 residual max err {err:.2e}")
    assert err <= 2e-3 * float(want.abs().max())  # one fp16 rounding of the sum


@pytest.mark.parametrize("M", ROWS)
def test_int8_qkv_scatter_into_cache(M):
    """QKV shape: q -> out, k and v -> the int8 cache at each row's own position (rows = B sequences x T)."""
    g = torch.Generator().manual_seed(200 + M)
    H = NDIM // 3
    T = 1 if M < 4 else 2 if M % 2 == 0 else 1
    B, S = M // T, 40
    a, w = rand_i8(M, KDIM, gen=g), rand_i8(KDIM, NDIM, gen=g)
    bias = torch.randn(NDIM, generator=g).half()
    pos = torch.randint(0, S, (M,), generator=g)
    kc = torch.full((B, S, H), 55, dtype=torch.int8)
    vc = kc.clone()
    kd, vd = kc.to(DEV), vc.to(DEV)
    alpha, deq, out_s = 1.0 * 16 / (60.0 * 127), 60.0 / 127, 127 / 20.0
    q = K.linear(a.to(DEV), k_contiguous(w).to(DEV), torch.empty(M, H, dtype=torch.int8, device=DEV), alpha=alpha,
                 deq_scale=deq, bias=bias.to(DEV), out_scale=out_s, kv=(kd, vd, pos.to(DEV), T))
    want = q8((q8((a.double() @ w.double()) * alpha) * deq + bias.double()) * out_s)
    assert agree(q, want[:, :H])[1] <= 1
    for m in range(M):  # rows of one sequence have distinct positions here only by chance: check the last writer
        b, p = m // T, int(pos[m])
        writers = [r for r in range(M) if r // T == b and int(pos[r]) == p]
        if writers[-1] == m and len(writers) == 1:
            assert (kd[b, p].cpu().double() - want[m, H : 2 * H]).abs().max() <= 1
            assert (vd[b, p].cpu().double() - want[m, 2 * H :]).abs().max() <= 1
    untouched = torch.ones(B, S, dtype=torch.bool)
    for m in range(M):
        untouched[m // T, int(pos[m])] = False
    assert (kd.cpu()[untouched] == 55).all() and (vd.cpu()[untouched] == 55).all()


@pytest.mark.parametrize("M", ROWS)
def test_fp16_linear_ln_bias_gelu_and_lm_head(M):
    g = torch.Generator().manual_seed(300 + M)
    x = torch.randn(M, KDIM, generator=g).half()
    ln_w, ln_b = torch.rand(KDIM, generator=g).half() + 0.5, torch.randn(KDIM, generator=g).half() * 0.1
    w = (torch.randn(KDIM, NDIM, generator=g) * 0.05).half()
    bias = torch.randn(NDIM, generator=g).half() * 0.1
    got = K.linear(x.to(DEV), w.to(DEV), torch.empty(M, NDIM, dtype=torch.float16, device=DEV),
                   ln=(ln_w.to(DEV), ln_b.to(DEV), 1e-5), bias=bias.to(DEV), gelu=True)
    want = gelu_tanh(layer_norm(x, ln_w, ln_b, 1e-5) @ w.double() + bias.double())
    err = float((got.double().cpu() - want).abs().max())
    assert err <= 1e-2 * float(want.abs().max()), err
    # tied LM head: W = embedding.T, a strided view (K contiguous), fp32 logits
    emb = (torch.randn(NDIM + 13, KDIM, generator=g) * 0.05).half()
    lg = K.linear(x.to(DEV), emb.to(DEV).t(), torch.empty(M, NDIM + 13, device=DEV), ln=(ln_w.to(DEV), ln_b.to(DEV), 1e-5))
    want = layer_norm(x, ln_w, ln_b, 1e-5) @ emb.double().t()
    assert float((lg.double().cpu() - want).abs().max()) <= 1e-2 * float(want.abs().max())


def attention_reference(q, kc, vc, pos, T, n_head, score_scale, v_scale):
    M, H = q.shape
    hd = H // n_head
    out = torch.zeros(M, H, dtype=torch.float64)
    for m in range(M):
        b, p = m // T, int(pos[m])
        for h in range(n_head):
            sl = slice(h * hd, (h + 1) * hd)
            s = (kc[b, : p + 1, sl].double() @ q[m, sl].double()) * score_scale
            out[m, sl] = torch.softmax(s, 0) @ vc[b, : p + 1, sl].double() * v_scale
    return out


# (splits over the sequence, BLOCK_S, warps): None (the rule or the shipped table), and the table's kinds
@pytest.mark.parametrize("config", [None, (1, 32, 4), (4, 64, 2), (1, 128, 4), (2, 32, 2)])
@pytest.mark.parametrize("M", ROWS)
def test_int8_attention(M, config):
    g = torch.Generator().manual_seed(400 + M)
    n_head, hd, S = 3, 24, 300 if CUDA else 70  # head_dim not a power of two; S spans several key blocks
    H, T = n_head * hd, 1
    q, kc, vc = rand_i8(M, H, gen=g), rand_i8(M, S, H, gen=g), rand_i8(M, S, H, gen=g)
    pos = torch.randint(0, S, (M,), generator=g)
    pos[0] = S - 1
    s = 3.0 / 127
    score, vs, out_s = s * s / math.sqrt(hd), s, 127 / 1.5
    want = q8(attention_reference(q, kc, vc, pos, T, n_head, score, vs) * out_s)
    sem = torch.zeros(M * n_head + 5, dtype=torch.int32, device=DEV)  # the split programs' counters, reused
    for call in range(2):  # a second call over the same counters (a replayed CUDA graph does this every step)
        got = K.attention(q.to(DEV), kc.to(DEV), vc.to(DEV), pos.to(DEV), T, n_head,
                          torch.empty(M, H, dtype=torch.int8, device=DEV), score_scale=score, v_scale=vs,
                          out_scale=out_s, config=config, sem=sem)
        exact, worst = agree(got, want)
        print(f"M={M} call {call}: int8 attention exact {exact:.5f}, max diff {worst}")
        assert worst <= 1 and exact >= 0.99
        assert (sem.cpu() == 0).all()  # every split's count put back


@pytest.mark.parametrize("M", ROWS)
def test_fp16_attention_prefill_rows(M):
    """Several query rows per sequence (prefill): row m of sequence m // T sees keys 0..pos[m]."""
    g = torch.Generator().manual_seed(500 + M)
    n_head, hd, S = 2, 64, 150 if CUDA else 70
    T = 1 if M < 4 else M // 4 if M % 4 == 0 else 1
    B, H = M // T, n_head * hd
    q = torch.randn(M, H, generator=g).half()
    kc, vc = torch.randn(B, S, H, generator=g).half(), torch.randn(B, S, H, generator=g).half()
    pos = torch.randint(0, S, (M,), generator=g)
    got = K.attention(q.to(DEV), kc.to(DEV), vc.to(DEV), pos.to(DEV), T, n_head,
                      torch.empty(M, H, dtype=torch.float16, device=DEV), score_scale=1 / math.sqrt(hd))
    want = attention_reference(q, kc, vc, pos, T, n_head, 1 / math.sqrt(hd), 1.0)
    assert float((got.double().cpu() - want).abs().max()) < 5e-3


@pytest.mark.parametrize("M", [1, 33])
def test_embed_int8_and_pad(M):
    g = torch.Generator().manual_seed(600 + M)
    V, H, P, pad = 50, 72, 20, 0
    wte, wpe = rand_i8(V, H, gen=g), torch.randn(P, H, generator=g).half()
    tok, pos = torch.randint(0, V, (M,), generator=g), torch.randint(0, P, (M,), generator=g)
    tok[0] = pad
    got = K.embed(tok.to(DEV), pos.to(DEV), wte.to(DEV), wpe.to(DEV), torch.empty(M, H, dtype=torch.float16, device=DEV),
                  pad, 0.5 / 127)
    want = wte[tok].double() * (0.5 / 127) + wpe[pos].double()
    want[tok == pad] = 0
    assert float((got.double().cpu() - want).abs().max()) < 5e-3


def test_engine_checks_the_kernels_at_load_and_falls_back(tmp_path, monkeypatch):
    """Engine.load runs a 4+1-token self-check (a prefill, a decode step) of the fused path against the reference path; if the kernels
    cannot run (no writable Triton cache, an unsupported GPU) the engine warns and serves with the reference
    path, unless fused=True was asked for explicitly."""
    import warnings

    from lsgpt.engine.engine import Engine, SamplingParams
    from lsgpt.export.convert import export_model
    from oracles import tiny

    model = tiny.make_model(seed=2)
    path = export_model(model, tmp_path / "m.hdf5", max_step=32, eos_id=tiny.EOS_ID)
    e = Engine.load(path, DEV, fused=True)
    assert e.backend == "triton-fused"

    def broken(*a, **k):
        raise RuntimeError("no Triton cache")

    monkeypatch.setattr(K, "linear", broken)
    monkeypatch.setattr("lsgpt.engine.fused.available", lambda device: True)
    monkeypatch.setattr("lsgpt.engine.engine.fused_available", lambda device: True)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        e = Engine.load(path, DEV)
    assert e.fused is None and any("reference path" in str(x.message) for x in w)
    assert len(e.generate([[5, 6, 7]], SamplingParams(max_new_tokens=3, top_k=1))[0]) == 6
    with pytest.raises(RuntimeError, match="Triton cache"):
        Engine.load(path, DEV, fused=True)


def test_a_failing_variant_costs_only_itself(tmp_path, monkeypatch):
    """The opt-in variants are checked at load with the rest (a prefill, then a decode step: the attention block
    runs in decode only); one that fails leaves the fused path without the variants, with a warning naming them,
    not the reference path (session 16: they did not compile on the H100, and the engine fell back all the way)."""
    import warnings

    from lsgpt.engine.engine import Engine
    from lsgpt.export.convert import calibrate, float_arrays, gpt_config, load_checkpoint, quantize_arrays
    from lsgpt.format import write_hdf5
    from oracles import tiny

    config, sd, _ = load_checkpoint(tiny.make_model(seed=4, wide=True, n_head=2))  # head size 32
    cfg = gpt_config(config, 48, True)
    fa = float_arrays(cfg, sd)
    path = write_hdf5(tmp_path / "m.hdf5", cfg, quantize_arrays(cfg, fa, calibrate(cfg, fa, [[5, 6, 7, 8, 300]])))
    for name in ("LSGPT_FUSED_LN", "LSGPT_FUSED_FFN", "LSGPT_FUSED_ATTN"):
        monkeypatch.setenv(name, "1")
    calls = []

    def broken(*a, **k):
        calls.append(1)
        raise RuntimeError("does not compile")

    monkeypatch.setattr(K, "attention_block", broken)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        e = Engine.load(path, DEV, fused=True)
    assert calls, "the load check never ran a decode step"
    assert e.backend == "triton-fused" and e.fused.variants == []
    assert any("LSGPT_FUSED_ATTN" in str(x.message) and "does not compile" in str(x.message) for x in w)


@pytest.mark.parametrize("steps, ok", [(1.0, True), (2.84, True), (6.0, True), (20.0, False)])
def test_int8_load_check_passes_rounding_and_refuses_gross_disagreement(tmp_path, monkeypatch, steps, ok):
    """The int8 self-check compares mean |fused - reference| in steps of the logits clip: rounding-level
    differences pass (the article's model after 600 fp16 + 200 QAT steps, H100: 2.84 steps — the old limit of one
    step sent it to the slow reference path), garbage from kernels that do not work fails."""
    from lsgpt.engine.engine import Engine
    from lsgpt.engine.fused import FusedForward
    from lsgpt.export.convert import calibrate, float_arrays, gpt_config, load_checkpoint, quantize_arrays
    from lsgpt.format import write_hdf5
    from oracles import tiny

    config, sd, _ = load_checkpoint(tiny.make_model(seed=3))
    cfg = gpt_config(config, 32, True)
    fa = float_arrays(cfg, sd)
    path = write_hdf5(tmp_path / "q.hdf5", cfg, quantize_arrays(cfg, fa, calibrate(cfg, fa, [[5, 6, 7, 8, 9]])))
    e = Engine.load(path, DEV, fused=False)
    ff = FusedForward(e.model)
    step = e.model.logits_clip / 127
    monkeypatch.setattr(FusedForward, "__call__",
                        lambda self, t, p, c, last=None: e._reference_logits(t, p, c, last) + steps * step)
    if ok:
        ff.check_against(e._reference_logits)
    else:
        with pytest.raises(RuntimeError, match="disagree.*20.00 steps"):
            ff.check_against(e._reference_logits)


def test_attention_table_from_a_sweep_sets_decode_attention(tmp_path, monkeypatch):
    """LSGPT_ATTENTION_TABLE=<attention_sweep.json> (its "table": per dtype, the largest row count an entry serves
    -> keys per split program, BLOCK_S, warps): decode rows take the smallest entry that covers them, SPLITS the
    power of two that covers the cache with that many keys each; rows past the table (prefill) keep the rule.
    An entry of None keeps the rule for its rows. The attention itself with such settings is checked by
    test_int8_attention's configs and, for the shipped table, its default ones."""
    import json

    table = {"table": {"int8": {"8": [128, 32, 2], "64": [512, 64, 8], "128": None}, "fp16": {"1": [64, 64, 4]}}}
    (tmp_path / "sweep.json").write_text(json.dumps(table))
    monkeypatch.setenv("LSGPT_ATTENTION_TABLE", str(tmp_path / "sweep.json"))
    K._attention_table.cache_clear()
    K._attention_config.cache_clear()
    try:
        cfg = K._attention_config
        assert cfg(1, 12, 512, True) == (4, 32, 2)      # 512 keys / 128 per split
        assert cfg(8, 12, 1024, True) == (8, 32, 2)     # a longer cache: more splits, same keys each
        assert cfg(8, 12, 100, True) == (1, 32, 2)      # a short one: one program covers it
        assert cfg(9, 12, 512, True) == (1, 64, 8)      # the 64-row entry
        assert cfg(1, 12, 512, False) == (8, 64, 4)
        # past the table: the rule (rows x heads x splits >= 2 x 132 SMs, splits x 64 < cache, splits <= 16)
        assert cfg(65, 12, 512, True) == (1, 64, 4)  # an entry of None: the rule
        assert cfg(300, 12, 512, True) == (1, 64, 4)
        assert cfg(2, 12, 512, False) == (8, 64, 4) and cfg(2, 12, 128, False) == (2, 64, 4)
        (tmp_path / "sweep.json").write_text("{}")
        monkeypatch.setenv("LSGPT_ATTENTION_TABLE", str(tmp_path / "sweep.json"))
        K._attention_table.cache_clear()
        K._attention_config.cache_clear()
        with pytest.raises(RuntimeError, match="not an attention_sweep.json with a 'table'"):
            cfg(3, 12, 512, True)
    finally:
        monkeypatch.delenv("LSGPT_ATTENTION_TABLE")
        K._attention_table.cache_clear()
        K._attention_config.cache_clear()


def test_gemm_table_from_a_sweep_sets_the_tiles_and_large_tiles_compute_the_same(tmp_path, monkeypatch):
    """LSGPT_GEMM_TABLE=<gemm_sweep.json> (its "table": per dtype, the largest row count an entry serves ->
    {"KxN": tiles}): a product takes the entry of the smallest row count that covers it, for its own shape; other
    shapes, other dtypes and rows past the table keep the rule. The large tiles such a table holds (BLOCK_M 128,
    8 warps) give the float64 reference's FFN2 product, masked past M and N."""
    import json

    big = [128, 64, 64, 8, 3]
    table = {"table": {"int8": {"64": {f"{NDIM}x{KDIM}": [64, 32, 128, 4, 3]}, "256": {f"{NDIM}x{KDIM}": big}}}}
    (tmp_path / "sweep.json").write_text(json.dumps(table))

    def clear() -> None:  # the table and the tiles are cached per process
        K._gemm_table.cache_clear()
        K._config.cache_clear()

    monkeypatch.setenv("LSGPT_GEMM_TABLE", str(tmp_path / "sweep.json"))
    clear()
    try:
        plan = lambda M, N, Kd, int8=True: K.gemm_plan(M, N, Kd, int8)[0]  # noqa: E731
        assert plan(33, KDIM, NDIM) == (64, 32, 128, 4, 3)
        assert plan(65, KDIM, NDIM) == tuple(big) and plan(256, KDIM, NDIM) == tuple(big)
        monkeypatch.delenv("LSGPT_GEMM_TABLE")
        clear()
        rule = {M: plan(M, KDIM, NDIM) for M in (33, 257)}
        monkeypatch.setenv("LSGPT_GEMM_TABLE", str(tmp_path / "sweep.json"))
        clear()
        assert plan(257, KDIM, NDIM) == rule[257]  # past the table
        assert plan(33, NDIM, KDIM) == K._config(33, NDIM, KDIM, True) != (64, 32, 128, 4, 3)  # another shape
        assert plan(33, KDIM, NDIM, False) == K._config(33, KDIM, NDIM, False)  # fp16 has no entry
        M = 130 if CUDA else 70  # the 256-row entry: tiles of 128 x 64, 8 warps
        g = torch.Generator().manual_seed(7)
        a, w = rand_i8(M, NDIM, gen=g), rand_i8(NDIM, KDIM, gen=g)
        deq = 6.0 / 127**2
        out = torch.zeros(M, KDIM, dtype=torch.float32, device=DEV)
        K.linear(a.to(DEV), k_contiguous(w).to(DEV), out, deq_scale=deq, residual=out)
        want = (a.double() @ w.double()) * deq
        assert float((out.double().cpu() - want).abs().max()) <= 1e-5 * float(want.abs().max())
        (tmp_path / "sweep.json").write_text('{"table": {"int8": {"8": [1, 2]}}}')
        clear()
        with pytest.raises(RuntimeError, match="not a gemm_sweep.json with a 'table'"):
            plan(3, KDIM, NDIM)
    finally:
        monkeypatch.delenv("LSGPT_GEMM_TABLE", raising=False)
        clear()


HDIM = 208 if CUDA else 80  # a residual width that is a multiple of STAT_CHUNK (16) and of no tile


def chunk_stats(x: torch.Tensor) -> torch.Tensor:
    """[2, M, H // 16] per 16 columns: the sum and the squares about the chunk's mean, float64."""
    c = x.double().cpu().reshape(x.shape[0], -1, K.STAT_CHUNK)
    return torch.stack([c.sum(-1), ((c - c.mean(-1, keepdim=True)) ** 2).sum(-1)])


@pytest.mark.parametrize("M", ROWS)
def test_layer_norm_partials_from_the_producer_and_the_layer_norm_in_the_consumer(M):
    """ln_stats / stats_out: the residual GEMM and the embedding leave each row's LayerNorm partials; the next
    GEMM normalizes from them in its loads. Against float64 formulas, and up to FUSED_LN_MAX_ROWS rows (one row
    tile) a row's outputs do not depend on the rows beside it (the partials are fixed column chunks)."""
    g = torch.Generator().manual_seed(500 + M)
    # producer: FFN2's shape (int32 sums dequantized, + bias, + the residual, in place)
    h = rand_i8(M, KDIM, gen=g)
    w2 = rand_i8(KDIM, HDIM, gen=g)
    x0 = torch.randn(M, HDIM, generator=g) * 2 + 0.3
    bias2 = (torch.randn(HDIM, generator=g) * 0.3).half()
    deq = 2e-3
    x = x0.clone().to(DEV)
    st = K.stats_buffer(M, HDIM, DEV)
    K.linear(h.to(DEV), k_contiguous(w2).to(DEV), x, deq_scale=deq, bias=bias2.to(DEV), residual=x, stats_out=st)
    want_x = x0.double() + h.double() @ w2.double() * deq + bias2.double()
    assert float((x.double().cpu() - want_x).abs().max()) <= 1e-4 * float(want_x.abs().max())
    torch.testing.assert_close(st.double().cpu(), chunk_stats(x), rtol=1e-4, atol=1e-3)
    # the embedding's partials
    wte, wpe = torch.randn(50, HDIM, generator=g).half(), torch.randn(40, HDIM, generator=g).half()
    tok, pos = torch.randint(0, 50, (M,), generator=g), torch.randint(0, 40, (M,), generator=g)
    e, se = torch.empty(M, HDIM, device=DEV), K.stats_buffer(M, HDIM, DEV)
    K.embed(tok.to(DEV), pos.to(DEV), wte.to(DEV), wpe.to(DEV), e, pad_id=10**6, stats_out=se)
    torch.testing.assert_close(se.double().cpu(), chunk_stats(e), rtol=1e-4, atol=1e-3)
    # consumer: FFN1's shape, LN from the partials, int8
    ln_w, ln_b = torch.rand(HDIM, generator=g).half() + 0.5, (torch.randn(HDIM, generator=g) * 0.1).half()
    w1 = rand_i8(HDIM, NDIM, gen=g)
    bias1 = (torch.randn(NDIM, generator=g) * 0.3).half()
    c_ln, c_out, c_act = 4.0, 30.0, 6.0
    alpha, deq1, in_s, out_s = c_ln / (c_out * 127), c_out / 127, 127 / c_ln, 127 / c_act
    opts = dict(ln=(ln_w.to(DEV), ln_b.to(DEV), 1e-5), in_scale=in_s, alpha=alpha, deq_scale=deq1,
                bias=bias1.to(DEV), gelu=True, out_scale=out_s)
    got = K.linear(x, k_contiguous(w1).to(DEV), torch.empty(M, NDIM, dtype=torch.int8, device=DEV), ln_stats=st, **opts)
    a = q8(layer_norm(x.cpu(), ln_w, ln_b, 1e-5) * in_s)
    want = q8(gelu_tanh(q8(a @ w1.double() * alpha) * deq1 + bias1.double()) * out_s)
    exact, worst = agree(got, want)
    assert exact >= 0.995 and worst <= math.ceil(deq1 * out_s * 1.13) + 1, (exact, worst)
    apart = K.linear(x, k_contiguous(w1).to(DEV), torch.empty(M, NDIM, dtype=torch.int8, device=DEV), **opts)
    assert agree(got, apart)[0] >= 0.995  # the separate LayerNorm launch: the same up to fp32 rounding
    # fp16 consumer (the fp16 model's LN1 / LN2 / ln_f)
    wf = (torch.randn(HDIM, NDIM, generator=g) * 0.05).half()
    gotf = K.linear(x, wf.to(DEV), torch.empty(M, NDIM, dtype=torch.float16, device=DEV),
                    ln=(ln_w.to(DEV), ln_b.to(DEV), 1e-5), ln_stats=st)
    wantf = layer_norm(x.cpu(), ln_w, ln_b, 1e-5) @ wf.double()
    assert float((gotf.double().cpu() - wantf).abs().max()) <= 1e-2 * float(wantf.abs().max())
    if M > FUSED_LN_MAX_ROWS:  # other row tiles than one row's: the engine fuses the LayerNorm only up to here
        return
    alone_st = K.stats_buffer(1, HDIM, DEV)
    alone_x = x0[-1:].clone().to(DEV)
    K.linear(h[-1:].to(DEV), k_contiguous(w2).to(DEV), alone_x, deq_scale=deq, bias=bias2.to(DEV), residual=alone_x,
             stats_out=alone_st)
    alone = K.linear(alone_x, k_contiguous(w1).to(DEV), torch.empty(1, NDIM, dtype=torch.int8, device=DEV),
                     ln_stats=alone_st, **opts)
    assert torch.equal(alone_x.cpu(), x[-1:].cpu()) and torch.equal(alone_st.cpu(), st[:, -1:].cpu())
    assert torch.equal(alone.cpu(), got[-1:].cpu())


def test_layer_norm_partials_refuse_a_wrong_buffer():
    x = torch.zeros(3, 40, device=DEV)
    with pytest.raises(ValueError, match="multiple of 16"):
        K.linear(x, torch.zeros(40, 8, dtype=torch.float16, device=DEV), torch.empty(3, 8, device=DEV),
                 ln=(torch.ones(40, device=DEV), torch.zeros(40, device=DEV), 1e-5), ln_stats=torch.zeros(2, 3, 2, device=DEV))
    with pytest.raises(ValueError, match=r"\[2, 3, 48 // 16\]"):
        K.linear(torch.zeros(3, 8, dtype=torch.float16, device=DEV), torch.zeros(8, 48, dtype=torch.float16, device=DEV),
                 torch.empty(3, 48, device=DEV), stats_out=K.stats_buffer(4, 48, DEV))


# the fp16 model too on a GPU; on the CPU (interpreter minutes) its LayerNorm-from-partials is the kernel test's
# on the H100 (session 16) the int8 model with all three variants agreed within one logit step for 97.5% of the
# logits (max 3 steps), under this test's 99%: the GPU rounds the LayerNorm from merged partials otherwise than
# the interpreter. Opt-in and measured slower (lsgpt.engine.fused); strict, so a fix shows as XPASS
INT8_ON_GPU = pytest.mark.xfail(CUDA, strict=True, reason="issue 33: 97.5% within one step on the H100")


@pytest.mark.parametrize("quantize, ffn", [pytest.param(True, True, marks=INT8_ON_GPU)] + [(False, False)] * CUDA)
def test_engine_without_layer_norm_launches_matches_the_reference_path(tmp_path, monkeypatch, quantize, ffn):
    """LSGPT_FUSED_LN=1 (and, int8, LSGPT_FUSED_FFN=1 / LSGPT_FUSED_ATTN=1: the FFN and the decode step's
    attention block each in one launch): whole forwards with the LayerNorms
    run from the partials (no LayerNorm launch) against the engine's reference path (int8: the CPU integer path;
    fp16: torch), logit by logit; and greedy rows of a batch as each row alone (the partials do not depend on the
    batch, and integer sums on their order)."""
    from lsgpt.engine.engine import Engine, SamplingParams
    from lsgpt.export.convert import calibrate, float_arrays, gpt_config, load_checkpoint, quantize_arrays
    from lsgpt.format import write_hdf5
    from oracles import tiny

    monkeypatch.setenv("LSGPT_FUSED_LN", "1")
    monkeypatch.setenv("LSGPT_FUSED_FFN", "1" if ffn else "0")
    monkeypatch.setenv("LSGPT_FUSED_ATTN", "1" if ffn else "0")
    config, sd, _ = load_checkpoint(tiny.make_model(seed=4, wide=True, n_head=2))  # head size 32
    cfg = gpt_config(config, 48, quantize)
    fa = float_arrays(cfg, sd)
    arrays = quantize_arrays(cfg, fa, calibrate(cfg, fa, [[5, 6, 7, 8, 9, 300, 42]])) if quantize else fa
    path = write_hdf5(tmp_path / "m.hdf5", cfg, arrays)
    e = Engine.load(path, DEV, fused=True)
    assert e.fused.fuse_ln and e.fused._ln_fused(8) and not e.fused._ln_fused(17)
    assert e.fused._ffn_fused(8) == ffn and not e.fused._ffn_fused(17)
    assert e.fused._attn_fused(3, 1) == ffn and not e.fused._attn_fused(3, 2) and not e.fused._attn_fused(9, 1)
    m = e.model
    tokens = torch.tensor([[5, 17, 300, 42], [9, 700, 33, 101]], device=DEV)
    positions = torch.arange(4, device=DEV).expand(2, 4)
    c_fused, c_ref = m.new_cache(2, 8), m.new_cache(2, 8)
    step = (torch.tensor([[7], [8]], device=DEV), torch.full((2, 1), 4, device=DEV))  # then a decode step (T = 1)
    for t, p in ((tokens, positions), step):
        got = e.fused(t, p, c_fused).double().cpu()
        want = e._reference_logits(t, p, c_ref).double().cpu()
        if quantize:  # in steps of the logits clip: rounding flips only
            steps = (got - want).abs() / m.head_scales.deq
            assert float((steps <= 1.01).double().mean()) >= 0.99 and float(steps.mean()) < 0.1, float(steps.max())
        else:
            assert float((got - want).abs().max()) <= 2e-2 * float(want.abs().max())
    prompts = [[5, 17, 300], [42, 7, 7, 900], [9]]
    sp = SamplingParams(max_new_tokens=3, top_k=1, ignore_eos=True)
    batched = e.generate(prompts, sp)
    assert batched == [e.generate([p], sp)[0] for p in prompts]


@pytest.mark.parametrize("M", [m for m in ROWS if m <= K.FFN_MAX_ROWS])
def test_int8_ffn_in_one_launch(M):
    """ffn: LN2 + FFN1 + FFN2 + residual of a few rows in one launch (int32 sums added atomically, finished by the
    last program): against float64 formulas, exactly the three-launch path (LayerNorm kernel, linear, linear),
    and from LayerNorm partials, writing the next ones; twice in a row (the scratch is left zero)."""
    g = torch.Generator().manual_seed(700 + M)
    inner = 2 * HDIM + 16  # not a multiple of the 32-column slices
    x0 = torch.randn(M, HDIM, generator=g) * 2 + 0.3
    ln_w, ln_b = torch.rand(HDIM, generator=g).half() + 0.5, (torch.randn(HDIM, generator=g) * 0.1).half()
    w1, w2 = rand_i8(HDIM, inner, gen=g), rand_i8(inner, HDIM, gen=g)
    b1, b2 = (torch.randn(inner, generator=g) * 0.3).half(), (torch.randn(HDIM, generator=g) * 0.3).half()
    c_ln, c_out, c_act = 4.0, 30.0, 6.0
    s = dict(in_scale=127 / c_ln, alpha=c_ln / (c_out * 127), deq_scale=c_out / 127, out_scale=127 / c_act)
    deq2 = 2e-4
    ln = (ln_w.to(DEV), ln_b.to(DEV), 1e-5)
    W1, W2 = k_contiguous(w1).to(DEV), k_contiguous(w2).to(DEV)
    scratch = K.ffn_scratch(HDIM, DEV)
    fused = x0.clone().to(DEV)
    K.ffn(fused, W1, W2, scratch, ln=ln, b1=b1.to(DEV), deq_scale2=deq2, b2=b2.to(DEV), **s)
    a = q8(layer_norm(x0, ln_w, ln_b, 1e-5) * s["in_scale"])
    h = q8(gelu_tanh(q8(a @ w1.double() * s["alpha"]) * s["deq_scale"] + b1.double()) * s["out_scale"])
    want = x0.double() + h @ w2.double() * deq2 + b2.double()
    d = (fused.double().cpu() - want).abs()
    # a flipped rounding of h moves a value by deq2 * 127 at most (one h step times a weight)
    assert float((d <= 1e-4).double().mean()) >= 0.99 and float(d.max()) <= 127 * deq2 * 3, float(d.max())
    apart = x0.clone().to(DEV)
    hh = K.linear(apart, W1, torch.empty(M, inner, dtype=torch.int8, device=DEV), ln=ln, bias=b1.to(DEV), gelu=True,
                  **s)
    K.linear(hh, W2, apart, deq_scale=deq2, bias=b2.to(DEV), residual=apart)
    assert torch.equal(fused.cpu(), apart.cpu())
    assert not scratch[0].any() and int(scratch[1]) == 0
    st_in, st_out = K.stats_buffer(M, HDIM, DEV), K.stats_buffer(M, HDIM, DEV)
    x1 = x0.clone().to(DEV)
    K.embed(torch.arange(M, device=DEV), torch.zeros(M, dtype=torch.long, device=DEV), x0.to(DEV),
            torch.zeros(1, HDIM, device=DEV), x1, 10**6, stats_out=st_in)  # x1 = x0 and its partials
    K.ffn(x1, W1, W2, scratch, ln=ln, b1=b1.to(DEV), deq_scale2=deq2, b2=b2.to(DEV), ln_stats=st_in,
          stats_out=st_out, **s)
    assert float(((x1.double().cpu() - want).abs() <= 1e-4).double().mean()) >= 0.99
    torch.testing.assert_close(st_out.double().cpu(), chunk_stats(x1), rtol=1e-4, atol=1e-3)
    with pytest.raises(ValueError, match="at most 16 rows"):
        K.ffn(torch.zeros(17, HDIM, device=DEV), W1, W2, scratch, ln=ln, b1=b1.to(DEV), deq_scale2=deq2,
              b2=b2.to(DEV), **s)


@pytest.mark.parametrize("M", [m for m in ROWS if m <= K.ATTN_BLOCK_MAX_ROWS])
def test_int8_attention_block_in_one_launch(M):
    """attention_block: LN1 + QKV (k, v into the cache) + attention + W_out + residual of a decode step in one
    launch (the heads add their W_out parts to int32 sums, the last finishes): exactly the three-launch path
    (linear with the KV scatter, attention in one split, linear), from a LayerNorm launch or from partials, the
    cache written alike; and the attention against float64 formulas."""
    g = torch.Generator().manual_seed(800 + M)
    HDIM, hd, S = (192, 32, 40) if CUDA else (80, 16, 40)  # int8 dots on a GPU: head size (their K) >= 32
    n_head = HDIM // hd
    x0 = torch.randn(M, HDIM, generator=g) * 2 + 0.3
    ln_w, ln_b = torch.rand(HDIM, generator=g).half() + 0.5, (torch.randn(HDIM, generator=g) * 0.1).half()
    wqkv, wout = rand_i8(HDIM, 3 * HDIM, gen=g), rand_i8(HDIM, HDIM, gen=g)
    bqkv, bout = (torch.randn(3 * HDIM, generator=g) * 0.3).half(), (torch.randn(HDIM, generator=g) * 0.3).half()
    kc0, vc0 = rand_i8(M + 1, S, HDIM, gen=g), rand_i8(M + 1, S, HDIM, gen=g)
    pos = torch.randint(0, S, (M,), generator=g)
    s = 0.05  # kv clip / 127
    ln = (ln_w.to(DEV), ln_b.to(DEV), 1e-5)
    qkv = dict(w=k_contiguous(wqkv).to(DEV), bias=bqkv.to(DEV), ln=ln, in_scale=127 / 4.0, alpha=4.0 / (30 * 127),
               deq_scale=30 / 127, out_scale=1 / s)
    attn = dict(score_scale=s * s / math.sqrt(hd), v_scale=s, out_scale=127 / 3.0)
    out = dict(w=k_contiguous(wout).to(DEV), bias=bout.to(DEV), alpha=3.0 / (20 * 127), deq_scale=20 / 127)
    # the three launches
    x3, kc3, vc3 = x0.clone().to(DEV), kc0.clone().to(DEV), vc0.clone().to(DEV)
    q = K.linear(x3, out=torch.empty(M, HDIM, dtype=torch.int8, device=DEV), kv=(kc3, vc3, pos.to(DEV), 1), **qkv)
    ctx = K.attention(q, kc3, vc3, pos.to(DEV), 1, n_head, torch.empty(M, HDIM, dtype=torch.int8, device=DEV),
                      config=(1, 64, 4), **attn)
    K.linear(ctx, out=x3, residual=x3, **out)
    # one launch, from a LayerNorm launch and from partials (x1's, as the embedding leaves them)
    scratch = K.ffn_scratch(HDIM, DEV)
    x1, kc1, vc1 = x0.clone().to(DEV), kc0.clone().to(DEV), vc0.clone().to(DEV)
    K.attention_block(x1, kc1, vc1, pos.to(DEV), n_head, scratch, qkv=qkv, attn=attn, out=out)
    assert torch.equal(kc1.cpu(), kc3.cpu()) and torch.equal(vc1.cpu(), vc3.cpu())
    assert torch.equal(x1.cpu(), x3.cpu())
    assert not scratch[0].any() and int(scratch[1]) == 0
    st, st2 = K.stats_buffer(M, HDIM, DEV), K.stats_buffer(M, HDIM, DEV)
    x2, kc2, vc2 = torch.empty(M, HDIM, device=DEV), kc0.clone().to(DEV), vc0.clone().to(DEV)
    K.embed(torch.arange(M, device=DEV), torch.zeros(M, dtype=torch.long, device=DEV), x0.to(DEV),
            torch.zeros(1, HDIM, device=DEV), x2, 10**6, stats_out=st)
    K.attention_block(x2, kc2, vc2, pos.to(DEV), n_head, scratch, qkv=qkv, attn=attn, out=out, ln_stats=st,
                      stats_out=st2)
    assert float((x2 == x1).double().mean()) >= 0.99  # LayerNorm from partials: fp32 rounding apart
    torch.testing.assert_close(st2.double().cpu(), chunk_stats(x2), rtol=1e-4, atol=1e-3)
    # the attention itself, in float64 from the cache as written
    want = attention_reference(q.cpu(), kc3.cpu(), vc3.cpu(), pos, 1, n_head, attn["score_scale"], attn["v_scale"])
    assert float((q8(want * attn["out_scale"]) - ctx.double().cpu()).abs().max()) <= 1
