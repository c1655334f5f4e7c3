"""LightSeq's int8 ``QuantGpt`` dataflow (docs/format.md §6) with real integer matrix products.

Every GEMM multiplies int8 activations by int8 weights into exact int32 sums:
  * CUDA: ``torch._int_mm`` (cuBLASLt int8, rows padded to > 16 as it requires);
  * CPU:  FBGEMM's int8 kernels through ``quantized::linear_dynamic``. Its u8×s8 AVX2 path saturates int16
          pair sums for 8-bit activations, so a signed activation a is split into a⁺ = max(a,0) and
          a⁻ = max(-a,0) (both 7-bit) stacked as rows, plus one row holding 127 that pins the dynamic
          scale to exactly 1: the kernel then returns exact integer sums, and a·W = a⁺·W − a⁻·W.
The rest follows LightSeq: round-half-up ``floor(x·127/c + 0.5)`` clamped to ±127 at every quantization
point, int8 GEMM outputs requantized with ``alpha = c_w·c_in / (c_out·127)``, an int8 KV cache, FFN2
output kept as int32 and dequantized into the residual, and int8 logits within ±logits_clip.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from lsgpt.engine.model import KVCache, attend, gelu_tanh, keys_used
from lsgpt.format import LAYER_KERNELS, QMAX, GptConfig, head_scales, layer_arrays, layer_scales, u8_to_i8


def quantize(x: torch.Tensor, scale: float) -> torch.Tensor:
    """LightSeq float2int8 with scale = 127/c: clamp(floor(x·scale + 0.5), ±127), as float32 holding integers."""
    return torch.floor(x.float() * scale + 0.5).clamp_(-QMAX, QMAX)


def q8(x: torch.Tensor, clip: float) -> torch.Tensor:
    """LightSeq float2int8 of x by its clip c: clamp(floor(x·127/c + 0.5), ±127)."""
    return quantize(x, QMAX / clip)


def requant(acc: torch.Tensor, alpha: float) -> torch.Tensor:
    """int32 GEMM sums -> int8 with LightSeq's alpha, as float32 holding integers."""
    return torch.floor(acc * alpha + 0.5).clamp_(-QMAX, QMAX)


def _fbgemm_available() -> bool:
    try:
        torch.backends.quantized.engine = "fbgemm"
        return True
    except RuntimeError:
        return False


class IntGemm:
    """y = a @ W with int8 a [M, K] (float32 holding integers) and int8 W [K, N]; exact int32 sums as float32."""

    def __init__(self, w_i8: torch.Tensor, device: torch.device):
        k, n = w_i8.shape
        self.k, self.n, self.device = k, n, device
        self.backend = "float"  # last resort: float arithmetic on integer values (exact while sums < 2^24)
        self.w: torch.Tensor | None = None  # int8 [K, N], K contiguous, on `device`: what the fused kernels read
        if device.type == "cuda" and k % 8 == 0 and n % 8 == 0:
            self.backend = "cuda_int_mm"
            self.wt = self.w = w_i8.t().contiguous().to(device).t()  # column-major [K, N], as cuBLASLt wants
        elif device.type == "cpu" and _fbgemm_available():
            self.backend = "fbgemm"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # quantized-tensor creation is marked deprecated
                qw = torch._make_per_tensor_quantized_tensor(w_i8.t().contiguous(), 1.0, 0)
                self.packed = torch.ops.quantized.linear_prepack(qw, None)
            self.marker = torch.zeros(1, k)
            self.marker[0, 0] = QMAX
        if self.backend == "float":
            self.wf = w_i8.to(device=device, dtype=torch.float32)
        # the fused kernels read self.w whatever this GEMM's own backend: on CUDA (a vocabulary like GPT-2's 50257
        # is no multiple of 8, and without it the LM head lost the whole fast path), and in the interpreter
        if self.w is None and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
            self.w = w_i8.t().contiguous().to(device).t()

    def __call__(self, a: torch.Tensor) -> torch.Tensor:
        m = a.shape[0]
        if self.backend == "fbgemm":
            x = torch.cat([a.clamp(min=0), (-a).clamp_(min=0), self.marker])
            y = torch.ops.quantized.linear_dynamic(x, self.packed, True)
            return y[:m] - y[m : 2 * m]
        if self.backend == "cuda_int_mm":
            ai = a.to(torch.int8)
            if m <= 16:  # cuBLASLt int8 path needs more than 16 rows
                ai = F.pad(ai, (0, 0, 0, 32 - m))
            return torch._int_mm(ai, self.wt)[:m].float()
        return a.float() @ self.wf


