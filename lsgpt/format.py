"""LightSeq GPT HDF5 format (``Gpt`` fp16 and ``QuantGpt`` int8): the one source of truth.

Every dataset name, element count, dtype and quantization formula used by the exporter, the engine,
the training code and the tests lives here. Layout and formulas follow LightSeq 3.0.1's loaders
(``gpt_weight.cc``, ``quant_gpt_weight.cc``) as described in ``docs/format.md`` §1–§4.

This module needs only numpy and h5py (no torch).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lsgpt.contract import MAX_STEP_LIMIT  # LightSeq softmax block bound

# ---------------------------------------------------------------------------------------------
# Constants shared by training, export and inference.

QMAX = 127  # symmetric narrow range: int8 values in [-127, 127]
U8_ZERO_POINT = 127  # stored kernels are uint8 = int8 + 127, values 0..254
WEIGHT_CLIP = 1.0  # LightSeq fixes every kernel clip at 1.0 (weight clips are not learned)
ACT_CLIP_INIT = 16.0  # initial activation clip
EMB_CLIP_INIT = 1.0  # initial embedding clip (learned)
LOGITS_CLIP = 16.0  # lm_head output clip, fixed (not learned)
SAMPLING_METHODS = ("topk", "topp", "ppl")
VALID_TOPK = (1, 2, 4, 8, 16, 32)  # LightSeq's ker_topk_sample_launcher accepts only these
MAX_HIDDEN = 1024  # LightSeq embedding kernel: hidden threads in fp32 (2048 in fp16); we take the safe bound

# Per-layer activation clips of the int8 format, in LightSeq's training `para` clip order.
# name in HDF5 -> index in the 12-value `clip_max` of LightSeq's training layer.
LAYER_ACT_CLIPS: dict[str, int] = {
    "multihead_ln_clip_max": 0,  # LN1 output = QKV GEMM input
    "multihead_qkv_dense_clip_max": 2,  # QKV GEMM output, before bias
    "multihead_project_output_clip_max": 3,  # attention context = out-proj input
    "multihead_output_dense_clip_max": 5,  # out-proj GEMM output, before bias
    "ffn_ln_clip_max": 6,  # LN2 output = FFN1 input
    "ffn_first_output_clip_max": 8,  # FFN1 GEMM output, before bias
    "ffn_first_act_clip_max": 9,  # GELU output = FFN2 input
    "self_qkv_bias_out_clip_max": 11,  # Q/K/V after bias = int8 KV-cache scale
}
# Activation clips LightSeq's training layer never updates (no gradient written): they stay at init.
FROZEN_ACT_CLIPS = ("self_qkv_bias_out_clip_max",)

# The four GEMM kernels per layer: name -> (rows, cols) as functions of (H, I).
LAYER_KERNELS: dict[str, Callable[[int, int], tuple[int, int]]] = {
    "multihead_project_kernel_qkv": lambda h, i: (h, 3 * h),
    "multihead_project_kernel_output": lambda h, i: (h, h),
    "ffn_first_kernel": lambda h, i: (h, i),
    "ffn_second_kernel": lambda h, i: (i, h),
}
# Per-layer float vectors: name -> length as a function of (H, I).
LAYER_VECTORS: dict[str, Callable[[int, int], int]] = {
    "multihead_norm_scale": lambda h, i: h,
    "multihead_norm_bias": lambda h, i: h,
    "multihead_project_bias_qkv": lambda h, i: 3 * h,
    "multihead_project_bias_output": lambda h, i: h,
    "ffn_norm_scale": lambda h, i: h,
    "ffn_norm_bias": lambda h, i: h,
    "ffn_first_bias": lambda h, i: i,
    "ffn_second_bias": lambda h, i: h,
}
# model_conf scalars: name -> numpy dtype written. sampling_method is an int8 ASCII array.
MODEL_CONF_INTS = ("n_encoder_stack", "head_num", "src_padding_id", "topk", "eos_id", "extra_decode_length")
MODEL_CONF_FLOATS = ("topp",)
EMB_CLIPS_INT8 = ("emb_clip_max", "output_ln_clip_max", "logits_clip_max")

# HF GPT-2 state-dict names of each layer's weights (Conv1D stores [in, out], like LightSeq).
HF_LAYER_MAP: dict[str, str] = {
    "multihead_norm_scale": "ln_1.weight",
    "multihead_norm_bias": "ln_1.bias",
    "multihead_project_kernel_qkv": "attn.c_attn.weight",
    "multihead_project_bias_qkv": "attn.c_attn.bias",
    "multihead_project_kernel_output": "attn.c_proj.weight",
    "multihead_project_bias_output": "attn.c_proj.bias",
    "ffn_norm_scale": "ln_2.weight",
    "ffn_norm_bias": "ln_2.bias",
    "ffn_first_kernel": "mlp.c_fc.weight",
    "ffn_first_bias": "mlp.c_fc.bias",
    "ffn_second_kernel": "mlp.c_proj.weight",
    "ffn_second_bias": "mlp.c_proj.bias",
}
# Where QAT checkpoints keep their clips (state-dict keys; see lsgpt/training/qat.py):
#   transformer.h.{i}.ls_clips.{LAYER_ACT_CLIPS name}
#   transformer.ls_clips.{emb_clip_max | output_ln_clip_max}
CLIP_PREFIX_LAYER = "transformer.h.{i}.ls_clips."
CLIP_PREFIX_EMB = "transformer.ls_clips."


class FormatError(ValueError):
    """A file or checkpoint does not match the LightSeq GPT format."""


# ---------------------------------------------------------------------------------------------
# Quantization formulas (docs/format.md §5.2).


def quantize_u8(x: np.ndarray, clip: float) -> np.ndarray:
    """Export formula: u8 = floor(clip(x*127/c, -127, 127) + 127 + 0.5)."""
    x = np.asarray(x, dtype=np.float64)
    return np.floor(np.clip(x * QMAX / clip, -QMAX, QMAX) + U8_ZERO_POINT + 0.5).astype(np.uint8)


def u8_to_i8(u8: np.ndarray) -> np.ndarray:
    """Stored uint8 (zero point 127) -> signed int8 in [-127, 127]."""
    return (np.asarray(u8, dtype=np.int16) - U8_ZERO_POINT).astype(np.int8)


def dequant_scale(clip: float) -> float:
    """The value of one int8 step under `clip`: x = q * c / 127 (weights, activations, K/V, logits)."""
    return clip / QMAX


def requant_alpha(kernel_clip: float, in_clip: float, out_clip: float) -> float:
    """int8 GEMM with int8 output: int32 sums times alpha = c_w * c_in / (c_out * 127), then round half up."""
    return kernel_clip * in_clip / (out_clip * QMAX)


def int32_out_scale(kernel_clip: float, in_clip: float) -> float:
    """int8 GEMM with int32 output (FFN2, not requantized): sums times c_w * c_in / 127**2 give floats."""
    return kernel_clip * in_clip / QMAX**2


@dataclass(frozen=True)
class LayerScales:
    """The inference constants of one ``QuantGpt`` layer, from its clips (docs/format.md §6): ``*_in`` quantize a
    value (int8 = floor(x·127/c + 0.5)), ``*_alpha`` requantize a GEMM's int32 sums, ``*_deq`` turn int8 (or
    FFN2's int32 sums) back into values. The reference path (lsgpt.engine.int8) and the fused kernels
    (lsgpt.engine.fused) both read these."""

    ln1_in: float  # LN1 output -> the QKV GEMM's int8 input
    qkv_alpha: float
    qkv_deq: float  # the QKV GEMM's requantized output, before bias
    kv_in: float  # q, k, v after bias -> int8 (the KV cache's scale)
    kv_deq: float  # one int8 step of q, k, v
    ctx_in: float  # attention context -> the output projection's int8 input
    out_alpha: float
    out_deq: float
    ln2_in: float  # LN2 output -> the FFN1 GEMM's int8 input
    ffn1_alpha: float
    ffn1_deq: float
    act_in: float  # GELU output -> the FFN2 GEMM's int8 input
    ffn2_deq: float  # FFN2 keeps int32 sums (no requantization), dequantized into the residual


def layer_scales(clips: Mapping[str, float]) -> LayerScales:
    """A layer's LayerScales from its ``*_clip_max`` values (names as in the HDF5 file, without the layer prefix)."""
    c = {k: float(v) for k, v in clips.items()}
    ln1, qkv_out, kv = c["multihead_ln_clip_max"], c["multihead_qkv_dense_clip_max"], c["self_qkv_bias_out_clip_max"]
    ctx, o_out = c["multihead_project_output_clip_max"], c["multihead_output_dense_clip_max"]
    ln2, f1_out, act = c["ffn_ln_clip_max"], c["ffn_first_output_clip_max"], c["ffn_first_act_clip_max"]
    return LayerScales(
        ln1_in=QMAX / ln1, qkv_alpha=requant_alpha(c["multihead_project_kernel_qkv_clip_max"], ln1, qkv_out),
        qkv_deq=dequant_scale(qkv_out), kv_in=QMAX / kv, kv_deq=dequant_scale(kv), ctx_in=QMAX / ctx,
        out_alpha=requant_alpha(c["multihead_project_kernel_output_clip_max"], ctx, o_out), out_deq=dequant_scale(o_out),
        ln2_in=QMAX / ln2, ffn1_alpha=requant_alpha(c["ffn_first_kernel_clip_max"], ln2, f1_out),
        ffn1_deq=dequant_scale(f1_out), act_in=QMAX / act,
        ffn2_deq=int32_out_scale(c["ffn_second_kernel_clip_max"], act),
    )


