#!/usr/bin/env python3
"""Generation speed: HF transformers `generate` vs our engine (fp and int8), side by side per batch size.

The article's task: a short prompt -> N new tokens, greedy (top_k=1, EOS ignored), on a random-weight GPT-2.
HF runs fp16 on CUDA and fp32 on CPU; ours runs the same precision, and int8. Defaults: on CUDA the article's
shape (12 layers, 768 hidden, vocab 21128), 500 new tokens, batch 1,8,32; on the CPU 4 layers, 256 hidden,
64 new tokens, batch 1,8, one thread. Writes results/tmp/<device>/generation/generation (--record: results/<device>/...).{json,md,png}.

    python -m benchmarks.generation                                  # CPU: a minute or two
    python -m benchmarks.generation --batches 1,8,32,64,128,256 --ttft-prompt 400 --profile   # the GPU table
    python -m benchmarks.generation --sampling 50,0.9,0.8   # sampled: top-k 50, top-p 0.9, temperature 0.8, both sides
    python -m benchmarks.generation --replot results/h100/generation/generate-gpu.json --out results/tmp/replot
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

from benchmarks import common
from lsgpt.contract import VOCAB_SIZE


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def sampling_type(s: str) -> tuple[int, float, float]:
    try:
        k, p, t = s.split(",")
        k, p, t = int(k), float(p), float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: give K,P,T, e.g. 50,0.9,0.8") from None
    if k < 0 or not 0 < p <= 1 or not t > 0:
        raise argparse.ArgumentTypeError(f"{s!r}: top-k >= 0, 0 < top-p <= 1, temperature > 0")
    return k, p, t


def profile_decode(eng, batch: int, steps: int = 20, prompt_len: int = 4) -> dict:
    """Kernels and GPU µs per decode step (torch.profiler, eager steps): prefill + `steps` tokens minus
    prefill + 1 token, divided by steps - 1. A long prompt puts the steps at late positions (attention's share)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from lsgpt.engine.engine import SamplingParams

    eager = type(eng)(eng.config, eng.model, eng.device, cuda_graphs=False, fused=eng.fused is not None)
    prompts = [[1000 + i] * prompt_len for i in range(batch)]
    per = []  # kernel name -> [launches, GPU µs], for each of the two runs
    for n in (steps, 1, steps):  # the first is a warm-up
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            eager.generate(prompts, SamplingParams(max_new_tokens=n, top_k=1, ignore_eos=True))
            torch.cuda.synchronize()
        kernels: dict[str, list] = {}
        for e in prof.events():
            if e.device_type.name == "CUDA":
                k = kernels.setdefault(e.name.split("(")[0][:60], [0, 0.0])
                k[0], k[1] = k[0] + 1, k[1] + e.device_time
        per.append(kernels)
    step = {k: ((c - per[1].get(k, [0, 0])[0]) / (steps - 1), (t - per[1].get(k, [0, 0])[1]) / (steps - 1))
            for k, (c, t) in per[2].items()}
    return {"batch": batch, "prompt_len": prompt_len, "kernels_per_step": round(sum(c for c, _ in step.values()), 1),
            "gpu_us_per_step": round(sum(t for _, t in step.values()), 1),
            "per_kernel": sorted(([k, round(c, 1), round(t, 1)] for k, (c, t) in step.items()), key=lambda r: -r[2])}


def run(a: argparse.Namespace) -> dict:
    import torch

    from lsgpt.engine.engine import Engine, SamplingParams

    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    max_step = max(a.prompt_len + a.new_tokens, a.ttft_prompt + 1)
    model = common.random_model(a.layers, a.hidden, a.heads, a.vocab, max(max_step, 1024))
    prec = "fp16" if cuda else "fp32"
    with tempfile.TemporaryDirectory() as tmp:
        fp, q = common.export_pair(model, Path(tmp), max_step)
        engines = {f"ours_{prec}": Engine.load(fp, dev), "ours_int8": Engine.load(q, dev)}
    hf = model.to(dev, torch.float16 if cuda else torch.float32)

    top_k, top_p, temp = a.sampling or (1, 1.0, 1.0)  # greedy unless --sampling

    def hf_generate(prompts: torch.Tensor, n: int):
        with torch.inference_mode():
            return hf.generate(prompts.to(dev), attention_mask=torch.ones_like(prompts).to(dev), do_sample=True,
                               top_k=top_k, top_p=top_p, temperature=temp, max_new_tokens=n, min_new_tokens=n,
                               pad_token_id=0)

    def paths(batch: int, prompts: torch.Tensor, n: int) -> dict:
        sp = [SamplingParams(max_new_tokens=n, top_k=top_k, top_p=top_p, temperature=temp, seed=i, ignore_eos=True)
              for i in range(batch)]
        fns = {f"hf_{prec}": lambda: hf_generate(prompts, n)} if batch <= (a.hf_max_batch or batch) else {}
        for name, eng in engines.items():
            fns[name] = lambda eng=eng: eng.generate(prompts.tolist(), sp)
        return fns

    def sample(batch: int, length: int, seed: int) -> torch.Tensor:
        return torch.randint(1000, a.vocab, (batch, length), generator=torch.Generator().manual_seed(seed))

    results = []
    for batch in a.batches:
        med, _ = common.timed(paths(batch, sample(batch, a.prompt_len, batch), a.new_tokens), a.repeats, a.device)
        row = {"batch": batch, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, **{f"{k}_s": v for k, v in med.items()}}
        base = row.get(f"hf_{prec}_s")
        for k in med:
            if k.startswith("ours"):
                row[f"{k}_tok_per_sec"] = round(batch * a.new_tokens / med[k])
                if base:
                    row[f"{k}_speedup_vs_hf"] = round(base / med[k], 2)
        row["int8_speedup_vs_ours_fp"] = round(row[f"ours_{prec}_s"] / row["ours_int8_s"], 2)
        results.append(row)
        print(json.dumps(row), flush=True)
    report = {"task": "generate", "sampling": {"top_k": top_k, "top_p": top_p, "temperature": temp} if a.sampling else "greedy",
              "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "shape": {"layers": a.layers, "hidden": a.hidden, "heads": a.heads, "vocab": a.vocab},
              "int8_backend": engines["ours_int8"].backend, "results": results}
    if a.ttft_prompt:  # time to first token: prefill of a long prompt + one sampled token
        report["ttft"] = []
        for batch in a.ttft_batches:
            med, _ = common.timed(paths(batch, sample(batch, a.ttft_prompt, 7 + batch), 1), a.repeats, a.device)
            report["ttft"].append({"batch": batch, "prompt_len": a.ttft_prompt,
                                   **{f"{k}_ms": round(1e3 * v, 2) for k, v in med.items()}})
            print(json.dumps(report["ttft"][-1]), flush=True)
    if a.profile and cuda:
        report["profile"] = {k: [profile_decode(e, b, prompt_len=a.profile_prompt) for b in a.profile_batches]
                             for k, e in engines.items()}
    return report


def timed_keys(rows: list[dict]) -> list[str]:
    """Timed columns over all rows, HF first (some engines are timed at some batch sizes only)."""
    return sorted(dict.fromkeys(k for r in rows for k in r if k.endswith("_s")), key=lambda k: not k.startswith("hf_"))


def markdown(r: dict) -> str:
    rows, s = r["results"], r["shape"]
    keys = timed_keys(rows)
    how = r.get("sampling", "greedy")
    how = how if isinstance(how, str) else "sampled ({top_k} top-k, {top_p} top-p, temperature {temperature})".format(**how)
    out = [f"**Generation** — {s['layers']} layers, {s['hidden']} hidden, vocab {s['vocab']}, prompt "
           f"{rows[0]['prompt_len']} tokens, {rows[0]['new_tokens']} new tokens, {how}; seconds (× = speed-up vs "
           f"{keys[0][:-2]}; int8 GEMM backend: {r.get('int8_backend')}); {r['device']}", "",
           "| batch | " + " | ".join(k[:-2] for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for row in rows:
        base = row.get(keys[0])
        cells = [("—" if k not in row else f"{row[k]:.3f}" + (f" ({base / row[k]:.2f}×)" if base and k != keys[0] else ""))
                 for k in keys]
        out.append(f"| {row['batch']} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def plot(r: dict, png: Path) -> None:
    rows, s = r["results"], r["shape"]
    keys = timed_keys(rows)
    groups = [f"batch {row['batch']}" for row in rows]
    with common.figure(png, 1, 2, figsize=(12, 4.2)) as (fig, (a1, a2)):
        if fig is None:
            return
        common.bars(a1, groups, {k[:-2]: [row.get(k, 0.0) for row in rows] for k in keys})
        a1.set(ylabel="seconds (lower is better)", title="generation time")
        common.bars(a2, groups, {k[:-2]: [row[keys[0]] / row[k] if k in row and keys[0] in row else 0.0 for row in rows]
                          for k in keys}, "%.1f×")
        a2.set(ylabel=f"speed-up vs {keys[0][:-2]} (higher is better)", title="speed-up")
        fig.suptitle(f"{rows[0]['new_tokens']} new tokens, {s['layers']}L/{s['hidden']}H/vocab {s['vocab']} — "
                     f"{r['device']}", fontsize=10)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", help="cpu / cuda (default: cuda when present)")
    for k in ("layers", "hidden", "heads", "new-tokens"):
        p.add_argument(f"--{k}", type=int, help="default: 12/768/12/500 on CUDA, 4/256/4/64 on the CPU")
    p.add_argument("--vocab", type=int, default=VOCAB_SIZE)
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--batches", type=ints, help="default 1,8,32 on CUDA, 1,8 on the CPU")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sampling", type=sampling_type, metavar="K,P,T",
                   help="sample with top-k K, top-p P, temperature T on both sides (default: greedy)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default 1 on the CPU; 0 = torch's default)")
    p.add_argument("--hf-max-batch", type=int, default=64, help="time HF only up to this batch size (0: all)")
    p.add_argument("--ttft-prompt", type=int, default=0, help="also time the first token after a prompt this long")
    p.add_argument("--ttft-batches", type=ints, default=[1, 8])
    p.add_argument("--profile", action="store_true", help="CUDA: kernels and GPU time per decode step")
    p.add_argument("--profile-batches", type=ints, default=[1, 64])
    p.add_argument("--profile-prompt", type=int, default=4, help="prompt length before the profiled steps")
    common.add_output_args(p, "generation", replot="the Markdown and PNG")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.replot:
        report = common.read_replot(a.replot, "generation")
        out = a.out or a.replot.parent
    else:
        import torch

        a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
        gpu = a.device.startswith("cuda")
        for k, g, c in (("layers", 12, 4), ("hidden", 768, 256), ("heads", 12, 4), ("new_tokens", 500, 64),
                        ("batches", [1, 8, 32], [1, 8]), ("threads", 0, 1)):
            setattr(a, k, getattr(a, k) if getattr(a, k) is not None else (g if gpu else c))
        if a.threads:
            torch.set_num_threads(a.threads)
        report = {**run(a), "command": common.command_line(argv)}
        out = common.results_dir("generation", a.out, a.device, a.record)
    common.write_report(out, "generation", report, plot, markdown(report), save=not a.replot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
