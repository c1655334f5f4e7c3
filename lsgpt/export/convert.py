"""HF GPT-2 checkpoint -> LightSeq GPT HDF5 (fp16 ``Gpt`` or int8 ``QuantGpt``).

Sources: a ``GPT2LMHeadModel`` instance, a checkpoint folder (config.json + model.safetensors or
pytorch_model.bin), or one of those weight files with config.json beside it. int8 needs the clips that
quantization-aware training stores (names in lsgpt.format); without them, ``calibrate_text`` fills the
activation clips from real text (post-training calibration, max |x| at each clip point).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from lsgpt.format import (
    CLIP_PREFIX_EMB,
    CLIP_PREFIX_LAYER,
    HF_LAYER_MAP,
    LAYER_ACT_CLIPS,
    LAYER_KERNELS,
    LAYER_VECTORS,
    LOGITS_CLIP,
    MAX_STEP_LIMIT,
    WEIGHT_CLIP,
    FormatError,
    GptConfig,
    quantize_u8,
    write_hdf5,
)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


# ---------------------------------------------------------------------------------------------
# Loading a checkpoint


def load_checkpoint(src) -> tuple[dict, dict[str, torch.Tensor], Path | None]:
    """-> (config dict, state dict of float32 tensors, checkpoint folder or None)."""
    if isinstance(src, torch.nn.Module):
        return src.config.to_dict(), {k: v.detach().float().cpu() for k, v in src.state_dict().items()}, None
    path = Path(src)
    if path.is_dir():
        folder = path
        weights = next((path / f for f in WEIGHT_FILES if (path / f).is_file()), None)
        if weights is None:
            raise FormatError(f"{path}: no {' or '.join(WEIGHT_FILES)} in the checkpoint folder")
    elif path.is_file():
        folder, weights = path.parent, path
    elif path.name in WEIGHT_FILES and path.parent.is_dir():
        # the article names pytorch_model.bin; HF's Trainer writes model.safetensors: take what the folder has
        folder = path.parent
        weights = next((folder / f for f in WEIGHT_FILES if (folder / f).is_file()), None)
        if weights is None:
            raise FormatError(f"checkpoint not found: {path} (and no {' or '.join(WEIGHT_FILES)} in {folder})")
    else:
        raise FormatError(f"checkpoint not found: {path}")
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise FormatError(f"{folder}: config.json not found beside the weights (the exporter needs it)")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"{cfg_file}: not valid JSON ({e})") from None
    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(weights))
        else:
            sd = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt pickle / safetensors header
        raise FormatError(f"{weights}: cannot read weights ({type(e).__name__}: {e})") from None
    if not isinstance(sd, Mapping):
        raise FormatError(f"{weights}: expected a state dict, got {type(sd).__name__}")
    return config, {k: v.float() for k, v in sd.items() if torch.is_tensor(v)}, folder


def _strip(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept both GPT2LMHeadModel ("transformer.h.0...") and GPT2Model ("h.0...") key styles."""
    if any(k.startswith("transformer.") for k in sd):
        return sd
    return {"transformer." + k: v for k, v in sd.items()}


def _n_positions(config: dict):
    return config.get("n_positions", config.get("n_ctx"))


def gpt_config(config: dict, max_step: int, quantize: bool, **conf) -> GptConfig:
    """Check an HF config is GPT-2 and build the LightSeq model config."""
    mt = config.get("model_type")
    if mt != "gpt2":
        raise FormatError(f"not a GPT-2 checkpoint: config.json model_type={mt!r} (expected 'gpt2')")
    h, n_head, n_layer = config.get("n_embd"), config.get("n_head"), config.get("n_layer")
    vocab, n_pos = config.get("vocab_size"), _n_positions(config)
    if not all(isinstance(x, int) and x > 0 for x in (h, n_head, n_layer, vocab, n_pos)):
        raise FormatError("config.json lacks positive n_embd / n_head / n_layer / vocab_size / n_positions")
    if h % n_head:
        raise FormatError(f"n_head={n_head} does not divide the hidden size n_embd={h}")
    if not 1 <= max_step <= n_pos:
        raise FormatError(f"-l/max_step={max_step} must be in 1..n_positions={n_pos}")
    if max_step > MAX_STEP_LIMIT:
        raise FormatError(f"-l/max_step={max_step} exceeds LightSeq's limit {MAX_STEP_LIMIT}")
    act = config.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise FormatError(f"activation_function={act!r}: LightSeq GPT computes tanh GELU (gelu_new) only")
    eos = conf.pop("eos_id", None)
    if eos is None:
        eos = config.get("eos_token_id")
        if not isinstance(eos, int) or not 0 < eos < vocab:
            eos = vocab - 1  # the demo's choice when the config's EOS does not belong to this vocabulary
    pad = config.get("pad_token_id")
    pad = pad if isinstance(pad, int) and 0 <= pad < vocab and pad != eos else vocab
    cfg = GptConfig(
        n_layer=n_layer,
        n_head=n_head,
        hidden=h,
        inner=config.get("n_inner") or 4 * h,
        vocab=vocab,
        max_step=max_step,
        eos_id=eos,
        pad_id=pad,
        quantized=quantize,
        layer_norm_eps=config.get("layer_norm_epsilon", 1e-5),
        **conf,
    )
    cfg.check()
    return cfg