@dataclass(frozen=True)
class HeadScales:
    """The embedding's and the LM head's inference constants of a ``QuantGpt`` file (docs/format.md §6)."""

    embed_deq: float  # int8 token embedding -> value
    ln_in: float  # ln_f output -> the LM head's int8 input
    alpha: float  # the LM head's int32 sums -> int8 logits
    deq: float  # int8 logits -> values (multiples of logits_clip/127)


def head_scales(emb_clip: float, out_ln_clip: float, logits_clip: float) -> HeadScales:
    return HeadScales(embed_deq=dequant_scale(emb_clip), ln_in=QMAX / out_ln_clip,
                      alpha=requant_alpha(out_ln_clip, emb_clip, logits_clip), deq=dequant_scale(logits_clip))


# ---------------------------------------------------------------------------------------------
# Config.


@dataclass
class GptConfig:
    n_layer: int
    n_head: int
    hidden: int
    inner: int
    vocab: int
    max_step: int
    eos_id: int
    pad_id: int
    sampling_method: str = "topk"
    topk: int = 1
    topp: float = 0.75
    extra_decode_length: int = 0  # <= 0: generate up to max_step
    quantized: bool = False
    layer_norm_eps: float = 1e-5  # not stored by LightSeq (its kernels use 1e-12); HF GPT-2's value

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_head

    def check(self) -> None:
        """Raise FormatError where LightSeq would reject the configuration."""
        problems = []
        if self.n_layer < 1:
            problems.append(f"n_encoder_stack={self.n_layer} must be >= 1")
        if self.n_head < 1 or self.hidden % self.n_head:
            problems.append(f"head_num={self.n_head} does not divide hidden size {self.hidden}")
        elif self.head_dim % 2:
            problems.append(f"head dim {self.head_dim} must be even")
        if self.inner % 2:
            problems.append(f"inner size {self.inner} must be even")
        if self.hidden > MAX_HIDDEN:
            problems.append(f"hidden size {self.hidden} exceeds LightSeq's limit {MAX_HIDDEN}")
        if not 1 <= self.max_step <= MAX_STEP_LIMIT:
            problems.append(f"max_step={self.max_step} must be in 1..{MAX_STEP_LIMIT}")
        if self.sampling_method not in SAMPLING_METHODS:
            problems.append(f"sampling_method={self.sampling_method!r} not in {SAMPLING_METHODS}")
        if self.topk not in VALID_TOPK:
            problems.append(f"topk={self.topk} not in {VALID_TOPK}")
        if not 0.0 < self.topp <= 1.0:
            problems.append(f"topp={self.topp} must be in (0, 1]")
        if self.eos_id == 0:
            problems.append("eos_id=0 means 'not assigned' to LightSeq; use a real token id")
        if not 0 <= self.eos_id < self.vocab:
            problems.append(f"eos_id={self.eos_id} outside the vocabulary (0..{self.vocab - 1})")
        if self.pad_id < 0:
            problems.append(f"src_padding_id={self.pad_id} must be >= 0")
        if problems:
            raise FormatError("invalid model config: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return asdict(self)


def max_output_len(cfg: GptConfig, prompt_len: int) -> int:
    """LightSeq's total output length bound: min(max_step, prompt + extra_decode_length)."""
    if cfg.extra_decode_length <= 0:
        return cfg.max_step
    return min(cfg.max_step, prompt_len + cfg.extra_decode_length)


# ---------------------------------------------------------------------------------------------
# Dataset specification: name -> (element count, kind). kind: "f" float, "u8" uint8, "s" scalar.


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    size: int
    kind: str  # "float" | "uint8" | "scalar_float" | "scalar_int" | "ascii"


def dataset_specs(cfg: GptConfig) -> list[DatasetSpec]:
    """Every dataset LightSeq's loader reads for this config, with its element count."""
    h, i, v = cfg.hidden, cfg.inner, cfg.vocab
    specs = [DatasetSpec(f"model_conf/{n}", 1, "scalar_int") for n in MODEL_CONF_INTS]
    specs += [DatasetSpec(f"model_conf/{n}", 1, "scalar_float") for n in MODEL_CONF_FLOATS]
    specs.append(DatasetSpec("model_conf/sampling_method", -1, "ascii"))
    emb_kind = "uint8" if cfg.quantized else "float"
    specs += [
        DatasetSpec("src_embedding/token_embedding", v * h, emb_kind),
        DatasetSpec("src_embedding/position_embedding", cfg.max_step * h, "float"),
        DatasetSpec("src_embedding/norm_scale", h, "float"),
        DatasetSpec("src_embedding/norm_bias", h, "float"),
    ]
    if cfg.quantized:
        specs += [DatasetSpec(f"src_embedding/{n}", 1, "scalar_float") for n in EMB_CLIPS_INT8]
    for layer in range(cfg.n_layer):
        p = f"encoder_stack/{layer}/"
        specs += [DatasetSpec(p + n, f(h, i), "float") for n, f in LAYER_VECTORS.items()]
        for n, f in LAYER_KERNELS.items():
            r, c = f(h, i)
            specs.append(DatasetSpec(p + n, r * c, emb_kind))
            if cfg.quantized:
                specs.append(DatasetSpec(p + n + "_clip_max", 1, "scalar_float"))
        if cfg.quantized:
            specs += [DatasetSpec(p + n, 1, "scalar_float") for n in LAYER_ACT_CLIPS]
    return specs


# ---------------------------------------------------------------------------------------------
# Writing.


def _atomic_target(path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)


def write_hdf5(path: str | os.PathLike, cfg: GptConfig, arrays: Mapping[str, np.ndarray]) -> Path:
    """Write a LightSeq GPT HDF5 file atomically (temporary file in the same folder, then rename).

    `arrays` maps dataset names (without model_conf) to arrays already in stored form: float arrays for
    fp16, uint8 kernels/embedding and float scalars for int8. Shapes are written as LightSeq's own
    exporters write them (fp16: flat; int8: 2-D kernels, [H, V] embedding).
    """
    import h5py

    cfg.check()
    path = Path(path)
    want = {s.name: s for s in dataset_specs(cfg) if not s.name.startswith("model_conf/")}
    missing = sorted(set(want) - set(arrays))
    extra = sorted(set(arrays) - set(want))
    if missing or extra:
        raise FormatError(f"cannot write {path}: missing datasets {missing[:5]}, unexpected {extra[:5]}")
    for name, spec in want.items():
        a = np.asarray(arrays[name])
        if a.size != spec.size:
            raise FormatError(f"{name}: {a.size} elements, expected {spec.size}")
        if spec.kind == "uint8" and a.dtype != np.uint8:
            raise FormatError(f"{name}: dtype {a.dtype}, expected uint8")
    fd, tmp = _atomic_target(path)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            for name, spec in want.items():
                a = np.asarray(arrays[name])
                if spec.kind == "float":
                    # the fp16 format stores flat float arrays (LightSeq's writers flatten); int8 keeps shapes
                    f.create_dataset(name, data=(a if cfg.quantized else a.reshape(-1)).astype(np.float32))
                elif spec.kind == "uint8":
                    f.create_dataset(name, data=a if cfg.quantized else a.reshape(-1), dtype=np.uint8)
                else:
                    f.create_dataset(name, data=np.float64(a.reshape(-1)[0]) if a.ndim else np.float64(a))
            conf = f.create_group("model_conf")
            conf.create_dataset("n_encoder_stack", data=np.int32(cfg.n_layer))
            conf.create_dataset("head_num", data=np.int32(cfg.n_head))
            conf.create_dataset("src_padding_id", data=np.int32(cfg.pad_id))
            conf.create_dataset("topk", data=np.int32(cfg.topk))
            conf.create_dataset("topp", data=np.float32(cfg.topp))
            conf.create_dataset("eos_id", data=np.int32(cfg.eos_id))
            conf.create_dataset("extra_decode_length", data=np.int32(cfg.extra_decode_length))
            conf.create_dataset(
                "sampling_method", data=np.frombuffer(cfg.sampling_method.encode("ascii"), dtype=np.int8)
            )
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


# ---------------------------------------------------------------------------------------------
# Reading and validation.


def _is_uint8(ds) -> bool:
    return ds.dtype == np.uint8


def stored_precision(path: str | os.PathLike) -> str | None:
    """'int8' or 'fp16' for an existing export (by its int8-only clip dataset), None if there is none to read."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return "int8" if "src_embedding/emb_clip_max" in f else "fp16"
    except (OSError, ValueError):
        return None


def read_hdf5(path: str | os.PathLike) -> tuple[GptConfig, dict[str, np.ndarray]]:
    """Read and validate a LightSeq GPT HDF5 file.

    Every dataset is checked (presence, element count, dtype) before any array is read, so a bad file
    gives a FormatError naming the dataset instead of a crash or a huge allocation.
    Returns the config and a dict of arrays: floats as float32, uint8 kernels as uint8 (stored form),
    scalars as Python-compatible 0-d arrays.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FormatError(f"model file not found: {path}")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise FormatError(f"{path} is not a readable HDF5 file ({e})") from None
    try:
        with f:
            return _read_open(f, path)
    except FormatError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise FormatError(f"{path}: corrupt or truncated HDF5 file ({type(e).__name__}: {e})") from None


def _read_open(f, path: Path) -> tuple[GptConfig, dict[str, np.ndarray]]:
    cfg = _read_config(f, path)
    specs = [s for s in dataset_specs(cfg) if not s.name.startswith("model_conf/")]
    _check_datasets(f, path, specs)  # everything, before any array is read
    return cfg, _read_arrays(f, path, specs)


def _need(f, path: Path, name: str):
    """The dataset `name`, or a FormatError saying why not."""
    import h5py

    obj = f.get(name)
    if obj is None:
        raise FormatError(f"{path}: dataset {name} not found")
    if not isinstance(obj, h5py.Dataset):
        raise FormatError(f"{path}: {name} is not a dataset")
    return obj


def _scalar(f, path: Path, name: str) -> float:
    ds = _need(f, path, name)
    if ds.size != 1:
        raise FormatError(f"{path}: {name} has {ds.size} elements, expected 1")
    if ds.dtype.kind not in "iuf":
        raise FormatError(f"{path}: {name} has dtype {ds.dtype}, expected a number")
    return np.asarray(ds[()]).reshape(-1)[0].item()


def _read_sampling_method(f, path: Path) -> str:
    sm_ds = _need(f, path, "model_conf/sampling_method")
    if sm_ds.size > 128 or sm_ds.dtype.kind not in "iuS":
        raise FormatError(f"{path}: model_conf/sampling_method must be an ASCII int8 array of <= 128 chars")
    raw = np.asarray(sm_ds[()])
    method = raw.tobytes().decode("ascii", "replace") if raw.dtype.kind == "S" else bytes(
        np.asarray(raw, dtype=np.uint8).reshape(-1).tolist()
    ).decode("ascii", "replace")
    return method.strip("\x00") or "topk"


def _read_config(f, path: Path) -> GptConfig:
    """model_conf and the sizes the embedding datasets imply, checked as LightSeq would."""
    ints = {n: int(_scalar(f, path, f"model_conf/{n}")) for n in MODEL_CONF_INTS}
    topp = float(_scalar(f, path, "model_conf/topp"))
    method = _read_sampling_method(f, path)

    emb = _need(f, path, "src_embedding/token_embedding")
    quantized = _is_uint8(emb)
    h = _need(f, path, "src_embedding/norm_scale").size
    if h == 0:
        raise FormatError(f"{path}: src_embedding/norm_scale is empty")
    n_layer = ints["n_encoder_stack"]
    if not 1 <= n_layer <= 1024:
        raise FormatError(f"{path}: model_conf/n_encoder_stack={n_layer} is not a sane layer count")
    ffn1 = _need(f, path, "encoder_stack/0/ffn_first_kernel")
    for name in ("src_embedding/token_embedding", "src_embedding/position_embedding", "encoder_stack/0/ffn_first_kernel"):
        if _need(f, path, name).size % h:
            raise FormatError(f"{path}: {name} has {_need(f, path, name).size} elements, not a multiple of hidden={h}")
    cfg = GptConfig(
        n_layer=n_layer,
        n_head=ints["head_num"],
        hidden=h,
        inner=ffn1.size // h,
        vocab=emb.size // h,
        max_step=_need(f, path, "src_embedding/position_embedding").size // h,
        eos_id=ints["eos_id"],
        pad_id=ints["src_padding_id"],
        sampling_method=method,
        topk=ints["topk"] or 4,  # LightSeq: 0 keeps the default 4
        topp=topp or 0.75,  # LightSeq: 0 keeps the default 0.75
        extra_decode_length=ints["extra_decode_length"],
        quantized=quantized,
    )
    try:
        cfg.check()
    except FormatError as e:
        raise FormatError(f"{path}: {e}") from None
    return cfg


def _check_datasets(f, path: Path, specs: list[DatasetSpec]) -> None:
    """Presence, element count and dtype of every dataset, without reading one."""
    for s in specs:
        ds = _need(f, path, s.name)
        if ds.size != s.size:
            raise FormatError(f"{path}: {s.name} has {ds.size} elements, expected {s.size}")
        if s.kind == "uint8" and ds.dtype != np.uint8:
            raise FormatError(f"{path}: {s.name} has dtype {ds.dtype}, expected uint8 (int8 model)")
        if s.kind in ("float", "scalar_float") and ds.dtype.kind != "f":
            raise FormatError(f"{path}: {s.name} has dtype {ds.dtype}, expected float")


def _read_arrays(f, path: Path, specs: list[DatasetSpec]) -> dict[str, np.ndarray]:
    """The checked datasets as arrays; clips must be positive and finite, floats finite."""
    arrays: dict[str, np.ndarray] = {}
    for s in specs:
        ds = f[s.name]
        if s.kind == "uint8":
            arrays[s.name] = np.asarray(ds[()], dtype=np.uint8).reshape(-1)
        elif s.kind == "float":
            arrays[s.name] = np.asarray(ds[()], dtype=np.float32).reshape(-1)
        else:
            arrays[s.name] = np.asarray(ds[()], dtype=np.float64).reshape(-1)[0]
            if not np.isfinite(arrays[s.name]) or arrays[s.name] <= 0:
                raise FormatError(f"{path}: clip {s.name}={arrays[s.name]} must be a positive finite number")
    for name, a in arrays.items():
        if a.dtype == np.float32 and not np.isfinite(a).all():
            raise FormatError(f"{path}: {name} contains NaN or Inf")
    return arrays


def layer_arrays(cfg: GptConfig, arrays: Mapping[str, np.ndarray], layer: int) -> dict[str, np.ndarray]:
    """The datasets of one encoder layer, keyed by short name, kernels reshaped to [in, out]."""
    p = f"encoder_stack/{layer}/"
    out = {n: arrays[p + n] for n in LAYER_VECTORS}
    for n, f in LAYER_KERNELS.items():
        out[n] = arrays[p + n].reshape(f(cfg.hidden, cfg.inner))
        if cfg.quantized:
            out[n + "_clip_max"] = arrays[p + n + "_clip_max"]
    if cfg.quantized:
        out.update({n: arrays[p + n] for n in LAYER_ACT_CLIPS})
    return out

