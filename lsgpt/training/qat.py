"""Quantization-aware training (QAT) for GPT-2, with LightSeq's int8 numerics.

Fake quantization is LightSeq's (``pytorch_quantization/tensor_quant.py``, ``nn/modules/clip.py``):

    s = amax / 127;  q = clamp(floor(x / s + 0.5), -127, 127);  out = q * s

Backward: a straight-through estimator masked to the clip range. Where amax is learned (PACT-style, as
LightSeq's ``Clip``), the gradient of every clipped element goes to amax instead: +g above amax, -g below
-amax. Fixed clips (weights at 1.0, logits at 16) get no gradient.

Quantizers sit exactly at the clip points of the int8 ``QuantGpt`` format (``format.LAYER_ACT_CLIPS``,
``format.EMB_CLIPS_INT8``; docs/format.md §4/§6), so the learned clips export 1:1:

    wte (emb_clip_max) -> lookup + tied LM head
    per layer:  LN1 -> [multihead_ln] -> c_attn(W@1.0) -> [multihead_qkv_dense] -> +b -> [self_qkv_bias_out, frozen]
                -> attention -> [multihead_project_output] -> c_proj(W@1.0) -> [multihead_output_dense] -> +b
                LN2 -> [ffn_ln] -> c_fc(W@1.0) -> [ffn_first_output] -> +b -> GELU -> [ffn_first_act]
                -> mlp.c_proj(W@1.0) -> +b  (FFN2 output not quantized)
    ln_f -> [output_ln_clip_max] -> logits -> [fixed 16]

The model is a ``GPT2LMHeadModel`` subclass with the same parameter names plus the clips, kept at
``transformer.h.{i}.ls_clips.<name>`` and ``transformer.ls_clips.<name>``. ``save_pretrained`` and
``from_pretrained`` work; a plain ``GPT2LMHeadModel`` loads the same weights (the clips are then
unexpected keys it ignores). With quantization disabled the forward pass equals HF's.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

from lsgpt.format import (
    ACT_CLIP_INIT,
    CLIP_PREFIX_EMB,
    CLIP_PREFIX_LAYER,
    EMB_CLIP_INIT,
    FROZEN_ACT_CLIPS,
    LAYER_ACT_CLIPS,
    LOGITS_CLIP,
    QMAX,
    WEIGHT_CLIP,
)

try:  # transformers >= 5: init helpers that leave weights loaded from a checkpoint alone
    from transformers import initialization as _hf_init
except ImportError:  # pragma: no cover - transformers 4.x
    _hf_init = None

EMB_CLIPS = {"emb_clip_max": EMB_CLIP_INIT, "output_ln_clip_max": ACT_CLIP_INIT}
CONFIG_FLAG = "ls_quant"  # config.json key: True for a QAT checkpoint (quantizers on)


# ---------------------------------------------------------------------------------------------
# Fake quantization.


def _quantize(x: torch.Tensor, amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fake-quantized x in x's dtype, fp32 x, fp32 amax). fp32 arithmetic and operation order as LightSeq's
    _tensor_quant (which upcasts half inputs); pure tensor ops, so torch.compile fuses it into one kernel."""
    a = amax.detach().float()
    scale = a / QMAX
    xf = x.float()
    y = xf / scale
    y.add_(0.5).floor_().clamp_(-QMAX, QMAX).mul_(scale)
    return y.to(x.dtype), xf, a


class _FakeQuantFixed(torch.autograd.Function):
    """LightSeq's TensorQuantFunction: fixed amax, straight-through gradient masked to |x| <= amax.

    Written for few large allocations (on the CPU a fresh 80 MB logits-sized buffer costs more than several
    in-place passes): one output buffer, and a boolean mask instead of the input for backward. No Python-side
    branches on data: torch.compile traces forward and backward as they are (tests/test_qat.py checks it).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
        y, xf, a = _quantize(x, amax)
        ctx.save_for_backward((xf <= a) & (xf >= -a))
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (inside,) = ctx.saved_tensors
        return g * inside, None


class _FakeQuantLearned(torch.autograd.Function):
    """LightSeq's Clip (PACT): strictly inside passes the gradient; above amax it goes to amax (+g), below -amax
    to amax (-g). Backward keeps one int8 code per element (+1 above, -1 below, 0 inside; _clip_code), not two
    boolean masks, and amax's gradient is one reduction, sum(g * code)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
        y, xf, a = _quantize(x, amax)
        ctx.save_for_backward(_clip_code(xf, a))
        return y

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (code,) = ctx.saved_tensors
        grad_a = (g.float() * code).sum()
        return g.masked_fill(code != 0, 0), grad_a.reshape(())


