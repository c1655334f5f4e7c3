"""GPT-2 forward pass over LightSeq ``Gpt`` weights, with a static KV cache.

Pre-LN blocks, tanh GELU, attention scaled by 1/sqrt(head_dim), learned absolute positions from 0, LM head
tied to the token embedding (no bias). fp32 on CPU, fp16 on CUDA.

Batches of unequal prompts: prompts are right-padded; every row writes its keys/values at its own
positions, and a query at position p may attend keys 0..p of its row. Since a row's positions are
written in order, every key it can see is real, so one mask rule serves prefill and decode alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lsgpt.format import GptConfig, layer_arrays

Observer = Callable[[int, str, torch.Tensor], None]


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


@dataclass
class KVCache:
    """Keys and values per layer, laid out [B, S, heads, head_dim] so a row writes at its own positions."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @classmethod
    def empty(cls, n_layer: int, batch: int, length: int, n_head: int, head_dim: int, dtype, device):
        shape = (batch, length, n_head, head_dim)
        return cls(
            [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)],
            [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)],
        )

    def write(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [B, T, heads, hd] at positions [B, T]."""
        rows = torch.arange(k.shape[0], device=k.device)[:, None].expand_as(positions)
        self.k[layer][rows, positions] = k
        self.v[layer][rows, positions] = v


def causal_mask(positions: torch.Tensor, n_keys: int) -> torch.Tensor:
    """[B, 1, T, n_keys] bool: a query at position p sees keys 0..p of its own row."""
    keys = torch.arange(n_keys, device=positions.device)
    return keys[None, None, None, :] <= positions[:, None, :, None]


def keys_used(positions: torch.Tensor, cache_len: int, static: bool) -> int:
    """How many cache slots attention reads: the used prefix (one host sync per forward), or, for CUDA
    graph capture (`static`), the whole cache, so that shapes stay fixed and the mask alone does the work."""
    return cache_len if static else int(positions.max()) + 1


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """q [B,T,h,d]; k, v [B,S,h,d] (cache prefix); returns context [B,T,h*d]."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(positions, k.shape[2]))
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


class GPT:
    """fp16/fp32 GPT-2 over the datasets of a ``Gpt`` HDF5 file."""

    def __init__(self, cfg: GptConfig, arrays: dict[str, np.ndarray], device: torch.device, dtype: torch.dtype):
        self.cfg, self.device, self.dtype = cfg, device, dtype

        def t(a: np.ndarray, shape=None) -> torch.Tensor:
            a = np.asarray(a, dtype=np.float32)
            return torch.from_numpy(a.reshape(shape) if shape else a).to(device=device, dtype=dtype)

        h, v = cfg.hidden, cfg.vocab
        self.wte = t(arrays["src_embedding/token_embedding"], (v, h))
        # CPU: the tied LM head as a dense [H, V] copy, which BLAS multiplies by faster than by wte.T at decode
        # sizes (docs/decisions.md), for one more copy of the embedding in memory. CUDA keeps the view
        # (cuBLAS takes the transpose as is).
        self.unembed = self.wte.T.contiguous() if device.type == "cpu" else self.wte.T
        self.wpe = t(arrays["src_embedding/position_embedding"], (cfg.max_step, h))
        self.ln_f = (t(arrays["src_embedding/norm_scale"]), t(arrays["src_embedding/norm_bias"]))
        self.layers = []
        for i in range(cfg.n_layer):
            la = layer_arrays(cfg, arrays, i)
            self.layers.append({k: t(a) for k, a in la.items()})

    def new_cache(self, batch: int, length: int) -> KVCache:
        c = self.cfg
        return KVCache.empty(c.n_layer, batch, length, c.n_head, c.head_dim, self.dtype, self.device)

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.wte[tokens] + self.wpe[positions]
        return x.masked_fill((tokens == self.cfg.pad_id)[..., None], 0.0) if self.cfg.pad_id < self.cfg.vocab else x

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        observe: Observer | None = None,
        static: bool = False,
    ) -> torch.Tensor:
        """tokens, positions [B, T] -> final hidden states [B, T, H] (after ln_f).

        `observe(layer, clip_name, tensor)` sees the activation at each int8 clip point (calibration).
        """
        c = self.cfg
        eps, h = c.layer_norm_eps, c.hidden
        obs = observe or (lambda layer, name, t: None)
        x = self.embed(tokens, positions)
        B, T = tokens.shape
        n = keys_used(positions, cache.k[0].shape[1], static)
        for i, w in enumerate(self.layers):
            a = F.layer_norm(x, (h,), w["multihead_norm_scale"], w["multihead_norm_bias"], eps).view(B * T, h)
            obs(i, "multihead_ln_clip_max", a)
            qkv = a @ w["multihead_project_kernel_qkv"]
            obs(i, "multihead_qkv_dense_clip_max", qkv)
            qkv = qkv + w["multihead_project_bias_qkv"]
            obs(i, "self_qkv_bias_out_clip_max", qkv)
            q, k, v = qkv.view(B, T, 3, c.n_head, c.head_dim).unbind(2)
            cache.write(i, positions, k, v)
            ctx = attend(q, cache.k[i][:, :n], cache.v[i][:, :n], positions).reshape(B * T, h)
            obs(i, "multihead_project_output_clip_max", ctx)
            o = ctx @ w["multihead_project_kernel_output"]
            obs(i, "multihead_output_dense_clip_max", o)
            x = x + (o + w["multihead_project_bias_output"]).view(B, T, h)
            m = F.layer_norm(x, (h,), w["ffn_norm_scale"], w["ffn_norm_bias"], eps).view(B * T, h)
            obs(i, "ffn_ln_clip_max", m)
            m = m @ w["ffn_first_kernel"]
            obs(i, "ffn_first_output_clip_max", m)
            m = gelu_tanh(m + w["ffn_first_bias"])
            obs(i, "ffn_first_act_clip_max", m)
            x = x + torch.addmm(w["ffn_second_bias"], m, w["ffn_second_kernel"]).view(B, T, h)
        out = F.layer_norm(x, (h,), self.ln_f[0], self.ln_f[1], eps)
        obs(-1, "output_ln_clip_max", out)
        return out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied LM head: hidden [..., H] -> float32 logits [..., V]."""
        return (hidden @ self.unembed).float()
