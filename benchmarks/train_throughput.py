"""Training throughput (tokens/s) through the HF Trainer: plain HF GPT-2 vs ours, fp32/fp16 and int8 QAT.

Modes:
  hf-fp32     transformers' GPT2LMHeadModel, fp32
  hf-fp16     the same with --fp16 (mixed precision; CUDA only)
  ours-fp16   lsgpt.qat.QuantGPT2LMHeadModel with quantizers off (our forward; fp32 on the CPU)
  ours-int8   the same with LightSeq's fake quantizers on (int8 QAT; fp16 mixed precision on CUDA)

Shapes: on CUDA the article's model (12 layers, 768 hidden, 12 heads, vocab 21128, block 500, batch 16);
on the CPU a small one (2 layers, 128 hidden, vocab 21128, block 128, batch 8). Random token ids: the speed
does not depend on the text. Timing starts after --warmup steps and covers whole optimizer steps.

  python benchmarks/train_throughput.py --out results/train_throughput.json [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import transformers  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from lsgpt.qat import QuantGPT2LMHeadModel  # noqa: E402

MODES = ("hf-fp32", "hf-fp16", "ours-fp16", "ours-int8")
SHAPES = {
    "gpu": dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024, block=500, batch=16),
    "cpu": dict(n_layer=2, n_embd=128, n_head=4, n_positions=256, block=128, batch=8),
}


class RandomBlocks(torch.utils.data.Dataset):
    def __init__(self, n: int, block: int, vocab: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, block), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class StepTimer(TrainerCallback):
    def __init__(self, warmup: int):
        self.warmup, self.t0, self.t1, self.timed = warmup, None, None, 0

    def _sync(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_end(self, args, state, control, **kw):
        self._sync()
        if state.global_step == self.warmup:
            self.t0 = time.perf_counter()
        elif state.global_step > self.warmup:
            self.t1, self.timed = time.perf_counter(), state.global_step - self.warmup


def run_mode(mode: str, shape: dict, vocab: int, steps: int, warmup: int) -> dict:
    cuda = torch.cuda.is_available()
    if mode == "hf-fp16" and not cuda:
        return {"skipped": "fp16 mixed precision needs CUDA"}
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=shape["n_layer"], n_embd=shape["n_embd"], n_head=shape["n_head"],
        n_positions=shape["n_positions"], vocab_size=vocab, activation_function="gelu_new",
    )
    if mode.startswith("hf"):
        model = GPT2LMHeadModel(config)
    else:
        model = QuantGPT2LMHeadModel(config).set_quant(mode == "ours-int8")
    fp16 = cuda and mode != "hf-fp32"
    timer = StepTimer(warmup)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=shape["batch"], max_steps=warmup + steps,
            learning_rate=1e-4, fp16=fp16, report_to="none", save_strategy="no", logging_strategy="no",
            disable_tqdm=True, dataloader_pin_memory=cuda, use_cpu=not cuda,
        )
        ds = RandomBlocks(shape["batch"] * (warmup + steps), shape["block"], vocab)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        Trainer(model=model, args=args, train_dataset=ds, callbacks=[timer]).train()
    elapsed = timer.t1 - timer.t0
    tokens = timer.timed * shape["batch"] * shape["block"]
    res = {
        "precision": "fp16 mixed" if fp16 else "fp32",
        "quantizers": mode == "ours-int8",
        "timed_steps": timer.timed,
        "seconds": round(elapsed, 4),
        "steps_per_s": round(timer.timed / elapsed, 4),
        "tokens_per_s": round(tokens / elapsed, 1),
    }
    if cuda:
        res["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="JSON result path")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of %(default)s")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: gpu on CUDA, else cpu")
    ap.add_argument("--n_layer", type=int)
    ap.add_argument("--n_embd", type=int)
    ap.add_argument("--n_head", type=int)
    ap.add_argument("--block", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--vocab", type=int, default=21128)
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 20 on CUDA, 10 on the CPU)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=1,
                    help="rounds over all modes (interleaved, so load from other processes hits each mode alike); "
                    "tokens_per_s is the best round, tokens_per_s_median the median")
    a = ap.parse_args(argv)
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    if bad := [m for m in modes if m not in MODES]:
        ap.error(f"unknown modes {bad}; choose from {MODES}")
    cuda = torch.cuda.is_available()
    shape = dict(SHAPES[a.shape or ("gpu" if cuda else "cpu")])
    for k in ("n_layer", "n_embd", "n_head", "block", "batch"):
        if getattr(a, k) is not None:
            shape[k] = getattr(a, k)
    shape["n_positions"] = max(shape["n_positions"], shape["block"])
    steps = a.steps or (20 if cuda else 10)

    result = {
        "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads)",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "shape": {**shape, "vocab": a.vocab}, "warmup_steps": a.warmup, "modes": {},
    }
    rounds: dict[str, list[dict]] = {m: [] for m in modes}
    for r in range(a.repeats):
        for m in modes:
            print(f"[train_throughput] round {r + 1}/{a.repeats} {m} ...", file=sys.stderr, flush=True)
            rounds[m].append(run_mode(m, shape, a.vocab, steps, a.warmup))
            print(f"[train_throughput] {m}: {rounds[m][-1]}", file=sys.stderr, flush=True)
    for m, rs in rounds.items():
        if "skipped" in rs[0]:
            result["modes"][m] = rs[0]
            continue
        best = max(rs, key=lambda x: x["tokens_per_s"])
        tps = sorted(x["tokens_per_s"] for x in rs)
        result["modes"][m] = {**best, "rounds": len(rs), "tokens_per_s_median": tps[len(tps) // 2],
                              "tokens_per_s_all": [x["tokens_per_s"] for x in rs]}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
