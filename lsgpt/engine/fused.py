"""The engine's GPU fast path: a whole forward (prefill, or one decode step) in fused Triton kernels.

Per layer seven launches (``lsgpt.engine.kernels``; attention split over the sequence merges its parts in the same
launch), for the fp16 ``GPT`` and the int8 ``QuantGPT`` alike, over the same weight tensors those models hold
(no copies):

    x ─ LN1(+q8) ─ ⋅ W_qkv (+requant, bias, q8) ─► q, and k, v straight into the KV cache at each row's position
      ─ attention over the cache (int8: exact integer scores, context q8'd in the kernel) ─► ctx
      ─ ctx ⋅ W_out (+requant, bias) + x ─► x           (in place)
      ─ LN2(+q8) ─ ⋅ W_ffn1 (+requant, bias, GELU, q8) ─► h
      ─ h ⋅ W_ffn2 (+dequant, bias) + x ─► x             (in place)
    then ln_f(+q8) ─ ⋅ embeddingᵀ (int8: requantized to int8 logits, dequantized) ─► fp32 logits

Numerics as in docs/format.md §6: the same quantization points, alphas and round-half-up as the reference
path in ``lsgpt.engine.int8``; float work is fp32 inside every kernel and the residual stream is kept in fp32
(LightSeq keeps it in fp16), so the CUDA path tracks the CPU integer path, the reference, step for step.
Off with ``LSGPT_FUSED=0`` (then the reference path runs on CUDA too).

The three opt-in variants below cut a decode step from 90 launches to 29 but, measured on the H100 (session 16,
results/h100/decode33/variants-2026-12-07/), make it slower (int8, batch 1: 0.32 -> 0.60 ms a token with all
three): their grids are too small to stream the weights at full bandwidth. They stay off by default.

``LSGPT_FUSED_LN=1`` (opt-in; issue 33): up to FUSED_LN_MAX_ROWS rows, no LayerNorm
launches — the kernel that writes the residual stream (the embedding, W_out, W_ffn2) also leaves each row's
LayerNorm partials (per 16 columns), and the next GEMM normalizes its loads from them: five launches a layer.
``LSGPT_FUSED_FFN=1`` (int8, opt-in likewise): up to 16 rows the FFN (its LayerNorm, FFN1, FFN2 and the residual)
is one launch (``kernels.ffn``): four a layer with LSGPT_FUSED_LN, five without it. ``LSGPT_FUSED_ATTN=1`` (int8,
opt-in likewise): a decode step of up to 8 rows runs LN1, QKV, attention, W_out and the residual as one launch
(``kernels.attention_block``): with all three, two launches a layer.
"""

from __future__ import annotations

import math
import os

import torch

from lsgpt.format import LayerScales

# up to 16 rows every GEMM of a step has the same row tile (gemm_plan), so a row's partials (and what the GEMMs
# make of them) do not depend on the rows beside it; on the H100, 17+ rows in tiles of 32/64 summed them in
# another order (session 16: tests/test_kernels.py's batch-independence check failed there)
FUSED_LN_MAX_ROWS = 16


def available(device: torch.device) -> bool:
    """The engine's default: fused kernels on CUDA when triton is importable. (On the CPU they run only in the
    Triton interpreter, TRITON_INTERPRET=1, which tests ask for explicitly with ``Engine(..., fused=True)``.)"""
    if os.environ.get("LSGPT_FUSED", "1") == "0" or device.type != "cuda":
        return False
    try:
        import lsgpt.engine.kernels  # noqa: F401
    except ImportError:  # no triton (CPU-only torch builds)
        return False
    return True