def _get(sd: dict[str, torch.Tensor], key: str, shape: tuple[int, ...]) -> np.ndarray:
    if key not in sd:
        raise FormatError(f"weight {key} missing from the checkpoint")
    t = sd[key]
    if tuple(t.shape) != shape:
        raise FormatError(f"weight {key} has shape {tuple(t.shape)}, expected {shape}")
    return _finite(key, t.numpy().astype(np.float32))


def _finite(key: str, a: np.ndarray) -> np.ndarray:
    if not np.isfinite(a).all():
        raise FormatError(f"weight {key} contains NaN or Inf: the checkpoint is damaged or training diverged")
    return a


def float_arrays(cfg: GptConfig, sd: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """All datasets in float form, named as in the HDF5 file, kernels [in, out]."""
    h, i, v = cfg.hidden, cfg.inner, cfg.vocab
    sd = _strip(sd)
    out = {
        "src_embedding/token_embedding": _get(sd, "transformer.wte.weight", (v, h)),
        "src_embedding/position_embedding": None,
        "src_embedding/norm_scale": _get(sd, "transformer.ln_f.weight", (h,)),
        "src_embedding/norm_bias": _get(sd, "transformer.ln_f.bias", (h,)),
    }
    wpe = sd.get("transformer.wpe.weight")
    if wpe is None or wpe.ndim != 2 or wpe.shape[1] != h or wpe.shape[0] < cfg.max_step:
        raise FormatError(f"transformer.wpe.weight missing or smaller than [{cfg.max_step}, {h}]")
    out["src_embedding/position_embedding"] = _finite("transformer.wpe.weight", wpe[: cfg.max_step].numpy().astype(np.float32))
    for layer in range(cfg.n_layer):
        for name, hf in HF_LAYER_MAP.items():
            shape = LAYER_KERNELS[name](h, i) if name in LAYER_KERNELS else (LAYER_VECTORS[name](h, i),)
            out[f"encoder_stack/{layer}/{name}"] = _get(sd, f"transformer.h.{layer}.{hf}", shape)
    if any(k.startswith(f"transformer.h.{cfg.n_layer}.") for k in sd):
        raise FormatError(f"checkpoint has more layers than n_layer={cfg.n_layer}")
    return out


# ---------------------------------------------------------------------------------------------
# int8


def trained_clips(cfg: GptConfig, sd: dict[str, torch.Tensor]) -> dict[str, float] | None:
    """Clips stored by QAT (lsgpt.training.qat), keyed by HDF5 dataset name; None when the checkpoint has none."""
    sd = _strip(sd)
    keys = {f"src_embedding/{n}": CLIP_PREFIX_EMB + n for n in ("emb_clip_max", "output_ln_clip_max")}
    for layer in range(cfg.n_layer):
        for n in LAYER_ACT_CLIPS:
            keys[f"encoder_stack/{layer}/{n}"] = CLIP_PREFIX_LAYER.format(i=layer) + n
    present = [k for k in keys.values() if k in sd]
    if not present:
        return None
    missing = [k for k in keys.values() if k not in sd]
    if missing:
        raise FormatError(f"checkpoint has some quantization clips but not {missing[0]} (and {len(missing) - 1} more)")
    return {name: float(sd[key].reshape(-1)[0]) for name, key in keys.items()}


@torch.inference_mode()
def calibrate(cfg: GptConfig, arrays: dict[str, np.ndarray], token_rows: list[list[int]]) -> dict[str, float]:
    """Post-training calibration: max |x| at each activation clip point over the given token rows."""
    from lsgpt.engine.model import GPT

    fcfg = GptConfig(**{**cfg.to_dict(), "quantized": False})
    model = GPT(fcfg, arrays, torch.device("cpu"), torch.float32)
    stats: dict[str, float] = {}

    def observe(layer: int, name: str, t: torch.Tensor) -> None:
        key = f"src_embedding/{name}" if layer < 0 else f"encoder_stack/{layer}/{name}"
        stats[key] = max(stats.get(key, 0.0), float(t.abs().max()))

    for row in token_rows:
        row = row[: cfg.max_step]
        t = torch.tensor([row])
        model.forward(t, torch.arange(len(row))[None], model.new_cache(1, len(row)), observe)
    clips = {k: max(v, 1e-3) for k, v in stats.items()}
    clips["src_embedding/emb_clip_max"] = float(np.abs(arrays["src_embedding/token_embedding"]).max())
    return clips


def quantize_arrays(cfg: GptConfig, fa: dict[str, np.ndarray], clips: Mapping[str, float]) -> dict[str, np.ndarray]:
    """Float datasets + clips -> the QuantGpt datasets (uint8 zero point 127, embedding [H, V])."""
    out = dict(fa)
    emb_clip = clips["src_embedding/emb_clip_max"]
    out["src_embedding/token_embedding"] = quantize_u8(fa["src_embedding/token_embedding"], emb_clip).T.copy()
    out["src_embedding/emb_clip_max"] = np.float64(emb_clip)
    out["src_embedding/output_ln_clip_max"] = np.float64(clips["src_embedding/output_ln_clip_max"])
    out["src_embedding/logits_clip_max"] = np.float64(LOGITS_CLIP)
    for layer in range(cfg.n_layer):
        p = f"encoder_stack/{layer}/"
        for n in LAYER_KERNELS:
            out[p + n] = quantize_u8(fa[p + n], WEIGHT_CLIP)
            out[p + n + "_clip_max"] = np.float64(WEIGHT_CLIP)
        for n in LAYER_ACT_CLIPS:
            out[p + n] = np.float64(clips[p + n])
    return out


# ---------------------------------------------------------------------------------------------
# Entry point


def max_step_that_fits(src) -> int | None:
    """The largest -l a checkpoint can take: its n_positions, at most LightSeq's limit (None if its config.json
    cannot be read: export_model then says why)."""
    path = Path(src)
    folder = path if path.is_dir() else path.parent
    try:
        return min(int(_n_positions(json.loads((folder / "config.json").read_text()))), MAX_STEP_LIMIT)
    except (OSError, ValueError, TypeError):
        return None


def export_model(
    src,
    out_path: str | os.PathLike,
    *,
    max_step: int = 500,
    quantize: bool = False,
    sampling_method: str = "topk",
    topk: int = 1,
    topp: float = 0.75,
    eos_id: int | None = None,
    extra_decode_length: int = 0,
    calibrate_text: str | os.PathLike | None = None,
    tokenizer: str | os.PathLike | None = None,
    calibration_lines: int = 64,
) -> Path:
    """Export `src` to `out_path` atomically; returns the path. Raises FormatError on bad input."""
    config, sd, folder = load_checkpoint(src)
    cfg = gpt_config(
        config,
        max_step,
        quantize,
        sampling_method=sampling_method,
        topk=topk,
        topp=topp,
        eos_id=eos_id,
        extra_decode_length=extra_decode_length,
    )
    arrays = float_arrays(cfg, sd)
    if quantize:
        clips = trained_clips(cfg, sd)
        if clips is None:
            if calibrate_text is None:
                raise FormatError(
                    "the checkpoint has no trained quantization clips (it was not trained with --enable_quant true); "
                    "train it with QAT, or pass --calibrate TEXTFILE for post-training calibration"
                )
            rows = _calibration_rows(calibrate_text, tokenizer or folder, calibration_lines, cfg)
            clips = calibrate(cfg, arrays, rows)
        arrays = quantize_arrays(cfg, arrays, clips)
    return write_hdf5(out_path, cfg, arrays)


def _calibration_rows(text_file, tokenizer, n_lines: int, cfg: GptConfig) -> list[list[int]]:
    from lsgpt.text import encode_paragraph, load_tokenizer

    if tokenizer is None:
        raise FormatError("--calibrate needs a tokenizer: a checkpoint folder with vocab.txt, or -p")
    path = Path(text_file)
    if not path.is_file():
        raise FormatError(f"calibration text not found: {path}")
    try:
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()][:n_lines]
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: not UTF-8 text ({e})") from None
    if not lines:
        raise FormatError(f"{path}: no text to calibrate on")
    try:
        tok = load_tokenizer(tokenizer)
    except (OSError, ValueError) as e:
        raise FormatError(str(e)) from None
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "sequence longer than the model max length": we chunk it below
    try:
        encoded = [encode_paragraph(tok, ln) for ln in lines]
    finally:
        transformers.logging.set_verbosity(verbosity)
    rows = [r[i : i + cfg.max_step] for r in encoded for i in range(0, len(r), cfg.max_step)]
    if any(max(r) >= cfg.vocab for r in rows):
        raise FormatError(f"tokenizer {tokenizer} produces ids beyond the model's vocabulary ({cfg.vocab})")
    return rows
