"""Does the training fast path change what is learned? training/train.py with the article's flags, the same
seed and data, with and without --fast_path: per-step training losses side by side, fp16 and int8 QAT.

  fp16-plain  train.py ... --enable_quant false --fast_path false   (HF GPT2LMHeadModel, the plain Trainer)
  fp16-fast   train.py ... --enable_quant false --fast_path true
  int8-plain  train.py ... --resume_from_checkpoint <fp16-plain> --enable_quant true --fast_path false
  int8-fast   the same with --fast_path true (both QAT runs start from the same fp16-plain weights)

From scratch (no hub access): the default GPT-2 config (12 layers, 768 hidden) over data/tokenizer's 21128
tokens, block 500, batch 16, lr 1.5e-4, --fp16, --logging_steps 1. Writes loss_match.json (losses of every
step, max and mean relative difference, held-out losses, peak GPU memory, runtimes) into --out; the runs'
own output folders and logs stay there too.

  python benchmarks/train_loss_match.py --out results/tmp/loss_match [--max_steps 200]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "training" / "train.py"


def run(name: str, out: Path, args: list[str], timeout: float) -> dict:
    d = out / name
    cmd = [sys.executable, str(TRAIN), *args, "--output_dir", str(d)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    print(f"[loss_match] {name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - t
    (out / f"{name}.log").write_text(p.stdout + "\n" + p.stderr)
    if p.returncode != 0:
        print(p.stderr[-3000:], file=sys.stderr)
        return {"error": f"exit {p.returncode}", "wall_s": round(wall, 1)}
    state = json.loads((d / "trainer_state.json").read_text())
    m = json.loads((d / "metrics.json").read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    keep = ("eval_loss", "perplexity", "train_runtime", "train_samples_per_second", "peak_gpu_memory_gib",
            "fast_path", "global_step", "fp16_loss", "int8_before_qat_loss")
    res = {"command": "python " + " ".join([str(TRAIN.relative_to(ROOT)), *args, "--output_dir", str(d)]),
           "wall_s": round(wall, 1), "losses": losses, **{k: m[k] for k in keep if k in m}}
    print(f"[loss_match] {name}: {len(losses)} steps, last loss {losses[-1] if losses else None}, "
          f"eval {m.get('eval_loss')}, {wall:.0f} s", file=sys.stderr, flush=True)
    return res


def compare(a: list[float], b: list[float], window: int = 10) -> dict:
    n = min(len(a), len(b))
    rel = [abs(b[i] - a[i]) / abs(a[i]) for i in range(n)]
    sa = [sum(a[i:i + window]) / window for i in range(0, n - window + 1, window)]
    sb = [sum(b[i:i + window]) / window for i in range(0, n - window + 1, window)]
    srel = [abs(y - x) / abs(x) for x, y in zip(sa, sb)]
    worst = max(range(n), key=lambda i: rel[i]) if n else None
    return {
        "steps": n,
        "max_rel_diff": round(max(rel), 5) if rel else None,
        "max_rel_diff_step": worst + 1 if worst is not None else None,
        "mean_rel_diff": round(sum(rel) / n, 5) if n else None,
        "steps_over_1pct": sum(r > 0.01 for r in rel),
        f"max_rel_diff_{window}_step_means": round(max(srel), 5) if srel else None,
        "last_loss": [a[n - 1], b[n - 1]] if n else None,
        "within_1pct": bool(rel) and max(rel) <= 0.01,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--max_steps", type=int, default=200)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--train_file", default="data/train.txt")
    ap.add_argument("--tokenizer", default="data/tokenizer")
    ap.add_argument("--config_overrides", default=None, help="e.g. n_layer=2,n_embd=128,n_head=4 (a quick check)")
    ap.add_argument("--block_size", type=int, default=None)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--runs", default="fp16,int8", help="fp16, int8 or both (int8 needs fp16-plain's output)")
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--int8_init", choices=("fp16", "scratch"), default="fp16",
                    help="QAT runs start from fp16-plain's weights (the article's path) or from scratch (quicker)")
    a = ap.parse_args(argv)
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    common = ["--train_file", a.train_file, "--per_device_train_batch_size", str(a.batch),
              "--per_device_eval_batch_size", "8", "--learning_rate", "1.5e-4", "--fp16", "--logging_steps", "1",
              "--max_steps", str(a.max_steps), "--seed", str(a.seed), "--report_to", "none", "--disable_tqdm", "true",
              "--overwrite_output_dir", "--save_strategy", "no"]
    if a.block_size:
        common += ["--block_size", str(a.block_size)]
    scratch = ["--tokenizer_name", a.tokenizer] + (["--config_overrides", a.config_overrides] if a.config_overrides
                                                   else [])
    runs = {r.strip() for r in a.runs.split(",")}
    res: dict = {"runs": {}, "compare": {}}

    def record(name: str, args: list[str]) -> None:  # the JSON is rewritten after every run
        res["runs"][name] = run(name, out, args, a.timeout)
        for kind in ("fp16", "int8"):
            p, f = res["runs"].get(f"{kind}-plain", {}), res["runs"].get(f"{kind}-fast", {})
            if p.get("losses") and f.get("losses"):
                c = compare(p["losses"], f["losses"])
                if "eval_loss" in p and "eval_loss" in f:
                    c["eval_loss"] = [p["eval_loss"], f["eval_loss"]]
                    c["eval_loss_rel_diff"] = round(abs(f["eval_loss"] - p["eval_loss"]) / p["eval_loss"], 5)
                res["compare"][kind] = c
        (out / "loss_match.json").write_text(json.dumps(res, indent=2))

    def fp16(fp: str) -> None:
        record(f"fp16-{fp}", [*scratch, *common, "--enable_quant", "false", "--fast_path", str(fp == "fast").lower()])

    def int8(fp: str) -> None:
        init = scratch if a.int8_init == "scratch" else [
            "--model_name_or_path", "uer/gpt2-chinese-cluecorpussmall", "--resume_from_checkpoint",
            str(out / "fp16-plain")]
        record(f"int8-{fp}", [*init, *common, "--enable_quant", "true", "--fast_path", str(fp == "fast").lower()])

    # fp16-plain first: both QAT runs start from its weights
    if "fp16" in runs or a.int8_init == "fp16":
        fp16("plain")
    if "int8" in runs:
        int8("plain")
        int8("fast")
    if "fp16" in runs:
        fp16("fast")
    for kind, c in res["compare"].items():
        print(f"{kind}: {json.dumps(c)}")
    for name, r in res["runs"].items():
        print(f"{name}: " + json.dumps({k: v for k, v in r.items() if k not in ("losses", "command")}))
    return 0 if res["compare"] else 1


if __name__ == "__main__":
    sys.exit(main())
