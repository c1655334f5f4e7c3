"""The training fast path: what `training/train.py` (and `benchmarks/train_throughput.py`) change about a
Hugging Face Trainer run when it is on. It changes speed, not what is learned:

- the model is `lsgpt.training.qat.QuantGPT2LMHeadModel` (quantizers on for int8 QAT, off for fp16) trained through
  `torch.compile`, so each fake quantizer fuses into the elementwise work around it; SDPA attention; fp16/bf16
  autocast as the Trainer's flags say. On one CUDA device the whole training forward is one graph (scope "model",
  QuantGPT2LMHeadModel.compile_regions) replayed with its backward as CUDA graphs (mode "reduce-overhead"): the
  step is then bound by the GPU, not by kernel launches. Several processes (DDP), or the CPU: a graph per block
  (scope "blocks"), no CUDA graphs. LSGPT_COMPILE_SCOPE / LSGPT_COMPILE_MODE choose otherwise
  (LSGPT_COMPILE_MODE=default: compiled, no CUDA graphs). A compiled training step returns the loss, no logits;
- the fused AdamW (one kernel group for all parameters; with fp16 the GradScaler passes it the inf check on the
  device instead of reading it back);
- no host-device synchronization in a step: batches reach the GPU with non-blocking copies from pinned memory,
  the Trainer's per-step NaN/inf check of the loss (a read-back) is off, and full blocks carry no attention
  mask (the model would otherwise look at the mask on the host to choose between causal and padded attention).

It is on by default where CUDA is; `--fast_path false` (train.py) switches all of it off.
"""

from __future__ import annotations

import logging
import os

import torch
from transformers import default_data_collator

logger = logging.getLogger(__name__)

COMPILE_BACKEND_ENV = "LSGPT_COMPILE_BACKEND"  # tests: "aot_eager" traces the same graphs without a C++/GPU compiler
COMPILE_SCOPE_ENV = "LSGPT_COMPILE_SCOPE"  # "blocks" or "model" (QuantGPT2LMHeadModel.compile_regions)
# torch.compile's mode. "reduce-overhead" replays the compiled forward and backward as CUDA graphs (with scope
# "model": one graph, parameters keep their addresses, so the graphs are recorded once); "default": no graphs.
COMPILE_MODE_ENV = "LSGPT_COMPILE_MODE"


def defaults(args=None) -> tuple[str, str]:
    """(scope, mode) when the environment names none: one CUDA process gets the whole forward as one graph
    replayed as CUDA graphs; several processes (DDP: its hooks run between the backward's kernels) and the CPU a
    graph per block, no CUDA graphs."""
    world = int(getattr(args, "world_size", 0) or os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available() and world <= 1:
        return "model", "reduce-overhead"
    return "blocks", "default"


def available() -> bool:
    """Where the fast path is the default."""
    return torch.cuda.is_available()


def collate(features: list[dict]) -> dict[str, torch.Tensor]:
    """default_data_collator, minus an attention mask that masks nothing (decided here, on the host)."""
    batch = default_data_collator(features)
    mask = batch.get("attention_mask")
    if mask is not None and bool(mask.all()):
        del batch["attention_mask"]
    return batch


def configure(model: torch.nn.Module, args, backend: str | None = None, scope: str | None = None,
              mode: str | None = None) -> None:
    """Switch `model` (a QuantGPT2LMHeadModel) and the TrainingArguments `args` to the fast path, in place.
    Call before the Trainer is built."""
    backend = backend or os.environ.get(COMPILE_BACKEND_ENV) or "inductor"
    scope0, mode0 = defaults(args)
    scope = scope or os.environ.get(COMPILE_SCOPE_ENV) or scope0
    mode = mode or os.environ.get(COMPILE_MODE_ENV) or mode0
    if mode not in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
        raise ValueError(f"{COMPILE_MODE_ENV}: unknown torch.compile mode {mode!r}")
    model.compile_regions(backend=backend, scope=scope, **({"mode": mode} if backend == "inductor" else {}))
    model.training_logits = False  # the Trainer reads the loss only
    cuda = torch.cuda.is_available()
    if cuda and str(getattr(args.optim, "value", args.optim)) == "adamw_torch":  # the default before torch 2.8
        args.optim = "adamw_torch_fused"
    args.logging_nan_inf_filter = False  # a read-back of the loss every step
    if cuda and args.dataloader_pin_memory:
        acc = args.accelerator_config
        if hasattr(acc, "non_blocking"):
            acc.non_blocking = True  # pinned batches, copied without waiting for the GPU
    logger.info("training fast path: compiled %s (%s, mode %s), optimizer %s; --fast_path false switches it off",
                scope, backend, mode, getattr(args.optim, "value", args.optim))


__all__ = ["available", "collate", "configure", "defaults", "COMPILE_BACKEND_ENV", "COMPILE_MODE_ENV", "COMPILE_SCOPE_ENV"]