def _clip_code(xf: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """int8 per element: +1 where xf >= a, -1 where xf <= -a, else 0 (a learned clip's backward state)."""
    return (xf >= a).to(torch.int8) - (xf <= -a).to(torch.int8)


def _fake_quant_traced(x: torch.Tensor, amax: torch.Tensor, learn: bool) -> torch.Tensor:
    """The two autograd.Functions above as plain differentiable ops, for torch.compile: the same values (the
    quantized tensor plus terms that are exactly zero) and the same gradients (the zero terms carry them: x's
    masked straight-through gradient and, for a learned clip, PACT's sum to amax). Traced graphs need no
    custom autograd.Function, whose compiled backward some torch versions drop (2.11 gave zero gradients).
    A learned clip's backward reads one int8 code per element (the partitioner saves it, 1 byte, instead of
    two boolean masks) and reduces g * code once for amax."""
    with torch.no_grad():
        y, xf, a = _quantize(x, amax)
        if learn:
            code = _clip_code(xf, a)
            inside = code == 0
        else:
            inside = (xf <= a) & (xf >= -a)
    z = torch.where(inside, x, 0.0)
    y = y + (z - z.detach())
    if learn:
        za = amax * code
        y = y + (za - za.detach()).to(x.dtype)
    return y


_CONSTANTS: dict[tuple[float, torch.device], torch.Tensor] = {}


def _constant(value: float, device: torch.device) -> torch.Tensor:
    """Fixed clips as cached device scalars: a fresh torch.tensor(..., device="cuda") per call would be a
    blocking host-to-device copy, dozens per step."""
    key = (value, device)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(value, dtype=torch.float32, device=device)
    return _CONSTANTS[key]


def fake_quant(x: torch.Tensor, amax: torch.Tensor | float, learn: bool | None = None) -> torch.Tensor:
    """Fake-quantize `x` to int8 with clip `amax`.

    `learn` defaults to amax.requires_grad: a trainable clip learns PACT-style, a constant one
    (float, buffer or frozen Parameter) only masks the straight-through gradient.
    """
    if not isinstance(amax, torch.Tensor):
        amax = _constant(float(amax), x.device)
    if learn is None:
        learn = amax.requires_grad and torch.is_grad_enabled()
    if torch.compiler.is_compiling():
        return _fake_quant_traced(x, amax, bool(learn))
    return (_FakeQuantLearned if learn else _FakeQuantFixed).apply(x, amax)


class ClipSet(nn.ParameterDict):
    """Named scalar clips of one place (a layer, or the embeddings); frozen ones don't train."""

    def __init__(self, inits: dict[str, float], frozen: tuple[str, ...] = ()):
        super().__init__({n: nn.Parameter(torch.tensor(float(v)), requires_grad=n not in frozen)
                          for n, v in inits.items()})
        self.inits = dict(inits)
        self.frozen = tuple(frozen)

    def reset(self) -> None:
        with torch.no_grad():
            for n, p in self.items():
                if _hf_init is not None:
                    _hf_init.constant_(p, self.inits[n])  # skips clips loaded from a checkpoint
                else:  # pragma: no cover
                    p.fill_(self.inits[n])


def layer_clip_inits() -> dict[str, float]:
    return {n: ACT_CLIP_INIT for n in LAYER_ACT_CLIPS}


# ---------------------------------------------------------------------------------------------
# The QAT model.


class QuantGPT2LMHeadModel(GPT2LMHeadModel):
    """GPT-2 with LightSeq int8 fake quantizers; `quant=False` (or set_quant(False)) is plain HF GPT-2."""

    def __init__(self, config: GPT2Config):
        super().__init__(config)
        if config.scale_attn_by_inverse_layer_idx or getattr(config, "add_cross_attention", False):
            raise ValueError("LightSeq's GPT has plain 1/sqrt(head_dim) self-attention only")
        for block in self.transformer.h:
            block.ls_clips = ClipSet(layer_clip_inits(), frozen=FROZEN_ACT_CLIPS)
        self.transformer.ls_clips = ClipSet(EMB_CLIPS)
        self.quant = bool(getattr(config, CONFIG_FLAG, True))
        self.clips_loaded = False  # from_pretrained: True when the checkpoint held clips (a QAT checkpoint)
        self._observed: dict[int, torch.Tensor] | None = None  # calibration: id(clip) -> max |x| seen at it
        setattr(config, CONFIG_FLAG, self.quant)

    def _initialize_missing_keys(self, *args, **kwargs) -> None:
        # from_pretrained of an fp16 checkpoint: the clips are missing and must start at their init values.
        # (HF initializes the `transformer` submodel with GPT2Model's own _init_weights, which skips them;
        # reset() leaves clips that were loaded, flagged _is_hf_initialized, alone.)
        super()._initialize_missing_keys(*args, **kwargs)
        for m in self.modules():
            if isinstance(m, ClipSet):
                m.reset()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, ClipSet):  # transformers 4.x initializes missing keys through here
            module.reset()
            return
        super()._init_weights(module)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        bad = {k: v for k, v in model.clip_state().items() if not (math.isfinite(v) and v > 0)}
        if bad:
            raise ValueError(f"invalid clip values after loading (not finite or <= 0): {dict(list(bad.items())[:4])}")
        # an fp16 (plain GPT-2) checkpoint misses every clip; a QAT checkpoint holds them
        model.clips_loaded = not any(".ls_clips." in k for k in info.get("missing_keys", ()))
        return (model, info) if want_info else model

    def set_quant(self, enabled: bool) -> QuantGPT2LMHeadModel:
        self.quant = bool(enabled)
        setattr(self.config, CONFIG_FLAG, self.quant)
        return self

    def clip_state(self) -> dict[str, float]:
        """Clip values under their state-dict names (what the exporter reads)."""
        out = {CLIP_PREFIX_EMB + n: p.item() for n, p in self.transformer.ls_clips.items()}
        for i, block in enumerate(self.transformer.h):
            out.update({CLIP_PREFIX_LAYER.format(i=i) + n: p.item() for n, p in block.ls_clips.items()})
        return out

    # -- compiled regions (the training fast path) --------------------------------------------

    def compile_regions(self, enabled: bool = True, scope: str = "blocks", **compile_kwargs) -> QuantGPT2LMHeadModel:
        """Train through torch.compile: scope "blocks" (the default) compiles the embedding,
        one block (one graph serves all layers: their weights are graph inputs) and the head + loss separately
        (a short compilation); "model" compiles the whole training forward as one
        graph (one compiled forward and backward per step, fewer host-side calls, a longer compilation). Inductor fuses each fake
        quantizer into the elementwise work around it (LayerNorm, bias, GELU, the loss), which is where eager
        QAT loses its time. Used in training mode without a padding mask; evaluation and padded batches run
        eagerly. Values are the eager ones (the same ops; divisions rounded as eager where this torch's
        inductor can be told to) and so are the gradients (see _fake_quant_traced). With `training_logits`
        False (the fast path sets it) a compiled training step with labels returns the loss and no logits: the
        Trainer reads the loss only, and accelerate's fp16 wrapper would copy the logits to fp32 every step."""
        self._regions = None
        if enabled:
            if scope not in ("model", "blocks"):
                raise ValueError(f"scope must be 'model' or 'blocks', got {scope!r}")
            numerics = getattr(getattr(torch, "_inductor", None), "config", None)
            numerics = getattr(numerics, "eager_numerics", None)
            if numerics is not None and hasattr(numerics, "division_rounding"):
                numerics.division_rounding = True  # x / scale as div.rn (Triton's "/" is approximate)
            if scope == "model":
                self._regions = {"model": torch.compile(self._train_forward, **compile_kwargs)}
            else:
                self._regions = {
                    "embed": torch.compile(self._embed, **compile_kwargs),
                    "block": torch.compile(self._block, **compile_kwargs),
                    "head": torch.compile(self._head, **compile_kwargs),
                }
        return self

    # -- forward ---------------------------------------------------------------------------

    def _q(self, x: torch.Tensor, amax: torch.Tensor | float) -> torch.Tensor:
        """Every quantizer of the forward goes through here: fake quantization, or (observing_clips) a record
        of max |x| at a learned clip and x itself."""
        if self._observed is not None:
            if isinstance(amax, torch.Tensor) and id(amax) in self._observed:
                seen = self._observed[id(amax)]
                torch.maximum(seen, x.detach().abs().amax().float(), out=seen)
            return x
        return fake_quant(x, amax) if self.quant else x

    def learned_clips(self) -> dict[str, nn.Parameter]:
        """The clips QAT learns, by state-dict name: not the frozen ones (nor the weight and logits
        constants, which are no parameters)."""
        out = {CLIP_PREFIX_EMB + n: p for n, p in self.transformer.ls_clips.items()
               if n not in self.transformer.ls_clips.frozen}
        for i, block in enumerate(self.transformer.h):
            out.update({CLIP_PREFIX_LAYER.format(i=i) + n: p for n, p in block.ls_clips.items()
                        if n not in block.ls_clips.frozen})
        return out

    @contextlib.contextmanager
    def observing_clips(self) -> Iterator[dict[str, torch.Tensor]]:
        """Calibration mode: forwards run the quantized model's dataflow with every quantizer off (evaluation
        mode, no gradients) and the yielded dict, {learned clip's name: max |x| at its clip point}, fills in."""
        clips = self.learned_clips()
        stats = {n: torch.zeros((), device=p.device) for n, p in clips.items()}
        was_training, quant = self.training, self.quant
        self._observed = {id(p): stats[n] for n, p in clips.items()}
        self.quant = True  # the quantized dataflow (tied quantized embedding, LM head), through _q
        self.eval()
        try:
            with torch.no_grad():
                yield stats
        finally:
            self._observed, self.quant = None, quant
            self.train(was_training)

    def _embed(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token + position embedding, and (quantizers on) the quantized tied embedding: one copy serves the
        lookup and the LM head (LightSeq shares emb_quant)."""
        tr = self.transformer
        if not self.quant:
            pos = torch.arange(input_ids.shape[1], device=input_ids.device)
            return tr.drop(tr.wte(input_ids) + tr.wpe(pos)), None
        wte = self._q(tr.wte.weight, tr.ls_clips["emb_clip_max"])
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        return tr.drop(F.embedding(input_ids, wte) + tr.wpe(pos)), wte

    def _block(self, block: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        c, attn, mlp, q = block.ls_clips, block.attn, block.mlp, self._q
        b, t, h = x.shape
        nh = attn.num_heads

        # Attention: every GEMM sees quantized inputs and weights; GEMM outputs are quantized before the bias.
        y = q(block.ln_1(x), c["multihead_ln_clip_max"])
        y = q(y @ q(attn.c_attn.weight, WEIGHT_CLIP), c["multihead_qkv_dense_clip_max"]) + attn.c_attn.bias
        y = q(y, c["self_qkv_bias_out_clip_max"])  # int8 K/V cache scale at inference
        qh, kh, vh = (z.view(b, t, nh, h // nh).transpose(1, 2) for z in y.split(h, dim=2))
        y = F.scaled_dot_product_attention(
            qh, kh, vh, attn_mask=mask, is_causal=mask is None,
            dropout_p=attn.attn_dropout.p if self.training else 0.0, scale=attn.scaling,
        )
        y = q(y.transpose(1, 2).reshape(b, t, h), c["multihead_project_output_clip_max"])
        y = q(y @ q(attn.c_proj.weight, WEIGHT_CLIP), c["multihead_output_dense_clip_max"]) + attn.c_proj.bias
        x = x + attn.resid_dropout(y)

        # FFN: FFN2's output is not quantized (LightSeq dequantizes its int32 result straight into the residual).
        y = q(block.ln_2(x), c["ffn_ln_clip_max"])
        y = q(y @ q(mlp.c_fc.weight, WEIGHT_CLIP), c["ffn_first_output_clip_max"]) + mlp.c_fc.bias
        y = q(mlp.act(y), c["ffn_first_act_clip_max"])
        y = y @ q(mlp.c_proj.weight, WEIGHT_CLIP) + mlp.c_proj.bias
        return x + mlp.dropout(y)

    def _head(self, x: torch.Tensor, wte: torch.Tensor | None, labels: torch.Tensor | None, loss_fn,
              keep_logits: bool = True, **loss_kwargs):
        """ln_f, the tied LM head (quantized: LightSeq's QuantLinear with the embedding quantizer), the loss;
        keep_logits=False returns no logits (a compiled training step then neither outputs nor keeps them)."""
        x = self.transformer.ln_f(x)
        if self.quant:
            logits = self._q(F.linear(self._q(x, self.transformer.ls_clips["output_ln_clip_max"]), wte), LOGITS_CLIP)
        else:
            logits = self.lm_head(x)
        loss = None
        if labels is not None:
            loss = loss_fn(logits, labels, vocab_size=self.config.vocab_size, **loss_kwargs)
        return (logits if keep_logits else None), loss

    def _train_forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None, loss_fn, keep_logits: bool = True,
                       **loss_kwargs):
        x, wte = self._embed(input_ids)
        for block in self.transformer.h:
            x = self._block(block, x)
        return self._head(x, wte, labels, loss_fn, keep_logits, **loss_kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithCrossAttentions:
        """Full-sequence forward (training / evaluation; no KV cache). Extra kwargs go to the HF loss
        (e.g. num_items_in_batch from the Trainer)."""
        for unsupported in ("past_key_values", "cache", "inputs_embeds", "token_type_ids"):
            if kwargs.pop(unsupported, None) is not None:
                raise ValueError(f"QuantGPT2LMHeadModel.forward does not support {unsupported}")
        for ignored in ("use_cache", "return_dict", "output_attentions", "output_hidden_states", "position_ids"):
            kwargs.pop(ignored, None)
        b, t = input_ids.shape
        if t > self.config.n_positions:
            raise ValueError(f"sequence length {t} exceeds n_positions={self.config.n_positions}")

        mask = None  # causal via is_causal; padding needs an explicit boolean mask
        if attention_mask is not None and not bool(attention_mask.all()):
            causal = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()
            mask = causal[None, None] & attention_mask[:, None, None, :].bool()
            mask = mask | torch.eye(t, dtype=torch.bool, device=input_ids.device)  # no all-masked rows (NaN)
        # the HF loss (resolved here: its property may log, which a compiled region would break on)
        loss_fn = self.loss_function if labels is not None else None
        regions, keep = getattr(self, "_regions", None), True
        if regions and self.training and mask is None and torch.is_grad_enabled():
            for v in (WEIGHT_CLIP, LOGITS_CLIP):  # made here, eagerly: the compiled graphs read them as inputs
                _constant(float(v), input_ids.device)
            keep = labels is None or getattr(self, "training_logits", True)
            if "model" in regions:
                logits, loss = regions["model"](input_ids, labels, loss_fn, keep, **kwargs)
                return CausalLMOutputWithCrossAttentions(loss=loss, logits=logits)
        else:
            regions = {"embed": self._embed, "block": self._block, "head": self._head}
        x, wte = regions["embed"](input_ids)
        for block in self.transformer.h:
            x = regions["block"](block, x, mask)
        logits, loss = regions["head"](x, wte, labels, loss_fn, keep, **kwargs)
        return CausalLMOutputWithCrossAttentions(loss=loss, logits=logits)


def to_qat(model: GPT2LMHeadModel, quant: bool = True) -> QuantGPT2LMHeadModel:
    """A QAT model holding `model`'s weights (shared config copy); clips at their init values."""
    config = GPT2Config.from_dict(model.config.to_dict())
    setattr(config, CONFIG_FLAG, quant)
    qat = QuantGPT2LMHeadModel(config)
    missing, unexpected = qat.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(".ls_clips." not in k and not k.startswith(CLIP_PREFIX_EMB) for k in missing):
        raise ValueError(f"cannot convert: missing {missing[:5]}, unexpected {unexpected[:5]}")
    qat.tie_weights()
    return qat.to(next(model.parameters()).device)


def calibrate_clips(model: QuantGPT2LMHeadModel, batches: Iterable[dict[str, torch.Tensor]],
                    reduce_max=None) -> dict[str, float]:
    """Set every learned clip to max |x| at its clip point over `batches` (quantizers off), as the exporter's
    post-training calibration does; frozen and fixed clips keep their values. `reduce_max(t)` combines a
    vector of maxima across processes in place (DDP: all-reduce MAX), so every rank sets the same clips.
    -> the values set, by state-dict name."""
    n = 0
    with model.observing_clips() as stats:
        for batch in batches:
            model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
            n += 1
    if n == 0 and reduce_max is None:
        raise ValueError("clip calibration needs at least one batch")
    names = list(stats)
    seen = torch.stack([stats[k] for k in names])
    if reduce_max is not None:
        reduce_max(seen)
    seen = seen.clamp_min(1e-3)  # the exporter's floor: a clip of 0 would divide by zero
    if not bool(torch.isfinite(seen).all()):
        raise ValueError("clip calibration saw non-finite activations")
    clips = model.learned_clips()
    with torch.no_grad():
        for k, v in zip(names, seen):
            clips[k].copy_(v)
    return dict(zip(names, seen.tolist()))


def clip_parameter_names(model: nn.Module) -> list[str]:
    """Names of the trainable clip parameters."""
    return [n for n, p in model.named_parameters() if ".ls_clips." in n and p.requires_grad]


__all__ = [
    "ClipSet",
    "QuantGPT2LMHeadModel",
    "calibrate_clips",
    "fake_quant",
    "to_qat",
    "EMB_CLIPS",
    "CONFIG_FLAG",
    "clip_parameter_names",
]
