"""Training throughput (tokens/s) through the HF Trainer: plain HF GPT-2 vs ours, fp32/fp16 and int8 QAT.

Modes:
  hf-fp32          transformers' GPT2LMHeadModel, fp32, the plain Trainer
  hf-fp16          the same with --fp16 (mixed precision; CUDA only): the baseline of issue 16
  ours-fp16        what training/train.py runs for fp16 by default on CUDA: lsgpt.training.qat.QuantGPT2LMHeadModel with
                   quantizers off, through the training fast path (lsgpt.training.fasttrain: on one GPU the whole
                   forward compiled as one graph and replayed with its backward as CUDA graphs, fused AdamW, no
                   per-step host syncs)
  ours-int8        the same with LightSeq's fake quantizers on (int8 QAT, fp16 mixed precision on CUDA)
  ours-*-model     compiled as one graph, no CUDA graphs (LSGPT_COMPILE_MODE=default for train.py)
  ours-*-blocks    a graph per block, no CUDA graphs (the default before issue 32; LSGPT_COMPILE_SCOPE=blocks
                   LSGPT_COMPILE_MODE=default)
  ours-fp16-plain  our model without the fast path (eager; what train.py runs with --fast_path false is HF's)
  ours-int8-plain  int8 QAT without the fast path (eager; train.py --enable_quant true --fast_path false)

Shapes: on CUDA the article's model (12 layers, 768 hidden, 12 heads, vocab 21128, block 500, batch 16);
on the CPU a small one (2 layers, 128 hidden, vocab 21128, block 128, batch 8). Random token ids: the speed
does not depend on the text. The clock starts after --warmup optimizer steps (compilation included there) and
stops after --steps more; the GPU is synchronized only at those two points, as in real training (a sync per
step would serialize the host and the GPU). peak_memory_gib: torch.cuda.max_memory_allocated over the run.

  python -m benchmarks.train_throughput --steps 5                 # -> results/tmp/<device>/train/train_throughput.json
  python -m benchmarks.train_throughput --repeats 3 --profile /tmp/prof --record   # -> results/<device>/train/
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
import transformers
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from benchmarks import common
from lsgpt.training import fasttrain
from lsgpt.training.qat import QuantGPT2LMHeadModel

MODES = ("hf-fp32", "hf-fp16", "ours-fp16", "ours-int8", "ours-fp16-model", "ours-int8-model", "ours-fp16-blocks",
         "ours-int8-blocks", "ours-fp16-plain", "ours-int8-plain")
VARIANTS = {"model": ("model", "default"), "blocks": ("blocks", "default")}  # mode suffix -> (scope, compile mode)
DEFAULT_MODES = {"gpu": ("hf-fp16", "ours-fp16", "ours-int8", "ours-fp16-plain", "ours-int8-plain"),
                 "cpu": ("hf-fp32", "ours-fp16-plain", "ours-int8-plain")}
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
    """Wall time from the end of step `warmup` to the end of step `warmup + steps`; the GPU is synchronized at
    those two points only."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.last, self.t_start, self.t0, self.t1, self.timed = warmup, warmup + steps, None, None, None, 0

    def _sync(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_begin(self, args, state, control, **kw):
        self.t_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.warmup:
            self._sync()
            self.t0 = time.perf_counter()
        elif state.global_step == self.last:
            self._sync()
            self.t1, self.timed = time.perf_counter(), state.global_step - self.warmup


FAMILIES = (("GEMM", ("nvjet", "gemm", "cutlass")), ("attention", ("sdpa", "flash", "attention")),
            ("optimizer (AdamW, unscale, clip)", ("multi_tensor", "foreach", "adam", "amp_")),
            ("fake-quant fwd (fused)", ("floor",)), ("masked backward / amax sums", ("where", "bitwise")),
            ("loss", ("softmax", "nll")), ("LayerNorm", ("layer_norm",)), ("GELU", ("tanh",)),
            ("copies / casts", ("copy", "cast")), ("reductions", ("reduce", "sum")))


def kernel_summary(prof, wall_s: float, n: int) -> str:
    """GPU-busy fraction (union of kernel intervals over the wall time of the profiled steps) and kernel time by
    family (a kernel counts in the first family whose key its name holds), per step."""
    iv = common.gpu_kernels(prof)
    busy, fam = common.busy_us(iv), {}
    for s, e, name in iv:
        f = next((f for f, keys in FAMILIES if any(k in name.lower() for k in keys)), "other elementwise")
        fam[f] = fam.get(f, 0.0) + (e - s) / 1000 / n
    span = (iv[-1][1] - iv[0][0]) / 1e6 if iv else float("nan")
    lines = [f"GPU busy: {busy / 1e6 / wall_s:.3f} of the wall time ({wall_s * 1000 / n:.2f} ms/step, profiler on), "
             f"{busy / 1e6 / span:.3f} of first-kernel..last-kernel; kernels {busy / 1000 / n:.2f} ms/step"]
    lines += [f"  {f:<36}{ms:8.2f} ms/step" for f, ms in sorted(fam.items(), key=lambda kv: -kv[1])]
    return "\n".join(lines)


class Profile(TrainerCallback):
    """torch.profiler over optimizer steps (first, first + n]; the GPU-busy fraction, kernel time by family and the
    table of kernels by device time go to `path`."""

    def __init__(self, first: int, n: int, path: Path):
        self.first, self.n, self.path, self.prof, self.t0, self.busy = first, n, path, None, 0.0, None

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.first:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=acts)
            self.prof.__enter__()
            self.t0 = time.perf_counter()
        elif self.prof is not None and state.global_step == self.first + self.n:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            wall = time.perf_counter() - self.t0
            self.prof.__exit__(None, None, None)
            key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            avg = self.prof.key_averages()
            table = avg.table(sort_by=key, row_limit=60, max_name_column_width=160)
            cpu = avg.table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=90)
            summary = self.busy = kernel_summary(self.prof, wall, self.n)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(f"{self.n} optimizer steps\n{summary}\n\nby device time\n{table}\n\nby host time\n{cpu}\n")
            self.prof = None