class FusedForward:
    """Callable ``(tokens [B,T], positions [B,T], cache, last) -> fp32 logits`` for a GPT or QuantGPT."""

    def __init__(self, model, variants: bool = True):
        """`variants`=False: without the opt-in LSGPT_FUSED_LN/_FFN/_ATTN whatever the environment says (the
        engine's fallback when they fail their load check)."""
        from lsgpt.engine import kernels

        self.k = kernels
        self.model, self.cfg = model, model.cfg
        self.int8 = model.cfg.quantized  # QuantGPT (int8 file), else GPT
        chunked, hd = model.cfg.hidden % kernels.STAT_CHUNK == 0, model.cfg.head_dim  # rows in whole partials
        self.fuse_ln = variants and os.environ.get("LSGPT_FUSED_LN", "0") == "1" and chunked and kernels.ln_in_fits()
        self.fuse_ffn = variants and os.environ.get("LSGPT_FUSED_FFN", "0") == "1" and self.int8 and chunked
        self.fuse_attn = (variants and os.environ.get("LSGPT_FUSED_ATTN", "0") == "1" and self.int8 and chunked
                          and hd >= 32 and hd & (hd - 1) == 0)  # int8 dots on a GPU: K (the head size) >= 32
        # kernels.ffn's / attention_block's int32 sums and counter, zero between launches (one set, shared: each
        # launch leaves it zero, and a graph replays the same buffers)
        self.scratch = (kernels.ffn_scratch(model.cfg.hidden, model.device) if self.fuse_ffn or self.fuse_attn
                        else None)
        if self.int8:
            self.layers = [self._int8_layer(w, sc) for w, sc in zip(model.layers, model.scales)]
        else:
            self.layers = [self._fp_layer(w) for w in model.layers]
        c = self.cfg
        # the split attention programs' counters (zero between launches), one buffer a CUDA graph can replay
        self.sem = torch.zeros(2 * kernels.sm_count(), dtype=torch.int32, device=model.device)
        if self.int8:
            hs = model.head_scales
            self.embed_scale = hs.embed_deq
            self.head = dict(w=model.lm_head.w, ln=(*model.ln_f, c.layer_norm_eps), in_scale=hs.ln_in,
                             alpha=hs.alpha, deq_scale=hs.deq)
        else:
            self.embed_scale = 1.0
            self.head = dict(w=model.wte.t(), ln=(*model.ln_f, c.layer_norm_eps))

    def _fp_layer(self, w: dict) -> dict:
        eps, hd = self.cfg.layer_norm_eps, self.cfg.head_dim
        return dict(
            qkv=dict(w=w["multihead_project_kernel_qkv"], bias=w["multihead_project_bias_qkv"],
                     ln=(w["multihead_norm_scale"], w["multihead_norm_bias"], eps)),
            attn=dict(score_scale=1 / math.sqrt(hd)),
            out=dict(w=w["multihead_project_kernel_output"], bias=w["multihead_project_bias_output"]),
            ffn1=dict(w=w["ffn_first_kernel"], bias=w["ffn_first_bias"], gelu=True,
                      ln=(w["ffn_norm_scale"], w["ffn_norm_bias"], eps)),
            ffn2=dict(w=w["ffn_second_kernel"], bias=w["ffn_second_bias"]),
        )

    def _int8_layer(self, w: dict, sc: LayerScales) -> dict:
        """One layer's launch arguments: its int8 weights and the constants of its LayerScales."""
        eps, hd = self.cfg.layer_norm_eps, self.cfg.head_dim
        s = sc.kv_deq  # q, k, v share one scale
        return dict(
            qkv=dict(w=w["multihead_project_kernel_qkv"].w, bias=w["multihead_project_bias_qkv"],
                     ln=(w["multihead_norm_scale"], w["multihead_norm_bias"], eps), in_scale=sc.ln1_in,
                     alpha=sc.qkv_alpha, deq_scale=sc.qkv_deq, out_scale=sc.kv_in),
            attn=dict(score_scale=s * s / math.sqrt(hd), v_scale=s, out_scale=sc.ctx_in),
            out=dict(w=w["multihead_project_kernel_output"].w, bias=w["multihead_project_bias_output"],
                     alpha=sc.out_alpha, deq_scale=sc.out_deq),
            ffn1=dict(w=w["ffn_first_kernel"].w, bias=w["ffn_first_bias"], gelu=True,
                      ln=(w["ffn_norm_scale"], w["ffn_norm_bias"], eps), in_scale=sc.ln2_in,
                      alpha=sc.ffn1_alpha, deq_scale=sc.ffn1_deq, out_scale=sc.act_in),
            # FFN2 keeps int32 sums (no requantization), dequantized into the residual (LightSeq)
            ffn2=dict(w=w["ffn_second_kernel"].w, bias=w["ffn_second_bias"], deq_scale=sc.ffn2_deq),
        )

    CHECK_INT8_STEPS = 8.0

    def variant(self, B: int, T: int, R: int, cache_len: int | None = None) -> tuple:
        """What decides which compiled kernel variants a forward over B×T tokens with R logit rows, into a cache
        of cache_len positions (None: T, a prefill's scratch cache), launches: each GEMM's tiles and launch
        options, the attention split, and Triton's specialisation of integer arguments (equal to 1, divisible by
        16). Forwards with equal keys compile nothing new (the served model's warm-up runs one forward per key,
        so no request waits for a compile)."""
        k, c = self.k, self.cfg
        M, H = B * T, c.hidden

        def ints(*v: int) -> tuple:
            return tuple((x == 1, x % 16 == 0) for x in v)

        def gemm(m: int, N: int, K: int) -> tuple:
            tiles, pdl, prefetch = k.gemm_plan(m, N, K, self.int8)
            return tiles, ints(m), pdl, prefetch

        return (gemm(M, 3 * H, H), gemm(M, H, H), gemm(M, c.inner, H), gemm(M, H, c.inner), gemm(R, c.vocab, H),
                k.attention_plan(M, c.n_head, cache_len or T, self.int8), ints(M, T), self._ln_fused(M),
                self._ffn_fused(M), self._attn_fused(B, T))

    def _ln_fused(self, rows: int) -> bool:
        return self.fuse_ln and rows <= FUSED_LN_MAX_ROWS

    def _ffn_fused(self, rows: int) -> bool:
        return self.fuse_ffn and rows <= self.k.FFN_MAX_ROWS

    def _attn_fused(self, B: int, T: int) -> bool:
        return self.fuse_attn and T == 1 and B <= self.k.ATTN_BLOCK_MAX_ROWS

    @property
    def variants(self) -> list[str]:
        """The opt-in variants on (their environment variables)."""
        on = (("LSGPT_FUSED_LN", self.fuse_ln), ("LSGPT_FUSED_FFN", self.fuse_ffn), ("LSGPT_FUSED_ATTN", self.fuse_attn))
        return [name for name, v in on if v]

    @torch.inference_mode()
    def check_against(self, reference) -> None:
        """Load-time self-check (compiles the small-batch kernels too): a short prompt and one decode step after it
        through these kernels and through `reference(tokens, positions, cache)`; RuntimeError if they cannot run
        or disagree grossly
        (int8: mean difference above CHECK_INT8_STEPS steps of the logits clip; fp: above 5% of the logit range).
        Rounding differences (requantization flips carried through the layers) pass; the limit's reasons are in
        docs/decisions.md. It catches kernels that cannot run or return garbage, not subtle errors:
        those are for the GPU tests, which compare every logit with the CPU integer path."""
        c, m = self.cfg, self.model
        tokens = (torch.arange(1, 6, device=m.device) * 7919 % c.vocab)[None]  # 4 tokens, then 1, batch 1
        positions = torch.arange(5, device=m.device)[None]
        mine, theirs = m.new_cache(1, 5), m.new_cache(1, 5)
        # the prefill, then a decode step: the two take other kernels (the attention block runs in decode only)
        got = torch.cat([self(tokens[:, s], positions[:, s], mine).float() for s in (slice(0, 4), slice(4, 5))])
        want = torch.cat([reference(tokens[:, s], positions[:, s], theirs).float() for s in (slice(0, 4), slice(4, 5))])
        if not torch.isfinite(got).all():
            raise RuntimeError("fused kernels produced non-finite logits")
        if self.int8:
            diff, limit = (got - want).abs().mean().item() / m.head_scales.deq, self.CHECK_INT8_STEPS
            what = f"mean difference {diff:.2f} steps of the logits clip (limit {limit})"
        else:
            diff, limit = (got - want).abs().max().item(), 0.05 * max(1.0, want.abs().max().item())
            what = f"max difference {diff:.3g} (limit {limit:.3g})"
        if not diff <= limit:
            raise RuntimeError(f"fused kernels disagree with the reference path on a 4+1-token check: {what}")

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache, last: torch.Tensor | None = None):
        """Logits [R, V] (fp32) of the flat rows `last` of the B·T rows (None: all rows)."""
        k, c, m = self.k, self.cfg, self.model
        B, T = tokens.shape
        M, H, dev = B * T, c.hidden, tokens.device
        act = torch.int8 if self.int8 else m.dtype
        # the kernels index tokens and positions as dense [M] arrays: reshape alone can return a stride-0 view
        # (one position expanded over B one-token rows, as a prefill of several 1-token prompts has), whose
        # row m > 0 the kernels would read past the end of (a garbage position, or an illegal address)
        tok, pos = tokens.reshape(M).contiguous(), positions.reshape(M).contiguous()
        # the residual stream stays fp32 (LightSeq: fp16): int8 logits then agree with the CPU integer path (fp32
        # throughout) instead of drifting across rounding steps (docs/decisions.md)
        # LayerNorm partials (LSGPT_FUSED_LN): s1 of x before each LN1 and ln_f, s2 of x before each LN2; None:
        # each LayerNorm is a launch of its own
        s1, s2 = (k.stats_buffer(M, H, dev), k.stats_buffer(M, H, dev)) if self._ln_fused(M) else (None, None)
        x = k.embed(tok, pos, m.wte, m.wpe, torch.empty(M, H, dtype=torch.float32, device=dev), c.pad_id,
                    self.embed_scale, stats_out=s1)
        q = torch.empty(M, H, dtype=act, device=dev)
        ctx = torch.empty(M, H, dtype=act, device=dev)
        h = torch.empty(M, c.inner, dtype=act, device=dev)
        attn_fused, ffn_fused = self._attn_fused(B, T), self._ffn_fused(M)
        for i, L in enumerate(self.layers):
            if attn_fused:  # LN1, QKV, attention, W_out and the residual in one launch
                k.attention_block(x, cache.k[i], cache.v[i], pos, c.n_head, self.scratch, qkv=L["qkv"],
                                  attn=L["attn"], out=L["out"], ln_stats=s1, stats_out=s2)
            else:
                k.linear(x, out=q, kv=(cache.k[i], cache.v[i], pos, T), ln_stats=s1, **L["qkv"])
                k.attention(q, cache.k[i], cache.v[i], pos, T, c.n_head, ctx, sem=self.sem, **L["attn"])
                k.linear(ctx, out=x, residual=x, stats_out=s2, **L["out"])
            if ffn_fused:  # LN2, FFN1, FFN2 and the residual in one launch
                f1, f2 = L["ffn1"], L["ffn2"]
                k.ffn(x, f1["w"], f2["w"], self.scratch, ln=f1["ln"], in_scale=f1["in_scale"], alpha=f1["alpha"],
                      deq_scale=f1["deq_scale"], b1=f1["bias"], out_scale=f1["out_scale"], deq_scale2=f2["deq_scale"],
                      b2=f2["bias"], ln_stats=s2, stats_out=s1)
            else:
                k.linear(x, out=h, ln_stats=s2, **L["ffn1"])
                k.linear(h, out=x, residual=x, stats_out=s1, **L["ffn2"])
        if last is not None:
            x, s1 = x[last], None if s1 is None else s1[:, last]
        return k.linear(x, out=torch.empty(x.shape[0], c.vocab, dtype=torch.float32, device=dev), ln_stats=s1,
                        **self.head)
