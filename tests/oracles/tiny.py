"""Tiny seeded HF GPT-2 models (the source of truth for the fp16 tests) and checkpoint writers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

TINY = dict(n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=1000)
# Token ids the tests use as EOS / pad: inside the vocabulary, never 0.
EOS_ID = 999
PAD_ID = 998

LAYER_CLIP_NAMES = (
    "multihead_ln_clip_max",
    "multihead_qkv_dense_clip_max",
    "multihead_project_output_clip_max",
    "multihead_output_dense_clip_max",
    "ffn_ln_clip_max",
    "ffn_first_output_clip_max",
    "ffn_first_act_clip_max",
    "self_qkv_bias_out_clip_max",
)  # docs/format.md §4 (the 8 per-layer activation clips), written out here independently of lsgpt.format


def hf_config(**over):
    from transformers import GPT2Config

    kw = dict(TINY)
    kw.update(eos_token_id=EOS_ID, bos_token_id=EOS_ID, pad_token_id=PAD_ID)
    kw.update(over)
    return GPT2Config(**kw)


def make_model(seed: int = 0, wide: bool = False, **over):
    """A seeded, eval-mode GPT2LMHeadModel.

    wide=False: HF's own init (std 0.02).  wide=True: larger weights (|w| < 0.95, well inside LightSeq's fixed
    kernel clip 1.0) so int8 quantization keeps signal and LayerNorm epsilon choices (1e-5 vs 1e-12) are
    irrelevant; biases and LN parameters non-trivial.
    """
    import torch
    from transformers import GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(hf_config(**over)).eval()
    if wide:
        g = torch.Generator().manual_seed(seed + 1000)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name == "lm_head.weight":
                    continue  # tied to wte
                if name.endswith("wte.weight"):
                    p.copy_((torch.randn(p.shape, generator=g) * 0.35).clamp(-0.95, 0.95))
                elif name.endswith("wpe.weight"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
                elif "ln_" in name and name.endswith("weight"):
                    p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
                elif name.endswith("bias"):
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
                else:  # Conv1D kernels [in, out]
                    fan_in = p.shape[0]
                    std = min(0.3, 1.6 / np.sqrt(fan_in))
                    p.copy_((torch.randn(p.shape, generator=g) * std).clamp(-0.95, 0.95))
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr(), "LM head must be tied"
    return model


def attach_clips(model, layer_clips: list[dict], emb_clip: float, output_ln_clip: float):
    """Register the QAT clip parameters the exporter reads, under the contract's state-dict names:
    transformer.h.{i}.ls_clips.<name>, transformer.ls_clips.{emb_clip_max, output_ln_clip_max}."""
    import torch

    for i, clips in enumerate(layer_clips):
        holder = torch.nn.Module()
        for n in LAYER_CLIP_NAMES:
            holder.register_buffer(n, torch.tensor(float(clips[n])))
        model.transformer.h[i].ls_clips = holder
    holder = torch.nn.Module()
    holder.register_buffer("emb_clip_max", torch.tensor(float(emb_clip)))
    holder.register_buffer("output_ln_clip_max", torch.tensor(float(output_ln_clip)))
    model.transformer.ls_clips = holder
    return model


def save_bin_checkpoint(model, folder: Path) -> Path:
    """The demo's layout: folder/config.json + folder/pytorch_model.bin (a torch.save'd state dict)."""
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(folder / "config.json")
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(sd, folder / "pytorch_model.bin")
    return folder / "pytorch_model.bin"


def save_safetensors_checkpoint(model, folder: Path) -> Path:
    """HF's own save_pretrained (model.safetensors; the tied lm_head is not stored)."""
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    assert (folder / "model.safetensors").is_file(), list(folder.iterdir())
    return folder


def patch_config(folder: Path, **changes):
    p = Path(folder) / "config.json"
    cfg = json.loads(p.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    p.write_text(json.dumps(cfg, indent=1))


def state_dict_np(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().double().numpy() for k, v in model.state_dict().items()}


def one_torch_thread():
    """Generator for an autouse fixture: run tiny models on one intra-op thread.

    On the 2-core test machines, torch's 2-thread pool spin-waits whenever the other core is busy: a 30-step
    generation of the tiny model measured 5.5 s with 2 threads under load vs 0.03 s with 1.
    """
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def cpu_engine(model, folder: Path, max_step: int = 128):
    """`model` exported to folder/m.hdf5 (eos EOS_ID) and loaded by our Engine on the CPU."""
    from lsgpt.engine.engine import Engine
    from lsgpt.export.convert import export_model

    return Engine.load(export_model(model, folder / "m.hdf5", max_step=max_step, eos_id=EOS_ID), device="cpu")


def hf_greedy(m, prompt, n: int) -> list[int]:
    """HF transformers' greedy continuation of n tokens (EOS disabled): prompt + n tokens."""
    import copy

    import torch

    gc = copy.deepcopy(m.generation_config)
    gc.eos_token_id, gc.pad_token_id, gc.do_sample, gc.max_new_tokens, gc.min_new_tokens = None, PAD_ID, False, n, None
    with torch.no_grad():
        out = m.generate(torch.tensor([prompt]), generation_config=gc,
                         attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0].tolist()
