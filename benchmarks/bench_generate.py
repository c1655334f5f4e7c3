#!/usr/bin/env python3
"""Generation speed, side by side in one run: HF transformers `generate` vs our engine (fp and int8).

The article's task: a short prompt -> N new tokens (500 in the article), greedy (top_k=1), at several batch
sizes, on a random-weight GPT-2 of a given shape (default: uer/gpt2-chinese-cluecorpussmall's 12 layers,
768 hidden, vocab 21128). HF runs fp16 on CUDA and fp32 on CPU; ours runs the same precision, and int8.

    python benchmarks/bench_generate.py --new-tokens 100 --batches 1 --out results/generate-cpu.json
    python benchmarks/bench_generate.py --batches 1,8,32,64,128,256 --ttft-prompt 400 --reference --profile \
        --out results/h100/generate.json                     # the GPU fast-path table (issue 9)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def random_model(layers: int, hidden: int, heads: int, vocab: int, positions: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=layers, n_embd=hidden, n_head=heads, vocab_size=vocab, n_positions=positions,
        bos_token_id=101, eos_token_id=102, pad_token_id=0,
    )
    return GPT2LMHeadModel(cfg).eval()


def export_pair(model, folder: Path, max_step: int) -> tuple[Path, Path]:
    """fp export, and int8 with clips calibrated on random token rows (no QAT for a random model)."""
    from lsgpt.convert import calibrate, export_model, float_arrays, gpt_config, load_checkpoint, quantize_arrays
    from lsgpt.format import write_hdf5

    fp = export_model(model, folder / "fp.hdf5", max_step=max_step)
    config, sd, _ = load_checkpoint(model)
    cfg = gpt_config(config, max_step, True)
    fa = float_arrays(cfg, sd)
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(0, cfg.vocab, (4, min(64, max_step)), generator=g).tolist()
    q = write_hdf5(folder / "int8.hdf5", cfg, quantize_arrays(cfg, fa, calibrate(cfg, fa, rows)))
    return fp, q


def timed(fn, repeats: int, sync) -> float:
    fn()  # warm-up (allocations, kernel selection)
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def profile_decode(eng, batch: int, steps: int = 20) -> dict:
    """Kernels and GPU time per decode step, in all and per kernel name, from torch.profiler over `steps` eager
    (un-graphed) decode steps: prefill + 1 token, then prefill + `steps` tokens; the difference is decode."""
    from torch.profiler import ProfilerActivity, profile

    from lsgpt.engine import SamplingParams

    eager = type(eng)(eng.config, eng.model, eng.device, cuda_graphs=False, fused=eng.fused is not None)
    prompts = [[1000 + i] * 4 for i in range(batch)]
    sp = SamplingParams(max_new_tokens=steps, top_k=1, ignore_eos=True)
    eager.generate(prompts, sp)  # warm-up (kernel compilation)
    one = SamplingParams(max_new_tokens=1, top_k=1, ignore_eos=True)
    per = []  # kernel name -> [launches, GPU µs], for each of the two runs
    for params in (one, sp):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            eager.generate(prompts, params)
            torch.cuda.synchronize()
        kernels: dict[str, list] = {}
        for e in prof.events():
            if e.device_type.name == "CUDA":
                k = kernels.setdefault(e.name.split("(")[0][:60], [0, 0.0])
                k[0] += 1
                k[1] += e.device_time
        per.append(kernels)
    n = steps - 1
    step = {name: ((c - per[0].get(name, [0, 0.0])[0]) / n, (t - per[0].get(name, [0, 0.0])[1]) / n)
            for name, (c, t) in per[1].items()}
    return {"batch": batch, "kernels_per_step": round(sum(c for c, _ in step.values()), 1),
            "gpu_us_per_step": round(sum(t for _, t in step.values()), 1),
            "per_kernel": sorted(([name, round(c, 1), round(t, 1)] for name, (c, t) in step.items()),
                                 key=lambda r: -r[2])}


def run(args) -> dict:
    from lsgpt.engine import Engine, SamplingParams

    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    ttft_prompt = getattr(args, "ttft_prompt", 0)
    max_step = max(args.prompt_len + args.new_tokens, ttft_prompt + 1)
    model = random_model(args.layers, args.hidden, args.heads, args.vocab, max(max_step, 1024))
    with tempfile.TemporaryDirectory() as tmp:
        fp_path, q_path = export_pair(model, Path(tmp), max_step)
        engines = {"ours_fp": Engine.load(fp_path, dev), "ours_int8": Engine.load(q_path, dev)}
        ref_max = getattr(args, "reference_max_batch", 0) or max(args.batches)
        if getattr(args, "reference", False) and dev.type == "cuda":  # the pre-fusion path, same run
            engines["ours_fp_ref"] = Engine.load(fp_path, dev, fused=False)
            engines["ours_int8_ref"] = Engine.load(q_path, dev, fused=False)
        if args.compile and dev.type == "cuda":  # torch.compile applies to the reference path only
            engines["ours_fp_compiled"] = Engine.load(fp_path, dev, compile=True, fused=False)
            engines["ours_int8_compiled"] = Engine.load(q_path, dev, compile=True, fused=False)
    hf_dtype = torch.float16 if dev.type == "cuda" else torch.float32
    prec = "fp16" if dev.type == "cuda" else "fp32"
    hf = model.to(dev, hf_dtype)
    hf_max = getattr(args, "hf_max_batch", 0) or max(args.batches)

    def hf_generate(prompts: torch.Tensor, n: int) -> None:
        with torch.inference_mode():
            hf.generate(
                prompts.to(dev), attention_mask=torch.ones_like(prompts).to(dev), do_sample=True, top_k=1,
                max_new_tokens=n, min_new_tokens=n, pad_token_id=0,
            )

    def key(name: str) -> str:
        return name.replace("_fp", "_" + prec, 1)

    results = []
    for batch in args.batches:
        g = torch.Generator().manual_seed(batch)
        prompts = torch.randint(1000, args.vocab, (batch, args.prompt_len), generator=g)
        n = args.new_tokens
        row = {"batch": batch, "prompt_len": args.prompt_len, "new_tokens": n}
        if batch <= hf_max:
            row[f"hf_{prec}_s"] = timed(lambda: hf_generate(prompts, n), args.repeats, sync)
        sp = SamplingParams(max_new_tokens=n, top_k=1, ignore_eos=True)
        for name, eng in engines.items():
            if name.endswith("_ref") and batch > ref_max:
                continue
            row[f"{key(name)}_s"] = timed(lambda: eng.generate(prompts.tolist(), sp), args.repeats, sync)
        base = row.get(f"hf_{prec}_s")
        for k in list(row):
            if k.endswith("_s") and not k.startswith("hf_"):
                row[k[:-2] + "_tok_per_sec"] = round(batch * n / row[k])
                if base:
                    row[k[:-2] + "_speedup_vs_hf"] = round(base / row[k], 2)
        if f"ours_{prec}_s" in row:
            row["int8_speedup_vs_ours_fp"] = round(row[f"ours_{prec}_s"] / row["ours_int8_s"], 2)
        results.append(row)
        print(json.dumps(row), flush=True)
    report = {
        "task": "generate",
        "device": torch.cuda.get_device_name(0) if dev.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "shape": {"layers": args.layers, "hidden": args.hidden, "heads": args.heads, "vocab": args.vocab},
        "int8_backend": engines["ours_int8"].backend,
        "results": results,
    }
    if ttft_prompt:  # time to first token: prefill of a long prompt + one sampled token
        ttft = []
        for batch in getattr(args, "ttft_batches", [1]):
            g = torch.Generator().manual_seed(7 + batch)
            prompts = torch.randint(1000, args.vocab, (batch, ttft_prompt), generator=g)
            row = {"batch": batch, "prompt_len": ttft_prompt}
            if batch <= hf_max:
                row[f"hf_{prec}_ms"] = round(1e3 * timed(lambda: hf_generate(prompts, 1), args.repeats, sync), 2)
            one = SamplingParams(max_new_tokens=1, top_k=1, ignore_eos=True)
            for name, eng in engines.items():
                row[f"{key(name)}_ms"] = round(1e3 * timed(lambda: eng.generate(prompts.tolist(), one), args.repeats, sync), 2)
            ttft.append(row)
            print(json.dumps(row), flush=True)
        report["ttft"] = ttft
    if getattr(args, "profile", False) and dev.type == "cuda":
        report["profile"] = {
            key(name): [profile_decode(eng, b) for b in (1, 64)] for name, eng in engines.items() if "compiled" not in name
        }
        print(json.dumps(report["profile"]), flush=True)
    return report


def plot(report: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    keys = [k for k in rows[0] if k.endswith("_s")]
    rows = [r for r in rows if all(k in r for k in keys)]
    fig, ax = plt.subplots(figsize=(2 + 2 * len(rows), 4))
    width = 0.8 / len(keys)
    for j, k in enumerate(keys):
        xs = [i + j * width for i in range(len(rows))]
        bars = ax.bar(xs, [r[k] for r in rows], width, label=k[:-2])
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks([i + width * (len(keys) - 1) / 2 for i in range(len(rows))], [f"batch {r['batch']}" for r in rows])
    ax.set_ylabel("seconds (lower is better)")
    ax.set_title(f"{rows[0]['new_tokens']} new tokens, {report['shape']['layers']}L/{report['shape']['hidden']}H — {report['device']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=21128)
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=500)
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32, 64])
    p.add_argument("--hf-max-batch", type=int, default=64, help="time HF only up to this batch size (0: all)")
    p.add_argument("--ttft-prompt", type=int, default=0, help="also time the first token after a prompt this long")
    p.add_argument("--ttft-batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8])
    p.add_argument("--reference", action="store_true", help="CUDA: also time the unfused reference path (before/after)")
    p.add_argument("--reference-max-batch", type=int, default=64, help="time the reference path up to this batch")
    p.add_argument("--profile", action="store_true", help="CUDA: kernels and GPU time per decode step (torch.profiler)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="CUDA: also time engines whose decode step is torch.compile'd")
    p.add_argument("--out", type=Path, default=Path("results/generate.json"))
    args = p.parse_args(argv)
    report = run(args)
    report["command"] = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    try:
        plot(report, args.out.with_suffix(".png"))
    except ImportError:  # matplotlib absent (e.g. on a bare GPU image): JSON only; plot later with --replot
        print("matplotlib not installed: no PNG")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