def run_mode(mode: str, shape: dict, vocab: int, steps: int, warmup: int, profile: Path | None = None) -> dict:
    cuda = torch.cuda.is_available()
    if mode == "hf-fp16" and not cuda:
        return {"skipped": "fp16 mixed precision needs CUDA"}
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=shape["n_layer"], n_embd=shape["n_embd"], n_head=shape["n_head"],
        n_positions=shape["n_positions"], vocab_size=vocab, activation_function="gelu_new",
    )
    fast = mode.startswith("ours") and not mode.endswith("-plain")
    if mode.startswith("hf"):
        model = GPT2LMHeadModel(config)
    else:
        model = QuantGPT2LMHeadModel(config).set_quant(mode.startswith("ours-int8"))
    model.loss_type = "ForCausalLM"  # as train.py sets it
    fp16 = cuda and mode != "hf-fp32"
    timer = StepTimer(warmup, steps)
    callbacks = [timer]
    n_prof = 2 if profile else 0
    if profile:
        callbacks.append(prof := Profile(warmup + steps, n_prof, profile / f"profile-{mode}.txt"))
    if cuda:
        torch.cuda.empty_cache()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=shape["batch"], max_steps=warmup + steps + n_prof,
            learning_rate=1e-4, fp16=fp16, report_to="none", save_strategy="no", logging_strategy="no",
            disable_tqdm=True, dataloader_pin_memory=cuda, use_cpu=not cuda,
        )
        if fast:
            torch._dynamo.reset()  # each mode compiles afresh (and never hits the recompile limit over rounds)
            from torch._dynamo.utils import counters

            counters.clear()
            if not mode.startswith("ours-int8"):
                for p in model.transformer.ls_clips.parameters():  # as train.py: fp16 clips don't train
                    p.requires_grad_(False)
                for block in model.transformer.h:
                    block.ls_clips.requires_grad_(False)
            scope, cmode = VARIANTS.get(mode.rsplit("-", 1)[-1], (None, None))
            fasttrain.configure(model, args, scope=scope, mode=cmode)
        ds = RandomBlocks(shape["batch"] * (warmup + steps + n_prof), shape["block"], vocab)
        w = model.transformer.h[0].mlp.c_fc.weight
        w0 = w.detach().clone()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        Trainer(model=model, args=args, train_dataset=ds, callbacks=callbacks,
                data_collator=fasttrain.collate if fast else None).train()
    # the run trained (a compiled path that lost its gradients would leave the weights as they were)
    update = ((w.detach().cpu() - w0.cpu()).norm() / w0.norm().cpu()).item()
    elapsed = timer.t1 - timer.t0
    tokens = timer.timed * shape["batch"] * shape["block"]
    res = {
        "precision": "fp16 mixed" if fp16 else "fp32",
        "quantizers": mode.startswith("ours-int8"),
        "fast_path": fast,
        "optimizer": str(getattr(args.optim, "value", args.optim)),
        "timed_steps": timer.timed,
        "seconds": round(elapsed, 4),
        "step_ms": round(1000 * elapsed / timer.timed, 2),
        "steps_per_s": round(timer.timed / elapsed, 4),
        "tokens_per_s": round(tokens / elapsed, 1),
        "warmup_seconds": round(timer.t0 - timer.t_start, 2),
        "weight_update_rel": float(f"{update:.3g}"),
    }
    if cuda:
        res["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    if profile and prof.busy:
        res["gpu_busy"] = prof.busy.splitlines()[0]
    if fast:
        from torch._dynamo.utils import counters

        res["graph_breaks"] = sum(counters["graph_break"].values())
    del model
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="JSON result path (default results/tmp/<device>/train/train_throughput.json, "
                    "git-ignored; --record: results/<device>/train/)")
    ap.add_argument("--record", action="store_true", help="write into results/<device>/train/ (the committed results)")
    ap.add_argument("--modes", default=None, help=f"comma-separated subset of {MODES}; default: on CUDA "
                    f"{','.join(DEFAULT_MODES['gpu'])}, on the CPU {','.join(DEFAULT_MODES['cpu'])}")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: gpu on CUDA, else cpu")
    ap.add_argument("--n_layer", type=int)
    ap.add_argument("--n_embd", type=int)
    ap.add_argument("--n_head", type=int)
    ap.add_argument("--block", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--vocab", type=int, default=21128)
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 20 on CUDA, 10 on the CPU)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first (compilation happens here)")
    ap.add_argument("--profile", type=Path, default=None,
                    help="folder: profile 2 more steps of each mode (torch.profiler) into profile-<mode>.txt")
    ap.add_argument("--repeats", type=int, default=1,
                    help="rounds over all modes (interleaved, so load from other processes hits each mode alike); "
                    "tokens_per_s is the best round, tokens_per_s_median the median")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    modes = [m.strip() for m in a.modes.split(",") if m.strip()] if a.modes else list(DEFAULT_MODES[
        "gpu" if cuda else "cpu"])
    if bad := [m for m in modes if m not in MODES]:
        ap.error(f"unknown modes {bad}; choose from {MODES}")
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
            try:
                rounds[m].append(run_mode(m, shape, a.vocab, steps, a.warmup, a.profile if r == 0 else None))
            except Exception as e:  # noqa: BLE001 - one failing mode must not cost the others' results
                rounds[m].append({"skipped": f"failed: {type(e).__name__}: {str(e)[:500]}"})
            print(f"[train_throughput] {m}: {rounds[m][-1]}", file=sys.stderr, flush=True)
    for m, rs in rounds.items():
        rs = [x for x in rs if "skipped" not in x] or rs
        if "skipped" in rs[0]:
            result["modes"][m] = rs[0]
            continue
        best = max(rs, key=lambda x: x["tokens_per_s"])
        tps = sorted(x["tokens_per_s"] for x in rs)
        result["modes"][m] = {**best, "rounds": len(rs), "tokens_per_s_median": tps[len(tps) // 2],
                              "tokens_per_s_all": [x["tokens_per_s"] for x in rs]}
    ok = {m: v for m, v in result["modes"].items() if "tokens_per_s" in v}
    base = "hf-fp16" if "hf-fp16" in ok else "hf-fp32" if "hf-fp32" in ok else None
    ratios = {}
    for m, v in ok.items():
        if base and m != base:
            ratios[f"{m}_vs_{base}"] = round(v["tokens_per_s"] / ok[base]["tokens_per_s"], 3)
    for q, f in (("ours-int8", "ours-fp16"), ("ours-int8-model", "ours-fp16-model"),
                 ("ours-int8-plain", "ours-fp16-plain")):
        if q in ok and f in ok:
            ratios[f"{q}_step_time_over_{f}"] = round(ok[q]["step_ms"] / ok[f]["step_ms"], 3)
    result["ratios"] = ratios
    out = a.out or common.results_dir("train", record=a.record) / "train_throughput.json"
    common.write_json(out, result)
    print(json.dumps(result, indent=2))
    print(f"\n{result['device']}, shape {result['shape']}")
    print(f"{'mode':<18}{'tokens/s':>12}{'step ms':>10}{'peak GiB':>10}{'warmup s':>10}")
    for m, v in ok.items():
        print(f"{m:<18}{v['tokens_per_s']:>12.0f}{v['step_ms']:>10.2f}{v.get('peak_memory_gib', float('nan')):>10.2f}"
              f"{v['warmup_seconds']:>10.1f}")
    for k, v in ratios.items():
        print(f"  {k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
