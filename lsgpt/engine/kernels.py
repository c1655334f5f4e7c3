"""Fused Triton kernels of the CUDA fast path: one launch per GEMM, LayerNorm and attention.

LightSeq's int8 speed comes from keeping activations int8 between kernels and folding every (re)quantize into
the kernel that produces the value (docs/format.md §6). These kernels do the same for the int8 and fp16 models:

* ``layer_norm``: LayerNorm of the fp32 residual stream fused with the int8 quantization that follows it.
* ``linear``: y = x @ W with the epilogue fused: int8 requantize (``floor(acc·alpha + 0.5)``, ±127) and
  dequantize, or int32 dequantize; + bias; GELU (tanh form); int8 quantize; + residual; or a scatter of
  q / k / v where k and v go straight into the KV cache at each row's position. Decode tiles are narrow in N
  and wide in K: at a few rows the GEMM is a race to have the whole weight matrix in flight.
* ``attention``: one query row against keys 0..pos of its sequence in the (int8 or fp16) KV cache, online
  softmax, split over the sequence when rows × heads are too few to fill the GPU (flash-decoding; the last
  split program of a row and head to finish merges the partial results, no second launch); int8 scores are
  exact integer dot products, the context is quantized in the kernel.
* ``embed``: token (int8 rows dequantized, or fp16) + position embedding; padding tokens give 0.

Arithmetic is LightSeq's (round-half-up at every quantization point, alphas of docs/format.md §5.2); float work is
fp32 inside a kernel; the residual stream is whatever the caller keeps (fp32 in ``lsgpt.engine.fused``). Any shape
works: blocks are masked at the edges.
On Hopper every kernel is launched with programmatic dependent launch (PDL): it starts while the kernel
before it finishes and waits for it in its first instruction, which hides most of the launch gap between the many
small kernels of a decode step (``LSGPT_PDL=0`` turns it off); a GEMM over K-major weights at decode sizes
first hints its weight columns into L2, before that wait.
With ``TRITON_INTERPRET=1`` the same kernels run on CPU tensors (how CI tests them).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def _pdl_wait(PDL: tl.constexpr):
    """Programmatic dependent launch (Hopper): this kernel may start before the previous one has finished; wait
    for it (its writes become visible). Every kernel waits before touching any buffer, so no read or write can
    race the kernel before it."""
    if PDL:
        gdc_wait()


@triton.jit
def _pdl_release(PDL: tl.constexpr):
    """Let the next kernel launch now (it waits for this one to finish in its _pdl_wait). Called after the main
    loop: launched earlier, its programs would take SM slots from this kernel's later waves."""
    if PDL:
        gdc_launch_dependents()