class QuantGPT:
    """int8 GPT-2 over the datasets of a ``QuantGpt`` HDF5 file. Residual stream in fp32 (CPU) / fp16 (CUDA)."""

    def __init__(self, cfg: GptConfig, arrays: dict[str, np.ndarray], device: torch.device, dtype: torch.dtype):
        self.cfg, self.device, self.dtype = cfg, device, dtype
        h, v = cfg.hidden, cfg.vocab

        def f(a) -> torch.Tensor:
            return torch.from_numpy(np.asarray(a, dtype=np.float32)).to(device=device, dtype=dtype)

        emb_i8 = torch.from_numpy(u8_to_i8(arrays["src_embedding/token_embedding"]).reshape(h, v))
        self.emb_clip = float(arrays["src_embedding/emb_clip_max"])
        self.out_ln_clip = float(arrays["src_embedding/output_ln_clip_max"])
        self.logits_clip = float(arrays["src_embedding/logits_clip_max"])
        self.wte = emb_i8.t().contiguous().to(device)  # [V, H] int8 rows for the lookup
        self.lm_head = IntGemm(emb_i8, device)  # [H, V]
        self.wpe = f(arrays["src_embedding/position_embedding"]).view(cfg.max_step, h)
        self.ln_f = (f(arrays["src_embedding/norm_scale"]), f(arrays["src_embedding/norm_bias"]))
        self.head_scales = head_scales(self.emb_clip, self.out_ln_clip, self.logits_clip)
        self.layers, self.scales = [], []  # per layer: weights by dataset name; quantization constants (LayerScales)
        for i in range(cfg.n_layer):
            la = layer_arrays(cfg, arrays, i)
            w: dict = {n: IntGemm(torch.from_numpy(u8_to_i8(la[n])), device) for n in LAYER_KERNELS}
            clips = {n: float(la[n]) for n in la if n.endswith("_clip_max")}
            w.update(clips)
            w.update({n: f(la[n]) for n in la if n.endswith(("_bias", "_scale", "_bias_qkv", "_bias_output"))})
            self.layers.append(w)
            self.scales.append(layer_scales(clips))

    def new_cache(self, batch: int, length: int) -> KVCache:
        c = self.cfg
        return KVCache.empty(c.n_layer, batch, length, c.n_head, c.head_dim, torch.int8, self.device)

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.wte[tokens].to(self.dtype) * self.head_scales.embed_deq + self.wpe[positions]
        return x.masked_fill((tokens == self.cfg.pad_id)[..., None], 0.0) if self.cfg.pad_id < self.cfg.vocab else x

    def forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, observe=None, static: bool = False
    ) -> torch.Tensor:
        """tokens, positions [B, T] -> ln_f output [B, T, H]."""
        c = self.cfg
        eps, h, dt = c.layer_norm_eps, c.hidden, self.dtype
        B, T = tokens.shape
        x = self.embed(tokens, positions)
        n = keys_used(positions, cache.k[0].shape[1], static)
        for i, (w, sc) in enumerate(zip(self.layers, self.scales)):
            # attention
            a = quantize(F.layer_norm(x, (h,), w["multihead_norm_scale"], w["multihead_norm_bias"], eps), sc.ln1_in)
            acc = w["multihead_project_kernel_qkv"](a.view(B * T, h))
            qkv = requant(acc, sc.qkv_alpha) * sc.qkv_deq + w["multihead_project_bias_qkv"].float()
            qkv = quantize(qkv, sc.kv_in).view(B, T, 3, c.n_head, c.head_dim)
            cache.write(i, positions, qkv[:, :, 1].to(torch.int8), qkv[:, :, 2].to(torch.int8))
            s = sc.kv_deq  # int8 Q, K, V share one scale; dequantized values are exact multiples of it
            k, v = cache.k[i][:, :n].to(dt) * s, cache.v[i][:, :n].to(dt) * s
            ctx = attend((qkv[:, :, 0] * s).to(dt), k, v, positions).reshape(B * T, h)
            acc = w["multihead_project_kernel_output"](quantize(ctx, sc.ctx_in))
            o = requant(acc, sc.out_alpha) * sc.out_deq + w["multihead_project_bias_output"].float()
            x = x + o.to(dt).view(B, T, h)
            # feed-forward
            m = quantize(F.layer_norm(x, (h,), w["ffn_norm_scale"], w["ffn_norm_bias"], eps), sc.ln2_in).view(B * T, h)
            m = requant(w["ffn_first_kernel"](m), sc.ffn1_alpha) * sc.ffn1_deq + w["ffn_first_bias"].float()
            m = quantize(gelu_tanh(m), sc.act_in)
            acc = w["ffn_second_kernel"](m)  # int32 output, no requantization (LightSeq)
            f2 = acc * sc.ffn2_deq + w["ffn_second_bias"].float()
            x = x + f2.to(dt).view(B, T, h)
        return F.layer_norm(x, (h,), self.ln_f[0], self.ln_f[1], eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """int8(ln_f out) x int8(embedding) -> int8 logits, dequantized by logits_clip/127 (float32)."""
        shape, hs = hidden.shape[:-1], self.head_scales
        a = quantize(hidden.reshape(-1, self.cfg.hidden), hs.ln_in)
        return (requant(self.lm_head(a), hs.alpha) * hs.deq).view(*shape, self.cfg.vocab)