@triton.jit
def _prefetch_l2(ptrs):
    """A hint to pull the lines at `ptrs` into L2; no data comes back, so it cannot race a write."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _q8(x):
    """LightSeq float2int8 of an already scaled value: clamp(floor(x + 0.5), ±127), still float."""
    return tl.minimum(tl.maximum(tl.floor(x + 0.5), -127.0), 127.0)


@triton.jit
def _gelu_tanh(x):
    # 0.5·x·(1 + tanh(u)) == x·sigmoid(2u), u = sqrt(2/pi)·(x + 0.044715·x³); no tanh needed
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return x / (1.0 + tl.exp(-2.0 * u))


STAT_CHUNK = 16  # columns per partial LayerNorm statistic (ln_stats)
# the same inside kernels: a global a @triton.jit function reads must be a tl.constexpr instance (the interpreter
# accepts a plain int; the compiler does not)
_CHUNK = tl.constexpr(STAT_CHUNK)


@triton.jit
def _chunk_stats(y, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Per row, per STAT_CHUNK columns of the tile y [BLOCK_M, BLOCK_N] (fp32): (sum, sum of squares about the
    chunk's mean), each [BLOCK_M, BLOCK_N // STAT_CHUNK]. Chunks are fixed column ranges, whatever the tile, so a
    row's statistics do not depend on the batch it is in."""
    c = tl.reshape(y, (BLOCK_M, BLOCK_N // _CHUNK, _CHUNK))
    s = tl.sum(c, 2)
    d = c - (s / _CHUNK)[:, :, None]
    return s, tl.sum(d * d, 2)


@triton.jit
def _store_stats(stats_ptr, s, m2, rows, chunks, M, n_chunks):
    """Partials at [0, row, chunk] (sums) and [1, row, chunk] (squares) of a [2, M, n_chunks] fp32 buffer."""
    ok = (rows[:, None] < M) & (chunks[None, :] < n_chunks)
    at = stats_ptr + rows[:, None].to(tl.int64) * n_chunks + chunks[None, :]
    tl.store(at, s, mask=ok)
    tl.store(at + M * n_chunks, m2, mask=ok)


@triton.jit
def _merged_stats(stats_ptr, rows, M, K, eps, BLOCK_P: tl.constexpr):
    """A row's LayerNorm (mean, sqrt(variance + eps)) from its K // STAT_CHUNK partials (Chan et al.'s merge:
    the chunks' squares about their means plus each chunk's mean offset), in a fixed order."""
    n_chunks = K // _CHUNK
    p = tl.arange(0, BLOCK_P)
    ok = (rows[:, None] < M) & (p[None, :] < n_chunks)
    at = stats_ptr + rows[:, None].to(tl.int64) * n_chunks + p[None, :]
    s = tl.load(at, mask=ok, other=0.0)
    m2 = tl.load(at + M * n_chunks, mask=ok, other=0.0)
    mean = tl.sum(s, 1) / K
    dm = tl.where(ok, s / _CHUNK - mean[:, None], 0.0)
    var = (tl.sum(m2, 1) + tl.sum(dm * dm, 1) * _CHUNK) / K  # tensor first: constexpr * tensor is a constexpr
    return mean, tl.sqrt(var + eps)


@triton.jit
def _linear_kernel(
    x_ptr, w_ptr, out_ptr, bias_ptr, res_ptr,
    pos_ptr, k_cache_ptr, v_cache_ptr, stats_in_ptr, ln_w_ptr, ln_b_ptr, stats_out_ptr,
    M, N, K, stride_xm, stride_wk, stride_wn, stride_om, stride_rm,
    rows_per_seq, cache_stride_b, cache_stride_s, alpha, deq_scale, out_scale, eps, in_scale,
    INT8: tl.constexpr, REQUANT: tl.constexpr, HAS_BIAS: tl.constexpr,
    GELU: tl.constexpr, QUANT_OUT: tl.constexpr, RESIDUAL: tl.constexpr, KV_SCATTER: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False,
    PREFETCH_LINES: tl.constexpr = 0, PER_LINE: tl.constexpr = 128,
    LN_IN: tl.constexpr = False, STATS_OUT: tl.constexpr = False, BLOCK_P: tl.constexpr = 1,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if PREFETCH_LINES:  # K-major weights at decode sizes: hint this program's columns into L2 before the PDL wait,
        # so they stream in while the kernel before finishes (weights are constant: nothing to wait for)
        cols = tl.minimum(pid_n * BLOCK_N + tl.arange(0, BLOCK_N), N - 1)
        lines = tl.minimum(tl.arange(0, PREFETCH_LINES) * PER_LINE, K - 1)
        _prefetch_l2(w_ptr + cols[:, None].to(tl.int64) * stride_wn + lines[None, :])
    _pdl_wait(PDL)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N

    if INT8:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if LN_IN:  # x is the fp32 residual stream: LayerNorm it here, from the partials its producer stored
        mean, denom = _merged_stats(stats_in_ptr, rm, M, K, eps, BLOCK_P)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        a = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0)
        if LN_IN:  # then int8, or the weights' type
            v = _layer_normed(a, ln_w_ptr, ln_b_ptr, kk, k_ok, mean, denom)
            if INT8:
                a = _q8(v * in_scale).to(tl.int8)
            else:
                a = v.to(w_ptr.dtype.element_ty)
        elif not INT8:
            a = a.to(w_ptr.dtype.element_ty)
        w = tl.load(w_ptr + kk[:, None] * stride_wk + rn[None, :] * stride_wn, mask=k_ok[:, None] & n_ok[None, :],
                    other=0)
        if INT8:
            acc = tl.dot(a, w, acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(a, w, acc)
    _pdl_release(PDL)

    y = acc.to(tl.float32)
    if REQUANT:  # int32 sums -> int8 (LightSeq's alpha) -> dequantized value
        y = _q8(y * alpha) * deq_scale
    else:  # int32 sums dequantized directly (FFN2); 1.0 for fp16
        y = y * deq_scale
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if GELU:
        y = _gelu_tanh(y)
    if QUANT_OUT:
        y = _q8(y * out_scale)
    if RESIDUAL:
        r_ptrs = res_ptr + rm[:, None] * stride_rm + rn[None, :]
        y += tl.load(r_ptrs, mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
    y = y.to(out_ptr.dtype.element_ty)
    if STATS_OUT:  # the next LayerNorm's partial statistics of the values stored (N % STAT_CHUNK == 0)
        s, m2 = _chunk_stats(tl.where(m_ok[:, None] & n_ok[None, :], y.to(tl.float32), 0.0), BLOCK_M, BLOCK_N)
        _store_stats(stats_out_ptr, s, m2, rm, pid_n * (BLOCK_N // _CHUNK) + tl.arange(0, BLOCK_N // _CHUNK),
                     M, N // _CHUNK)
    if KV_SCATTER:  # columns [0,H): q -> out; [H,2H): k and [2H,3H): v -> cache row at the token's position
        H = N // 3
        pos = tl.load(pos_ptr + rm, mask=m_ok, other=0)
        row = (rm // rows_per_seq).to(tl.int64) * cache_stride_b + pos.to(tl.int64) * cache_stride_s
        ok = m_ok[:, None] & n_ok[None, :]
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], y, mask=ok & (rn[None, :] < H))
        tl.store(k_cache_ptr + row[:, None] + (rn[None, :] - H), y, mask=ok & (rn[None, :] >= H) & (rn[None, :] < 2 * H))
        tl.store(v_cache_ptr + row[:, None] + (rn[None, :] - 2 * H), y, mask=ok & (rn[None, :] >= 2 * H))
    else:
        tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], y, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _layer_norm_kernel(x_ptr, w_ptr, b_ptr, out_ptr, K, stride_xm, stride_om, eps, scale,
                       INT8: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False):
    """One row: LayerNorm in fp32 (mean, then variance about it), then int8 quantization by `scale` or a cast."""
    _pdl_wait(PDL)
    m = tl.program_id(0)
    k = tl.arange(0, BLOCK_K)
    ok = k < K
    x = tl.load(x_ptr + m * stride_xm + k, mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(x, 0) / K
    xc = tl.where(ok, x - mean, 0.0)
    y = xc / tl.sqrt(tl.sum(xc * xc, 0) / K + eps)
    y = y * tl.load(w_ptr + k, mask=ok, other=0.0).to(tl.float32) + tl.load(b_ptr + k, mask=ok, other=0.0).to(tl.float32)
    _pdl_release(PDL)
    if INT8:
        y = _q8(y * scale)
    tl.store(out_ptr + m * stride_om + k, y.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _fence_gpu(FENCE: tl.constexpr):
    """Make this thread's global writes visible GPU-wide before what follows (fence.acq_rel.gpu); no-op in the
    interpreter, where programs run one after another."""
    if FENCE:
        tl.inline_asm_elementwise("fence.acq_rel.gpu; mov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False,
                                  pack=1)


@triton.jit
def _combine_partials(part_ptr, out_ptr, m, h, n_head, stride_om, head_dim, v_scale, out_scale,
                      INT8: tl.constexpr, SPLITS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Merge the SPLITS partial records (max, sum, unnormalised context) of (row m, head h) into the context."""
    j = tl.arange(0, SPLITS)
    d = tl.arange(0, BLOCK_D)
    rec = part_ptr + ((m * n_head + h) * SPLITS + j).to(tl.int64) * (BLOCK_D + 2)
    mx = tl.load(rec, cache_modifier=".cg")  # -inf for splits past the last key; .cg: written by other SMs
    top = tl.max(mx, 0)
    w = tl.where(mx == float("-inf"), 0.0, tl.exp(mx - top))
    l_tot = tl.sum(tl.load(rec + 1, cache_modifier=".cg") * w, 0)
    acc = tl.sum(tl.load(rec[:, None] + 2 + d[None, :], cache_modifier=".cg") * w[:, None], 0)
    o = acc * (v_scale / l_tot)
    if INT8:
        o = _q8(o * out_scale)
    tl.store(out_ptr + m * stride_om + h * head_dim + d, o.to(out_ptr.dtype.element_ty), mask=d < head_dim)


@triton.jit
def _attend_keys(q, k_cache_ptr, v_cache_ptr, base, start, end, cache_stride_s, d, d_ok, score_scale,
                 BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """One query row (fp32 [BLOCK_D]) over the cached keys [start, end) of one head (at `base`): online softmax ->
    (max score, sum of exp, unnormalised context [BLOCK_D])."""
    m_i = tl.max(tl.full([BLOCK_S], float("-inf"), tl.float32), 0)
    l_i = tl.sum(tl.zeros([BLOCK_S], tl.float32), 0)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(start, end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_ok = s < end
        offs = base + s[:, None].to(tl.int64) * cache_stride_s + d[None, :]
        kv_ok = s_ok[:, None] & d_ok[None, :]
        k = tl.load(k_cache_ptr + offs, mask=kv_ok, other=0).to(tl.float32)
        v = tl.load(v_cache_ptr + offs, mask=kv_ok, other=0).to(tl.float32)
        # int8: q·k are exact integer sums (|sum| <= 127² · head_dim < 2^24), scaled once
        scores = tl.where(s_ok, tl.sum(k * q[None, :], 1) * score_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 0))
        p = tl.exp(scores - m_new)
        corr = tl.exp(m_i - m_new)
        acc = acc * corr + tl.sum(p[:, None] * v, 0)
        l_i = l_i * corr + tl.sum(p, 0)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, pos_ptr, out_ptr, part_ptr, sem_ptr,
    rows_per_seq, stride_qm, cache_stride_b, cache_stride_s, stride_om, split_len,
    head_dim, score_scale, v_scale, out_scale,
    INT8: tl.constexpr, SPLITS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    PDL: tl.constexpr = False, FENCE: tl.constexpr = False,
):
    """Program (row m, head h, split j): keys [j·split_len, (j+1)·split_len) ∩ [0, pos[m]], online softmax.
    SPLITS == 1 writes the context; otherwise the partial (max, sum, unnormalised context) goes to part_ptr
    and the last of the SPLITS programs of (m, h) to finish — counted on sem_ptr[m, h], which it puts back to
    0 — merges them (flash-decoding without a second launch: a short decode keeps every SM busy)."""
    _pdl_wait(PDL)
    m = tl.program_id(0)
    h = tl.program_id(1)
    j = tl.program_id(2)
    last = tl.load(pos_ptr + m)  # the query sees keys 0..last
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    q = tl.load(q_ptr + m * stride_qm + h * head_dim + d, mask=d_ok, other=0).to(tl.float32)
    base = (m // rows_per_seq).to(tl.int64) * cache_stride_b + h * head_dim
    start = j * split_len
    m_i, l_i, acc = _attend_keys(q, k_cache_ptr, v_cache_ptr, base, start, tl.minimum(start + split_len, last + 1),
                                 cache_stride_s, d, d_ok, score_scale, BLOCK_S, BLOCK_D)
    _pdl_release(PDL)
    if SPLITS == 1:
        o = acc * (v_scale / l_i)
        if INT8:
            o = _q8(o * out_scale)
        tl.store(out_ptr + m * stride_om + h * head_dim + d, o.to(out_ptr.dtype.element_ty), mask=d_ok)
    else:  # partial record: [max, sum, acc[0..BLOCK_D)]
        n_head = tl.num_programs(1)
        rec = part_ptr + ((m * n_head + h) * SPLITS + j).to(tl.int64) * (BLOCK_D + 2)
        tl.store(rec, m_i)
        tl.store(rec + 1, l_i)
        tl.store(rec + 2 + d, acc)
        _fence_gpu(FENCE)  # each thread's record writes, GPU-wide, then every thread of the program past them
        tl.debug_barrier()
        done = tl.atomic_add(sem_ptr + m * n_head + h, 1, sem="acq_rel", scope="gpu")
        if done == SPLITS - 1:  # the others' records are written: merge, and leave the counter at 0 for next time
            _fence_gpu(FENCE)
            _combine_partials(part_ptr, out_ptr, m, h, n_head, stride_om, head_dim, v_scale, out_scale,
                              INT8, SPLITS, BLOCK_D)
            tl.atomic_xchg(sem_ptr + m * n_head + h, 0, sem="relaxed", scope="gpu")


@triton.jit
def _layer_normed(a, ln_w_ptr, ln_b_ptr, kk, k_ok, mean, denom):
    """A tile of the fp32 residual stream, LayerNormed as _layer_norm_kernel: (x - mean) / sqrt(var + eps) * w + b."""
    g = tl.load(ln_w_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
    b = tl.load(ln_b_ptr + kk, mask=k_ok, other=0.0).to(tl.float32)
    return (a.to(tl.float32) - mean[:, None]) / denom[:, None] * g[None, :] + b[None, :]


@triton.jit
def _row_stats(stats_in_ptr, rm, M, K, eps, LN_IN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr):
    """(mean, sqrt(var + eps)) of the rows from their partials when LN_IN, else placeholders _int8_rows ignores."""
    if LN_IN:
        mean, denom = _merged_stats(stats_in_ptr, rm, M, K, eps, BLOCK_P)
    else:
        mean, denom = tl.zeros([BLOCK_M], tl.float32), tl.full([BLOCK_M], 1.0, tl.float32)
    return mean, denom


@triton.jit
def _int8_rows(x_ptr, rm, m_ok, kk, k_ok, stride_xm, ln_w_ptr, ln_b_ptr, mean, denom, in_scale, LN_IN: tl.constexpr):
    """A [rows, BLOCK_K] int8 tile of a GEMM's input: x's int8 values, or (LN_IN) the fp32 residual LayerNormed and
    quantized by in_scale."""
    a = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0)
    if LN_IN:
        a = _q8(_layer_normed(a, ln_w_ptr, ln_b_ptr, kk, k_ok, mean, denom) * in_scale).to(tl.int8)
    return a


@triton.jit
def _finish_if_last(acc_ptr, sem_ptr, res_ptr, bias_ptr, stats_out_ptr, rm, m_ok, M, H, stride_rm, alpha, deq,
                    REQUANT: tl.constexpr, STATS_OUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    FENCE: tl.constexpr):
    """After a program has added its part to the int32 sums acc [M, H]: count it on sem_ptr; the last program of the
    grid (every part added, and x read) finishes the rows — x += (requantize by alpha, or not) · deq + bias, in
    place, with the next LayerNorm's partials — and leaves sums and counter at zero for the next launch."""
    _fence_gpu(FENCE)  # this program's sums, GPU-wide, before it is counted
    tl.debug_barrier()
    done = tl.atomic_add(sem_ptr, 1, sem="acq_rel", scope="gpu")
    if done == tl.num_programs(0) - 1:
        _fence_gpu(FENCE)
        for n0 in range(0, H, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            n_ok = rn < H
            ok = m_ok[:, None] & n_ok[None, :]
            at = acc_ptr + rm[:, None] * H + rn[None, :]
            y = tl.load(at, mask=ok, other=0, cache_modifier=".cg").to(tl.float32)
            tl.store(at, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32), mask=ok)
            if REQUANT:
                y = _q8(y * alpha)
            y = y * deq + tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            r_ptrs = res_ptr + rm[:, None] * stride_rm + rn[None, :]
            y = (y + tl.load(r_ptrs, mask=ok, other=0.0).to(tl.float32)).to(res_ptr.dtype.element_ty)
            tl.store(r_ptrs, y, mask=ok)
            if STATS_OUT:
                cs, m2 = _chunk_stats(tl.where(ok, y.to(tl.float32), 0.0), BLOCK_M, BLOCK_N)
                _store_stats(stats_out_ptr, cs, m2, rm, tl.arange(0, BLOCK_N // _CHUNK) + n0 // _CHUNK, M,
                             H // _CHUNK)
        tl.atomic_xchg(sem_ptr, 0, sem="relaxed", scope="gpu")


@triton.jit
def _add_part(acc_ptr, part_a, w_ptr, w_rows, w_rows_ok, stride_wk, stride_wn, rm, m_ok, H, BLOCK_N: tl.constexpr):
    """acc[rm, :] += part_a · W[w_rows, :] (int8 x int8 -> int32), by atomic integer adds: exact in any order."""
    for n0 in range(0, H, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_ok = rn < H
        w = tl.load(w_ptr + w_rows[:, None] * stride_wk + rn[None, :] * stride_wn,
                    mask=w_rows_ok[:, None] & n_ok[None, :], other=0)
        tl.atomic_add(acc_ptr + rm[:, None] * H + rn[None, :], tl.dot(part_a, w, out_dtype=tl.int32),
                      mask=m_ok[:, None] & n_ok[None, :], sem="relaxed", scope="gpu")


@triton.jit
def _ffn_kernel(
    x_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, acc_ptr, sem_ptr, res_ptr, stats_in_ptr, ln_w_ptr, ln_b_ptr, stats_out_ptr,
    M, H, INNER, stride_xm, stride_w1k, stride_w1n, stride_w2k, stride_w2n, stride_rm,
    eps, in_scale, alpha1, deq1, act_scale, deq2,
    LN_IN: tl.constexpr, STATS_OUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr = 1, PDL: tl.constexpr = False,
    FENCE: tl.constexpr = False,
):
    """The int8 FFN of a few rows in one launch: program p computes h[:, slice p] (FFN1: requantize, bias, GELU,
    q8) and adds h[:, slice p] · W_ffn2[slice p, :] to the int32 sums; the last program finishes the rows (FFN2's
    dequantize, bias, the residual into res_ptr = x, with STATS_OUT the next LayerNorm's partials)."""
    _pdl_wait(PDL)
    rm = tl.arange(0, BLOCK_M)
    m_ok = rm < M
    ri = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    i_ok = ri < INNER
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_I], dtype=tl.int32)
    mean, denom = _row_stats(stats_in_ptr, rm, M, H, eps, LN_IN, BLOCK_M, BLOCK_P)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < H
        a = _int8_rows(x_ptr, rm, m_ok, kk, k_ok, stride_xm, ln_w_ptr, ln_b_ptr, mean, denom, in_scale, LN_IN)
        w = tl.load(w1_ptr + kk[:, None] * stride_w1k + ri[None, :] * stride_w1n, mask=k_ok[:, None] & i_ok[None, :],
                    other=0)
        acc = tl.dot(a, w, acc, out_dtype=tl.int32)
    y = _q8(acc.to(tl.float32) * alpha1) * deq1 + tl.load(b1_ptr + ri, mask=i_ok, other=0.0).to(tl.float32)[None, :]
    h = tl.where(i_ok[None, :], _q8(_gelu_tanh(y) * act_scale), 0.0).to(tl.int8)
    _add_part(acc_ptr, h, w2_ptr, ri, i_ok, stride_w2k, stride_w2n, rm, m_ok, H, BLOCK_N)
    _pdl_release(PDL)
    _finish_if_last(acc_ptr, sem_ptr, res_ptr, b2_ptr, stats_out_ptr, rm, m_ok, M, H, stride_rm, 0.0, deq2,
                    False, STATS_OUT, BLOCK_M, BLOCK_N, FENCE)


@triton.jit
def _qkv_head(x_ptr, w_ptr, b_ptr, stats_in_ptr, ln_w_ptr, ln_b_ptr, rm, m_ok, M, H, h, stride_xm, stride_wk,
              stride_wn, eps, in_scale, alpha, deq, kv_in, LN_IN: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr):
    """Head h's q, k, v columns of LN1(x) · W_qkv with linear's QKV epilogue (requantize, dequantize, bias, q8 by
    the k/v clip): three [BLOCK_M, BLOCK_D] tiles of int8 values (kept float)."""
    d = tl.arange(0, BLOCK_D)
    rk = tl.arange(0, BLOCK_K)
    cq, ck, cv = h * BLOCK_D + d, H + h * BLOCK_D + d, 2 * H + h * BLOCK_D + d
    aq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.int32)
    ak = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.int32)
    av = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.int32)
    mean, denom = _row_stats(stats_in_ptr, rm, M, H, eps, LN_IN, BLOCK_M, BLOCK_P)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < H
        a = _int8_rows(x_ptr, rm, m_ok, kk, k_ok, stride_xm, ln_w_ptr, ln_b_ptr, mean, denom, in_scale, LN_IN)
        wrow = w_ptr + kk[:, None] * stride_wk
        aq = tl.dot(a, tl.load(wrow + cq[None, :] * stride_wn, mask=k_ok[:, None], other=0), aq, out_dtype=tl.int32)
        ak = tl.dot(a, tl.load(wrow + ck[None, :] * stride_wn, mask=k_ok[:, None], other=0), ak, out_dtype=tl.int32)
        av = tl.dot(a, tl.load(wrow + cv[None, :] * stride_wn, mask=k_ok[:, None], other=0), av, out_dtype=tl.int32)
    q = _q8((_q8(aq.to(tl.float32) * alpha) * deq + tl.load(b_ptr + cq).to(tl.float32)[None, :]) * kv_in)
    k = _q8((_q8(ak.to(tl.float32) * alpha) * deq + tl.load(b_ptr + ck).to(tl.float32)[None, :]) * kv_in)
    v = _q8((_q8(av.to(tl.float32) * alpha) * deq + tl.load(b_ptr + cv).to(tl.float32)[None, :]) * kv_in)
    return q, k, v


@triton.jit
def _attend_rows(q, pos, rm, M, k_cache_ptr, v_cache_ptr, cache_stride_b, cache_stride_s, h, score_scale, v_scale,
                 ctx_in, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Head h's int8 context of each row m (sequence m, keys 0..pos[m] of the cache), one row after another, as
    _attention_kernel computes it in one split: exact integer scores, online softmax, the context q8'd by ctx_in."""
    d = tl.arange(0, BLOCK_D)
    ctx = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for m in range(0, M):
        sel = rm == m
        qm = tl.sum(tl.where(sel[:, None], q, 0.0), 0)
        last = tl.sum(tl.where(sel, pos, 0), 0)
        base = tl.sum(tl.where(sel, rm.to(tl.int64) * cache_stride_b, 0), 0) + h * BLOCK_D
        _, l_i, acc = _attend_keys(qm, k_cache_ptr, v_cache_ptr, base, 0, last + 1, cache_stride_s, d, d < BLOCK_D,
                                   score_scale, BLOCK_S, BLOCK_D)
        ctx = tl.where(sel[:, None], _q8(acc * (v_scale / l_i) * ctx_in)[None, :], ctx)
    return ctx


@triton.jit
def _attn_block_kernel(
    x_ptr, wqkv_ptr, bqkv_ptr, wout_ptr, bout_ptr, k_cache_ptr, v_cache_ptr, pos_ptr, acc_ptr, sem_ptr, res_ptr,
    stats_in_ptr, ln_w_ptr, ln_b_ptr, stats_out_ptr,
    M, H, stride_xm, stride_wq_k, stride_wq_n, stride_wo_k, stride_wo_n, stride_rm, cache_stride_b, cache_stride_s,
    eps, in_scale, qkv_alpha, qkv_deq, kv_in, score_scale, v_scale, ctx_in, out_alpha, out_deq,
    LN_IN: tl.constexpr, STATS_OUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr = 1,
    PDL: tl.constexpr = False, FENCE: tl.constexpr = False,
):
    """The int8 attention block of a decode step (one new token a row, row m = sequence m) in one launch; program
    h is head h: its q, k, v (k and v into the cache at the row's position), attention over the row's keys, then
    ctx_h · W_out[head h rows, :] added to the int32 sums; the last head finishes the rows (requantize, bias, the
    residual into res_ptr = x, with STATS_OUT the next LayerNorm's partials). What ``linear`` (QKV), ``attention``
    and ``linear`` (W_out) do in three launches, with the same arithmetic."""
    _pdl_wait(PDL)
    h = tl.program_id(0)
    rm = tl.arange(0, BLOCK_M)
    m_ok = rm < M
    d = tl.arange(0, BLOCK_D)
    q, k, v = _qkv_head(x_ptr, wqkv_ptr, bqkv_ptr, stats_in_ptr, ln_w_ptr, ln_b_ptr, rm, m_ok, M, H, h, stride_xm,
                        stride_wq_k, stride_wq_n, eps, in_scale, qkv_alpha, qkv_deq, kv_in, LN_IN, BLOCK_M, BLOCK_K,
                        BLOCK_D, BLOCK_P)
    pos = tl.load(pos_ptr + rm, mask=m_ok, other=0)
    row = rm.to(tl.int64) * cache_stride_b + pos.to(tl.int64) * cache_stride_s + h * BLOCK_D
    tl.store(k_cache_ptr + row[:, None] + d[None, :], k.to(tl.int8), mask=m_ok[:, None])
    tl.store(v_cache_ptr + row[:, None] + d[None, :], v.to(tl.int8), mask=m_ok[:, None])
    tl.debug_barrier()  # this program's k, v rows written before its threads read the cache back
    ctx = _attend_rows(q, pos, rm, M, k_cache_ptr, v_cache_ptr, cache_stride_b, cache_stride_s, h, score_scale,
                       v_scale, ctx_in, BLOCK_M, BLOCK_D, BLOCK_S)
    _add_part(acc_ptr, ctx.to(tl.int8), wout_ptr, h * BLOCK_D + d, d < BLOCK_D, stride_wo_k, stride_wo_n, rm, m_ok, H,
              BLOCK_N)
    _pdl_release(PDL)
    _finish_if_last(acc_ptr, sem_ptr, res_ptr, bout_ptr, stats_out_ptr, rm, m_ok, M, H, stride_rm, out_alpha, out_deq,
                    True, STATS_OUT, BLOCK_M, BLOCK_N, FENCE)


@triton.jit
def _embed_kernel(tok_ptr, pos_ptr, wte_ptr, wpe_ptr, out_ptr, stats_ptr, M, H, pad_id, emb_scale,
                  BLOCK_H: tl.constexpr, PDL: tl.constexpr = False, STATS_OUT: tl.constexpr = False):
    _pdl_wait(PDL)
    m = tl.program_id(0)
    t = tl.load(tok_ptr + m)
    p = tl.load(pos_ptr + m)
    h = tl.arange(0, BLOCK_H)
    ok = h < H
    e = tl.load(wte_ptr + t.to(tl.int64) * H + h, mask=ok, other=0).to(tl.float32) * emb_scale
    e += tl.load(wpe_ptr + p.to(tl.int64) * H + h, mask=ok, other=0.0).to(tl.float32)
    e = tl.where(t == pad_id, 0.0, e)
    _pdl_release(PDL)
    e = e.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + m * H + h, e, mask=ok)
    if STATS_OUT:  # the first LayerNorm's partials, as _linear_kernel's STATS_OUT (H % STAT_CHUNK == 0)
        s, m2 = _chunk_stats(tl.where(ok, e.to(tl.float32), 0.0)[None, :], 1, BLOCK_H)
        _store_stats(stats_ptr, s, m2, m + tl.arange(0, 1), tl.arange(0, BLOCK_H // _CHUNK), M, H // _CHUNK)


# ---------------------------------------------------------------------------------------------------------
# Launchers


@functools.cache
def _config(M: int, N: int, K: int, int8: bool) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Decode (few rows) is bound by the latency of
    streaming the weights: wide K tiles (few dependent iterations) and N tiles narrow enough that the grid
    has all of the matrix in flight at once. The rule comes from a tile sweep (docs/decisions.md); a
    LSGPT_GEMM_TABLE entry for this shape and row count takes its place."""
    if (tuned := _gemm_table_entry(M, N, K, int8)) is not None:
        return tuned
    bn = 16 if N <= 1024 else 32 if N <= 4096 else 64
    if M <= 16:
        bm, bk = 16, (512 if K >= 2048 else 256) if int8 else 256
    else:
        bm, bk = (32 if M <= 32 else 64), (128 if int8 else 64)
        if M > 64:
            bn *= 2
    while bn > 16 and triton.cdiv(M, bm) * triton.cdiv(N, bn) < _sm_count():
        bn //= 2
    return bm, bn, min(bk, max(32, triton.next_power_of_2(K))), 4, 3


def _sweep_table(var: str, what: str, entry: Callable[[Any], Any]) -> dict[str, dict[int, Any]] | None:
    """The "table" of the sweep JSON that $var names (per dtype: the largest row count an entry serves -> entry(its
    value)); None when $var is unset. A file that is not such a JSON: RuntimeError naming it."""
    path = os.environ.get(var)
    if not path:
        return None
    import json

    try:
        table = json.loads(open(path).read())["table"]
        return {dtype: {int(rows): entry(v) for rows, v in by_rows.items()} for dtype, by_rows in table.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise RuntimeError(f"{var}={path}: not {what} with a 'table' ({e})") from e


def _covering(by_rows: dict[int, Any], rows: int) -> Any:
    """A tuned table's entry for `rows`: the one of the smallest row count >= rows; None past the table."""
    fits = [r for r in by_rows if r >= rows]
    return by_rows[min(fits)] if fits else None


@functools.cache
def _gemm_table() -> dict[str, dict[int, dict[str, tuple[int, int, int, int, int]]]]:
    """LSGPT_GEMM_TABLE=<gemm_sweep.json>: its "table", per dtype, the largest row count an entry serves ->
    {"KxN": (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)} (benchmarks/gemm_sweep.py writes it)."""
    return _sweep_table("LSGPT_GEMM_TABLE", "a gemm_sweep.json",
                        lambda by_shape: {shape: tuple(int(v) for v in cfg) for shape, cfg in by_shape.items()}) or {}


def _gemm_table_entry(M: int, N: int, K: int, int8: bool) -> tuple[int, int, int, int, int] | None:
    """The tuned tiles for [M, K] x [K, N]: the entry of the smallest row count >= M, if it lists this shape."""
    by_shape = _covering(_gemm_table().get("int8" if int8 else "fp16", {}), M)
    return None if by_shape is None else by_shape.get(f"{K}x{N}")


PDL_MAX_ROWS = 128  # PDL pays up to this many rows, not beyond (docs/decisions.md)


@functools.cache
def _on_gpu() -> bool:
    """Real kernels on a CUDA device (not the Triton interpreter)."""
    return torch.cuda.is_available() and not os.environ.get("TRITON_INTERPRET")


@functools.cache
def _pdl_available() -> bool:
    """Programmatic dependent launch: Hopper and later GPUs, not under the interpreter; LSGPT_PDL=0 turns it off."""
    return _on_gpu() and os.environ.get("LSGPT_PDL", "1") != "0" and torch.cuda.get_device_capability(0)[0] >= 9


def _pdl(rows: int) -> dict:
    """Launch options: PDL for the small grids of decode, where launch gaps are a large part of each kernel."""
    return {"PDL": True, "launch_pdl": True} if rows <= PDL_MAX_ROWS and _pdl_available() else {}


PREFETCH_MAX_ROWS = int(os.environ.get("LSGPT_PREFETCH_ROWS", "16"))


def _prefetch(w: torch.Tensor, rows: int) -> dict:
    """L2 prefetch of the weights before the PDL wait, for K-major weights (the int8 ones, the fp16 LM head) at
    16 rows or fewer; not on N-major fp16 weights, where it would be one hint per row of K (docs/decisions.md)."""
    if rows > PREFETCH_MAX_ROWS or w.stride(0) != 1 or not _pdl(rows):
        return {}
    per_line = 128 // w.element_size()
    return {"PREFETCH_LINES": triton.next_power_of_2(triton.cdiv(w.shape[0], per_line)), "PER_LINE": per_line}


@functools.cache
def _sm_count() -> int:
    """Multiprocessors of the GPU (an H100's 132 under the interpreter, so CPU tests choose GPU-like tiles)."""
    if _on_gpu():
        return torch.cuda.get_device_properties(0).multi_processor_count
    return 132


@functools.cache
def _shared_memory() -> int:
    """Bytes of shared memory a block may use on the GPU (an H100's 227 KiB under the interpreter)."""
    if _on_gpu():
        return torch.cuda.get_device_properties(0).shared_memory_per_block_optin
    return 232448


# the LayerNorm-from-partials GEMMs load fp32 rows into their pipelined tiles: the fp16 LM head's then needs
# 184,320 bytes (tests/gpu_compile.py), over an A100's 166,912
LN_IN_SHARED_MEMORY = 200 * 1024


def ln_in_fits() -> bool:
    """Whether this GPU has the shared memory the LayerNorm-from-partials GEMM tiles need (Hopper: yes)."""
    return _shared_memory() >= LN_IN_SHARED_MEMORY


def sm_count() -> int:
    """Multiprocessors the kernels plan for (an H100's 132 under the interpreter)."""
    return _sm_count()


def gemm_plan(M: int, N: int, K: int, int8: bool) -> tuple[tuple[int, int, int, int, int], bool, bool]:
    """How ``linear`` launches an [M, K] x [K, N] product: its tiles (BLOCK_M, BLOCK_N, BLOCK_K, num_warps,
    num_stages), whether with programmatic dependent launch, and whether an L2 prefetch of K-major weights
    is possible at this many rows."""
    return _config(M, N, K, int8), bool(_pdl(M)), M <= PREFETCH_MAX_ROWS


def attention_plan(rows: int, n_head: int, cache_len: int, int8: bool = True) -> tuple[int, int, int]:
    """How ``attention`` launches over `rows` query rows and a cache of `cache_len`: (SPLITS, BLOCK_S, num_warps)."""
    return _attention_config(rows, n_head, cache_len, int8)


def layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float, out: torch.Tensor,
               scale: float | None = None) -> torch.Tensor:
    """out[M, K] = LayerNorm(x) (fp32 math), quantized to int8 by `scale` (= 127/clip) when out is int8."""
    M, K = x.shape
    _layer_norm_kernel[(M,)](x, w, b, out, K, x.stride(0), out.stride(0), float(eps), float(scale or 0.0),
                             INT8=out.dtype == torch.int8, BLOCK_K=triton.next_power_of_2(K), num_warps=4, **_pdl(M))
    return out


def _check_stats(what: str, t: torch.Tensor | None, rows: int, width: int) -> None:
    """ValueError unless `t` (if given) is the LayerNorm partials buffer of `rows` rows of `width` values."""
    if t is not None and (width % STAT_CHUNK or tuple(t.shape) != (2, rows, width // STAT_CHUNK)):
        raise ValueError(f"{what}: a [2, {rows}, {width} // {STAT_CHUNK}] buffer for rows of {width} (a multiple of "
                         f"{STAT_CHUNK}), got {tuple(t.shape)}")


def _normed_input(x: torch.Tensor, ln: tuple[torch.Tensor, torch.Tensor, float], scale: float | None,
                  ln_stats: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """A GEMM's input for LayerNorm(x): x itself when ``ln_stats`` are there (the GEMM normalizes its loads), else a
    LayerNorm launch's output in `dtype` (int8: quantized by `scale`)."""
    if ln_stats is not None:
        return x
    return layer_norm(x, ln[0], ln[1], ln[2], torch.empty(x.shape, dtype=dtype, device=x.device), scale)


def linear(
    x: torch.Tensor,
    w: torch.Tensor,
    out: torch.Tensor,
    *,
    ln: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    in_scale: float = 1.0,
    alpha: float | None = None,
    deq_scale: float = 1.0,
    bias: torch.Tensor | None = None,
    gelu: bool = False,
    out_scale: float | None = None,
    residual: torch.Tensor | None = None,
    kv: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int] | None = None,
    config: tuple[int, int, int, int, int] | None = None,
    ln_stats: torch.Tensor | None = None,
    stats_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[M, N] = epilogue(x[M, K] @ w[K, N]); see the module docstring.

    int8 when ``w`` is int8 (then x is int8). ``ln=(gamma, beta, eps)`` first normalizes x (the fp32 residual
    stream) with ``layer_norm`` (quantized by ``in_scale`` = 127/clip for int8). ``alpha`` given: requantize
    then multiply by ``deq_scale``, else multiply the sums by ``deq_scale``; ``out_scale`` given: quantize the
    result by it; ``kv=(k_cache, v_cache, positions[M], rows_per_seq)``: N = 3H, q -> out[M, H], k, v ->
    cache [B, S, H]. ``residual`` may be ``out`` itself (in-place update of the residual stream).
    ``config``: tile override (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), for tuning.
    ``ln_stats`` (with ``ln``): x's LayerNorm partials (``stats_buffer``, written by the kernel that produced x),
    so the LayerNorm runs in this kernel's loads instead of a launch of its own; ``stats_out``: write the partials
    of out (the next LayerNorm's input) there. Both need the row length a multiple of STAT_CHUNK.
    """
    int8 = w.dtype == torch.int8
    ln_in = ln is not None and ln_stats is not None
    if ln is not None:
        x = _normed_input(x, ln, in_scale if int8 else None, ln_stats, w.dtype)
    M, K = x.shape
    N = w.shape[1]
    bm, bn, bk, warps, stages = config or _config(M, N, K, int8)
    dummy = w
    _check_stats("ln_stats", ln_stats if ln_in else None, M, K)
    _check_stats("stats_out", stats_out, M, N)
    if kv is not None:
        k_cache, v_cache, pos, rows_per_seq = kv
        cache_b, cache_s = k_cache.stride(0), k_cache.stride(1)
    else:
        k_cache = v_cache = pos = dummy
        rows_per_seq, cache_b, cache_s = 1, 0, 0
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    _linear_kernel[grid](
        x, w, out, dummy if bias is None else bias, dummy if residual is None else residual, pos, k_cache, v_cache,
        ln_stats if ln_in else dummy, ln[0] if ln_in else dummy, ln[1] if ln_in else dummy,
        dummy if stats_out is None else stats_out,
        M, N, K,
        x.stride(0), w.stride(0), w.stride(1), out.stride(0), 0 if residual is None else residual.stride(0),
        rows_per_seq, cache_b, cache_s,
        float(alpha or 0.0), float(deq_scale), float(out_scale or 0.0), float(ln[2]) if ln_in else 0.0,
        float(in_scale),
        INT8=int8, REQUANT=alpha is not None, HAS_BIAS=bias is not None, GELU=gelu,
        QUANT_OUT=out_scale is not None, RESIDUAL=residual is not None, KV_SCATTER=kv is not None,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages, **_pdl(M), **_prefetch(w, M),
        LN_IN=ln_in, STATS_OUT=stats_out is not None,
        BLOCK_P=triton.next_power_of_2(max(1, K // STAT_CHUNK)) if ln_in else 1,
    )
    return out


# Decode attention settings per batch size: for each dtype, the largest row count an entry serves -> (keys per
# split program, BLOCK_S, num_warps), or None for the rule in _attention_config. Keys per split rather than SPLITS,
# so that a longer cache gets proportionally more split programs. Where the entries come from, and why the small
# batches keep the rule: docs/decisions.md.
# LSGPT_ATTENTION_TABLE=<attention_sweep.json> applies a sweep's own "table" instead (e.g. another GPU's).
ATTENTION_TABLE: dict[str, dict[int, tuple[int, int, int] | None]] = {
    "int8": {8: None, 32: (512, 128, 4), 64: (512, 64, 4), 128: (512, 32, 2), 256: (512, 32, 2)},
    "fp16": {32: None, 64: (512, 64, 4), 128: (512, 64, 2), 256: (512, 64, 2)},
}


def keys_per_split(cache_len: int, splits: int, block_s: int) -> int:
    """Keys each split program of `attention` covers: the cache cut in `splits`, rounded up to whole BLOCK_S tiles."""
    return triton.cdiv(triton.cdiv(cache_len, splits), block_s) * block_s


@functools.cache
def _attention_table() -> dict[str, dict[int, tuple[int, int, int] | None]]:
    table = _sweep_table("LSGPT_ATTENTION_TABLE", "an attention_sweep.json",
                         lambda cfg: None if cfg is None else tuple(int(v) for v in cfg))
    return ATTENTION_TABLE if table is None else table


@functools.cache
def _attention_config(rows: int, n_head: int, cache_len: int, int8: bool = True) -> tuple[int, int, int]:
    """(SPLITS, BLOCK_S, num_warps). From the tuned table when it has an entry for this many rows (decode);
    otherwise (prefill, or no table) split the keys when rows × heads alone would leave SMs idle."""
    entry = _covering(_attention_table().get("int8" if int8 else "fp16", {}), rows)
    if entry is not None:
        split_len, block_s, warps = entry
        splits = 1
        while splits * split_len < cache_len and splits < 64:  # SPLITS: a power of two (tl.arange)
            splits *= 2
        return splits, block_s, warps
    block_s = 64
    splits = 1
    while rows * n_head * splits < 2 * _sm_count() and splits * block_s < cache_len and splits < 16:
        splits *= 2
    return splits, block_s, 4


def attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    rows_per_seq: int,
    n_head: int,
    out: torch.Tensor,
    *,
    score_scale: float,
    v_scale: float = 1.0,
    out_scale: float | None = None,
    config: tuple[int, int, int] | None = None,
    sem: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[M, H] = softmax(q·kᵀ·score_scale) v·v_scale over keys 0..positions[m] of sequence m // rows_per_seq.

    q [M, H] and the caches [B, S, H] (contiguous per position) are int8 (then ``out_scale`` quantizes the
    context) or fp16. For int8, score_scale = s²/sqrt(head_dim) and v_scale = s with s = kv_clip/127.
    ``config``: (SPLITS, BLOCK_S, num_warps) override, for tuning. ``sem``: int32 zeros, at least M·n_head (the
    split programs' counters; left at zero), to reuse across calls — a CUDA graph replays a fixed buffer;
    None: allocated here when the keys are split.
    """
    M, H = q.shape
    hd = H // n_head
    int8 = q.dtype == torch.int8
    bd = triton.next_power_of_2(hd)
    cache_len = k_cache.shape[1]
    splits, block_s, warps = config or _attention_config(M, n_head, cache_len, int8)
    split_len = keys_per_split(cache_len, splits, block_s)
    part = torch.empty(M * n_head * splits * (bd + 2) if splits > 1 else 1, dtype=torch.float32, device=q.device)
    if splits > 1 and (sem is None or sem.numel() < M * n_head):
        sem = torch.zeros(M * n_head, dtype=torch.int32, device=q.device)
    _attention_kernel[(M, n_head, splits)](
        q, k_cache, v_cache, positions, out, part, part if splits == 1 else sem,
        rows_per_seq, q.stride(0), k_cache.stride(0), k_cache.stride(1), out.stride(0), split_len,
        hd, float(score_scale), float(v_scale), float(out_scale or 0.0),
        INT8=int8, SPLITS=splits, BLOCK_D=bd, BLOCK_S=block_s, num_warps=warps, FENCE=_on_gpu(), **_pdl(M),
    )
    return out


def embed(
    tokens: torch.Tensor, positions: torch.Tensor, wte: torch.Tensor, wpe: torch.Tensor, out: torch.Tensor,
    pad_id: int, scale: float = 1.0, stats_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[M, H] = wte[tokens]·scale + wpe[positions]; rows of pad tokens are 0 (pad_id >= vocab: none);
    ``stats_out``: the first LayerNorm's partials of out, as ``linear``'s."""
    M, H = out.shape
    _check_stats("stats_out", stats_out, M, H)
    _embed_kernel[(M,)](tokens, positions, wte, wpe, out, out if stats_out is None else stats_out, M, H, pad_id,
                        float(scale), BLOCK_H=triton.next_power_of_2(H), STATS_OUT=stats_out is not None, **_pdl(M))
    return out


FFN_MAX_ROWS = 16  # ffn: one block of rows (the int8 dot's smallest M tile)


def ffn_scratch(hidden: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """``ffn``'s int32 sums and its counter, zeros that every launch leaves zero again (allocate once: a CUDA
    graph replays the same buffers)."""
    return (torch.zeros(FFN_MAX_ROWS, hidden, dtype=torch.int32, device=device),
            torch.zeros(1, dtype=torch.int32, device=device))


def ffn(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, scratch: tuple[torch.Tensor, torch.Tensor], *,
        ln: tuple[torch.Tensor, torch.Tensor, float], in_scale: float, alpha: float, deq_scale: float,
        b1: torch.Tensor, out_scale: float, deq_scale2: float, b2: torch.Tensor, ln_stats: torch.Tensor | None = None,
        stats_out: torch.Tensor | None = None, block_i: int = 32) -> torch.Tensor:
    """The int8 FFN in one launch, x [M, H] fp32 updated in place (M <= FFN_MAX_ROWS): x += dequant(q8(GELU(
    requant(q8(LN(x)) · W1) + b1)) · W2) + b2 — what ``linear`` does in a LayerNorm, FFN1 and FFN2 launch
    (``ln_stats``: the LayerNorm from partials, else a LayerNorm launch first; ``stats_out``: the next one's)."""
    M, H = x.shape
    inner = w1.shape[1]
    if w1.dtype != torch.int8 or M > FFN_MAX_ROWS or H % STAT_CHUNK:
        raise ValueError(f"ffn: int8 weights, at most {FFN_MAX_ROWS} rows and a width that is a multiple of "
                         f"{STAT_CHUNK}; got {w1.dtype}, {M} rows, width {H}")
    _check_stats("ln_stats", ln_stats, M, H)
    _check_stats("stats_out", stats_out, M, H)
    a = _normed_input(x, ln, in_scale, ln_stats, torch.int8)
    acc, sem = scratch
    _ffn_kernel[(triton.cdiv(inner, block_i),)](
        a, w1, b1, w2, b2, acc, sem, x, w1 if ln_stats is None else ln_stats, ln[0], ln[1],
        w1 if stats_out is None else stats_out,
        M, H, inner, a.stride(0), w1.stride(0), w1.stride(1), w2.stride(0), w2.stride(1), x.stride(0),
        float(ln[2]), float(in_scale), float(alpha), float(deq_scale), float(out_scale), float(deq_scale2),
        LN_IN=ln_stats is not None, STATS_OUT=stats_out is not None, BLOCK_M=FFN_MAX_ROWS,
        BLOCK_K=min(256, triton.next_power_of_2(H)), BLOCK_I=block_i, BLOCK_N=min(128, triton.next_power_of_2(H)),
        BLOCK_P=triton.next_power_of_2(H // STAT_CHUNK), FENCE=_on_gpu(), num_warps=4, **_pdl(M),
    )
    return x


ATTN_BLOCK_MAX_ROWS = 8  # attention_block: its heads loop over the rows


def attention_block(x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                    n_head: int, scratch: tuple[torch.Tensor, torch.Tensor], *, qkv: dict, attn: dict, out: dict,
                    ln_stats: torch.Tensor | None = None, stats_out: torch.Tensor | None = None) -> torch.Tensor:
    """The int8 attention block of a decode step in one launch, x [M, H] fp32 updated in place (M <=
    ATTN_BLOCK_MAX_ROWS rows, one new token each, row m = sequence m of the caches): x += W_out-projection of
    attention over the cache of LN1(x)'s q, k, v, k and v written into the cache at positions[m] — what ``linear``
    (qkv: the layer's w, bias, ln, in_scale, alpha, deq_scale, out_scale), ``attention`` (attn: score_scale,
    v_scale, out_scale) and ``linear`` (out: w, bias, alpha, deq_scale) do in three launches. ``ln_stats`` /
    ``stats_out`` as ``ffn``'s; `scratch`: ``ffn_scratch`` (the two share one: each leaves it zero)."""
    M, H = x.shape
    hd = H // n_head
    w = qkv["w"]
    if w.dtype != torch.int8 or M > ATTN_BLOCK_MAX_ROWS or H % STAT_CHUNK or hd < 16 or hd & (hd - 1):
        raise ValueError(f"attention_block: int8 weights, at most {ATTN_BLOCK_MAX_ROWS} rows, a width that is a "
                         f"multiple of {STAT_CHUNK} and a power-of-two head size >= 16; got {w.dtype}, {M} rows, "
                         f"width {H}, head size {hd}")
    _check_stats("ln_stats", ln_stats, M, H)
    _check_stats("stats_out", stats_out, M, H)
    ln = qkv["ln"]
    a = _normed_input(x, ln, qkv["in_scale"], ln_stats, torch.int8)
    acc, sem = scratch
    wo = out["w"]
    _attn_block_kernel[(n_head,)](
        a, w, qkv["bias"], wo, out["bias"], k_cache, v_cache, positions, acc, sem, x,
        w if ln_stats is None else ln_stats, ln[0], ln[1], w if stats_out is None else stats_out,
        M, H, a.stride(0), w.stride(0), w.stride(1), wo.stride(0), wo.stride(1), x.stride(0), k_cache.stride(0),
        k_cache.stride(1), float(ln[2]), float(qkv["in_scale"]), float(qkv["alpha"]), float(qkv["deq_scale"]),
        float(qkv["out_scale"]), float(attn["score_scale"]), float(attn["v_scale"]), float(attn["out_scale"]),
        float(out["alpha"]), float(out["deq_scale"]),
        LN_IN=ln_stats is not None, STATS_OUT=stats_out is not None, BLOCK_M=FFN_MAX_ROWS,
        BLOCK_K=min(256, triton.next_power_of_2(H)), BLOCK_D=hd, BLOCK_S=64, BLOCK_N=min(128, triton.next_power_of_2(H)),
        BLOCK_P=triton.next_power_of_2(H // STAT_CHUNK), FENCE=_on_gpu(), num_warps=4, **_pdl(M),
    )
    return x


def stats_buffer(rows: int, width: int, device: torch.device | str) -> torch.Tensor:
    """Where a kernel leaves the LayerNorm partials of `rows` rows of `width` values for the next GEMM (``linear``'s
    ``stats_out`` / ``ln_stats``): [2, rows, width // STAT_CHUNK] fp32, every entry written before it is read."""
    return torch.empty(2, rows, width // STAT_CHUNK, dtype=torch.float32, device=device)
