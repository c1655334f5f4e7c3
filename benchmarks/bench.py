#!/usr/bin/env python3
"""One run, everything side by side as ratios: generation (HF vs ours, fp vs int8), end to end through
Triton vs in process, training throughput. JSON + Markdown table + bar charts under results/<device>/.

    python benchmarks/bench.py                                   # CPU: small shapes, a few minutes
    python benchmarks/bench.py --gpu-defaults --compile          # GPU: 12L/768H/vocab 21128, 500 tokens, batch 1/8/32
    python benchmarks/bench.py --sections generate,train --out results/h100
    python benchmarks/bench.py --replot results/cpu/bench.json   # PNGs + Markdown again from the JSON

Sections (--sections, default all):
  generate  benchmarks/bench_generate.run(): a random-weight GPT-2, greedy, N new tokens (EOS ignored), per
            batch size; HF transformers generate (fp16 on CUDA, fp32 on CPU) vs our engine in the same
            precision and in int8 (+ torch.compile'd decode step with --compile, CUDA only).
  e2e       the same exported model (fp and int8) and the same request — one prompt, and 8 prompts at once —
            through a real tritonserver (tritonclient gRPC: client -> server -> client) vs Engine.generate in
            this process; interleaved runs, medians. Needs tritonserver (skipped without it).
  train     benchmarks/train_throughput.py (HF Trainer tokens/s: HF fp32/fp16 vs ours fp16 vs int8 QAT),
            run as a subprocess; skipped when the script is absent.
Times on the shared 2-core CPU machines are noisy (other jobs run beside us): read ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import ROOT, device_slug, pyplot, served  # noqa: E402

SECTIONS = ("generate", "e2e", "train")
CPU_SHAPE = dict(layers=4, hidden=256, heads=4, vocab=21128)
GPU_SHAPE = dict(layers=12, hidden=768, heads=12, vocab=21128)


# ---------------------------------------------------------------------------------------------
# (a) generation


def section_generate(a: argparse.Namespace, device: str, partial=lambda res: None) -> dict:
    """bench_generate.run() over all batch sizes; with --compile, the compiled engines are timed in a second
    run() limited to --compile-batches (compiling costs about 2 minutes per batch size on an H100) and
    their columns are merged into the first run's rows (speed-ups against the first run's HF time)."""
    import bench_generate

    def args(batches: list[int], compile: bool) -> SimpleNamespace:
        return SimpleNamespace(device=device, layers=a.layers, hidden=a.hidden, heads=a.heads, vocab=a.vocab,
                               prompt_len=a.prompt_len, new_tokens=a.new_tokens, batches=batches,
                               repeats=a.repeats, threads=a.threads, compile=compile)

    compile_batches = [b for b in (a.compile_batches or a.batches)] if a.compile else []
    if not compile_batches or compile_batches == a.batches:
        return bench_generate.run(args(a.batches, a.compile))
    res = bench_generate.run(args(a.batches, False))
    partial(res)
    comp = bench_generate.run(args(compile_batches, True))
    by_batch = {r["batch"]: r for r in comp["results"]}
    for row in res["results"]:
        c = by_batch.get(row["batch"])
        if c is None:
            continue
        base = [k for k in row if k.startswith("hf_") and k.endswith("_s")][0]
        for k, v in c.items():
            if k.endswith("_compiled_s"):
                row[k] = v
                row[k.replace("_s", "_speedup_vs_hf")] = round(row[base] / v, 2)
        row["hf_second_run_s"] = c[base]  # the compiled run's own HF time (machine drift check)
    res["compiled_batches"] = compile_batches
    return res


# ---------------------------------------------------------------------------------------------
# (b) end to end through Triton vs in process


def section_e2e(a: argparse.Namespace, device: str) -> dict:
    from lsgpt.launcher import LaunchError, find_tritonserver

    try:
        find_tritonserver()
    except LaunchError as e:
        return {"skipped": str(e)}
    import numpy as np
    import torch
    import tritonclient.grpc as grpcclient

    import bench_generate
    from common import copy_repository_skeleton
    from lsgpt.engine import Engine, SamplingParams
    from lsgpt.repository import publish

    n = a.e2e_new_tokens
    max_step = a.prompt_len + n
    model = bench_generate.random_model(a.layers, a.hidden, a.heads, a.vocab, max(max_step, 1024))
    g = torch.Generator().manual_seed(7)
    prompts = torch.randint(1000, a.vocab, (8, a.prompt_len), generator=g).tolist()
    rows = []
    with tempfile.TemporaryDirectory(prefix="lsgpt-bench-") as tmp:
        fp, q = bench_generate.export_pair(model, Path(tmp), max_step)
        repo = Path(tmp) / "repository"
        copy_repository_skeleton(ROOT / "model_repository", repo)
        publish(fp, repo, "gpt2", lightseq=False)
        publish(q, repo, "gpt2_int8", lightseq=False)
        engines = {"gpt2": Engine.load(fp, device), "gpt2_int8": Engine.load(q, device)}
        params = SamplingParams(max_new_tokens=n, top_k=1, ignore_eos=True)
        with served(repo, ["gpt2", "gpt2_int8"], threads=a.threads or None,
                    device=device if device.startswith("cuda") else None) as (url, server):
            clients = [grpcclient.InferenceServerClient(url) for _ in range(8)]

            def request(c, model_name: str, p: list[int]):
                ins = []
                for name, arr in (("token_ids", np.array([p], np.int32)), ("max_new_tokens", np.array([[n]], np.int32)),
                                  ("top_k", np.array([[1]], np.int32))):
                    t = grpcclient.InferInput(name, list(arr.shape), "INT32")
                    t.set_data_from_numpy(arr)
                    ins.append(t)
                return c.infer(model_name, ins).as_numpy("result")[0].tolist()

            def concurrent(model_name: str, ps: list[list[int]]):
                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(len(ps)) as ex:
                    return list(ex.map(lambda i: request(clients[i], model_name, ps[i]), range(len(ps))))

            for m, eng in engines.items():
                for label, ps in (("1 prompt", prompts[:1]), ("8 prompts at once", prompts)):
                    fns = {
                        "in_process": lambda eng=eng, ps=ps: eng.generate(ps, params),
                        "triton": (lambda m=m, ps=ps: [request(clients[0], m, ps[0])]) if len(ps) == 1
                        else (lambda m=m, ps=ps: concurrent(m, ps)),
                    }
                    med, outs = _interleaved(fns, a.e2e_runs, device)
                    # The server pads nothing for ignore_eos=False rows that end early; compare the common prefix.
                    same = all(t[: len(i)] == i or i[: len(t)] == t for i, t in zip(outs["in_process"], outs["triton"]))
                    row = {"model": m, "request": label, "batch": len(ps), "new_tokens": n,
                           "in_process_s": round(med["in_process"], 4), "triton_s": round(med["triton"], 4),
                           "triton_over_in_process": round(med["triton"] / med["in_process"], 2),
                           "overhead_ms": round(1000 * (med["triton"] - med["in_process"]), 1), "same_tokens": same}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            for c in clients:
                c.close()
    return {"task": "e2e", "prompt_len": a.prompt_len, "new_tokens": n, "runs": a.e2e_runs,
            "server_threads": a.threads or "torch default", "results": rows,
            "note": "triton = tritonclient gRPC infer() timed at the client (client -> server -> client); "
                    "the server's engine runs greedy without ignore_eos, so a row may stop at EOS earlier"}


def _interleaved(fns: dict, runs: int, device: str) -> tuple[dict[str, float], dict]:
    """Warm every path, then run them in turns (machine noise hits all alike); medians and last outputs."""
    import torch

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    outs = {k: f() for k, f in fns.items()}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for k, f in fns.items():
            time.sleep(0.2)  # let the other side's OpenMP threads stop spinning (2-core boxes)
            sync()
            t = time.perf_counter()
            outs[k] = f()
            sync()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}, outs


# ---------------------------------------------------------------------------------------------
# (c) training throughput


def section_train(a: argparse.Namespace, device: str, work: Path) -> dict:
    script = HERE / "train_throughput.py"
    if not script.is_file():
        return {"skipped": f"{script.relative_to(ROOT)} not present"}
    out = work / "train.json"
    cmd = [sys.executable, str(script), "--out", str(out), *a.train_arg]
    print("  " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.train_timeout)
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
        return {"skipped": f"train_throughput.py failed (exit {proc.returncode}): " + " | ".join(tail)}
    res = json.loads(out.read_text())
    modes = {k: v for k, v in res.get("modes", {}).items() if isinstance(v, dict) and "tokens_per_s" in v}
    base_name = "hf-fp16" if "hf-fp16" in modes else "hf-fp32"
    base = modes.get(base_name, {}).get("tokens_per_s")
    for v in modes.values():
        if base:
            v[f"vs_{base_name}"] = round(v["tokens_per_s"] / base, 2)
    res["baseline"] = base_name
    res["command"] = " ".join(["python", str(script.relative_to(ROOT)), *a.train_arg])
    return res


# ---------------------------------------------------------------------------------------------
# Report: Markdown + bar charts


def markdown(report: dict) -> str:
    out = [f"Device: **{report['device_name']}** ({report['device']}), torch {report.get('torch', '?')}, "
           f"threads {report.get('threads', '?')}. Command: `{report['command']}`", ""]
    gen = report["sections"].get("generate")
    if gen and "results" in gen:
        rows = gen["results"]
        keys = _gen_keys(rows)
        s = gen["shape"]
        out += [f"**Generation** — {s['layers']} layers, {s['hidden']} hidden, vocab {s['vocab']}, prompt "
                f"{rows[0]['prompt_len']} tokens, {rows[0]['new_tokens']} new tokens, greedy; seconds (× = speed-up "
                f"vs {keys[0][:-2]}; int8 GEMM backend: {gen.get('int8_backend')})", "",
                "| batch | " + " | ".join(k[:-2] for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for r in rows:
            cells = [f"{r[keys[0]]:.3f}"] + [f"{r[k]:.3f} ({r[keys[0]] / r[k]:.2f}×)" if k in r else "—"
                                             for k in keys[1:]]
            out.append(f"| {r['batch']} | " + " | ".join(cells) + " |")
        out.append("")
    elif gen:
        out += [f"**Generation**: skipped ({gen.get('skipped')})", ""]
    e2e = report["sections"].get("e2e")
    if e2e and "results" in e2e:
        out += [f"**End to end** — the same exported model and request, {e2e['new_tokens']} new tokens greedy, median "
                f"of {e2e['runs']}: through tritonserver (gRPC, Python backend) vs the engine in process", "",
                "| model | request | in process s | Triton s | Triton / in process | overhead ms | same tokens |",
                "|---|---|---|---|---|---|---|"]
        for r in e2e["results"]:
            out.append(f"| {r['model']} | {r['request']} | {r['in_process_s']:.3f} | {r['triton_s']:.3f} | "
                       f"{r['triton_over_in_process']:.2f}× | {r['overhead_ms']:.0f} | {'yes' if r['same_tokens'] else 'NO'} |")
        out.append("")
    elif e2e:
        out += [f"**End to end**: skipped ({e2e.get('skipped')})", ""]
    tr = report["sections"].get("train")
    if tr and "modes" in tr:
        s = tr.get("shape", {})
        out += [f"**Training** (HF Trainer, random tokens) — {s.get('n_layer')} layers, {s.get('n_embd')} hidden, "
                f"block {s.get('block')}, batch {s.get('batch')}; {tr.get('device')}", "",
                f"| mode | precision | tokens/s | vs {tr['baseline']} |", "|---|---|---|---|"]
        for m, v in tr["modes"].items():
            if "tokens_per_s" in v:
                out.append(f"| {m} | {v.get('precision')} | {v['tokens_per_s']:.0f} | "
                           f"{v.get('vs_' + tr['baseline'], float('nan')):.2f}× |")
            else:
                out.append(f"| {m} | — | skipped: {v.get('skipped', '?')} | |")
        out.append("")
    elif tr:
        out += [f"**Training**: skipped ({tr.get('skipped')})", ""]
    return "\n".join(out)


def _gen_keys(rows: list[dict]) -> list[str]:
    """Timed columns (HF first), over all rows: compiled engines may be timed at some batch sizes only."""
    keys = dict.fromkeys(k for r in rows for k in r if k.endswith("_s") and k != "hf_second_run_s")
    return sorted(keys, key=lambda k: not k.startswith("hf_"))


def _bars(ax, groups: list[str], series: dict[str, list[float]], fmt: str, labels: dict[str, list[str]] | None = None):
    width = 0.8 / max(1, len(series))
    for j, (name, vals) in enumerate(series.items()):
        xs = [i + j * width for i in range(len(groups))]
        bars = ax.bar(xs, vals, width, label=name)
        ax.bar_label(bars, labels=(labels or {}).get(name) or [fmt % v for v in vals], fontsize=7, padding=1)
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(groups))], groups)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.margins(y=0.12)  # room for the bar labels


def plot(report: dict, out: Path) -> list[Path]:
    plt = pyplot()
    if plt is None:
        print("matplotlib not installed: no PNG (re-make them elsewhere with --replot bench.json)")
        return []
    made = []
    dev = report["device_name"]
    gen = report["sections"].get("generate")
    if gen and "results" in gen:
        rows = gen["results"]
        keys = _gen_keys(rows)
        base = keys[0]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2))
        _bars(a1, [f"batch {r['batch']}" for r in rows], {k[:-2]: [r.get(k, 0.0) for r in rows] for k in keys}, "%.2f")
        a1.set(ylabel="seconds (lower is better)", title="generation time")
        _bars(a2, [f"batch {r['batch']}" for r in rows], {k[:-2]: [r[base] / r[k] if k in r else 0.0 for r in rows] for k in keys}, "%.1f×")
        a2.set(ylabel=f"speed-up vs {base[:-2]} (higher is better)", title="speed-up")
        s = gen["shape"]
        fig.suptitle(f"{rows[0]['new_tokens']} new tokens, {s['layers']}L/{s['hidden']}H/vocab {s['vocab']} — {dev}",
                     fontsize=10)
        fig.tight_layout()
        made.append(out / "bench_generate.png")
        fig.savefig(made[-1], dpi=110)
        plt.close(fig)
    e2e = report["sections"].get("e2e")
    if e2e and "results" in e2e:
        rows = e2e["results"]
        groups = [f"{r['model']}\n{r['request']}" for r in rows]
        fig, ax = plt.subplots(figsize=(2.2 + 2.2 * len(rows), 4.2))
        _bars(ax, groups, {"in process": [r["in_process_s"] * 1000 for r in rows],
                           "through Triton (gRPC)": [r["triton_s"] * 1000 for r in rows]}, "%.0f",
              {"through Triton (gRPC)": [f"{r['triton_s'] * 1000:.0f} ({r['triton_over_in_process']:.2f}×)" for r in rows]})
        ax.set(ylabel="ms until every result is back (lower is better)",
               title=f"end to end vs in process, {e2e['new_tokens']} new tokens — {dev}")
        fig.tight_layout()
        made.append(out / "bench_e2e.png")
        fig.savefig(made[-1], dpi=110)
        plt.close(fig)
    tr = report["sections"].get("train")
    if tr and "modes" in tr:
        modes = {m: v for m, v in tr["modes"].items() if "tokens_per_s" in v}
        if modes:
            fig, ax = plt.subplots(figsize=(2 + 1.6 * len(modes), 4.2))
            bars = ax.bar(list(modes), [v["tokens_per_s"] for v in modes.values()],
                          color=["#999999" if m.startswith("hf") else "#1f77b4" for m in modes])
            ax.bar_label(bars, labels=[f"{v['tokens_per_s']:.0f}\n({v.get('vs_' + tr['baseline'], 0):.2f}×)"
                                       for v in modes.values()], fontsize=8)
            ax.set(ylabel="training tokens / s (higher is better)", title=f"training throughput — {tr.get('device', dev)}")
            ax.grid(axis="y", alpha=0.3)
            ax.margins(y=0.15)
            fig.tight_layout()
            made.append(out / "bench_train.png")
            fig.savefig(made[-1], dpi=110)
            plt.close(fig)
    return made


def write_outputs(report: dict, out: Path, json_path: Path | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    json_path = json_path or out / "bench.json"
    json_path.write_text(json.dumps(report, indent=1, ensure_ascii=False))
    md = markdown(report)
    (out / "bench.md").write_text(md + "\n")
    pngs = plot(report, out)
    print(md)
    print(f"wrote {json_path}, {out / 'bench.md'}" + "".join(f", {p}" for p in pngs))


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--device", help="cpu / cuda (default: cuda when present)")
    p.add_argument("--gpu-defaults", action="store_true",
                   help="the article's sizes: 12L/768H/12 heads/vocab 21128, 500 new tokens, batch 1,8,32, 3 repeats")
    p.add_argument("--layers", type=int)
    p.add_argument("--hidden", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--vocab", type=int)
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--new-tokens", type=int, help="generation section (default: 500 GPU, 64 CPU)")
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], help="default: 1,8,32 GPU, 1,8 CPU")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads here and OMP_NUM_THREADS of the server (default: 1 on CPU; 0 = torch default)")
    p.add_argument("--compile", action="store_true", help="CUDA: also torch.compile'd decode steps")
    p.add_argument("--compile-batches", type=lambda s: [int(x) for x in s.split(",")],
                   help="with --compile: only these batch sizes get compiled engines (default: all)")
    p.add_argument("--e2e-new-tokens", type=int, default=32)
    p.add_argument("--e2e-runs", type=int, default=5)
    p.add_argument("--train-arg", action="append", default=[],
                   help="argument passed to train_throughput.py (repeatable), e.g. --train-arg=--steps=5")
    p.add_argument("--train-timeout", type=float, default=900)
    p.add_argument("--out", type=Path, help="output folder (default results/<device>)")
    p.add_argument("--replot", type=Path, help="re-make the Markdown and PNGs from a bench.json, nothing else")
    a = p.parse_args(argv)
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.replot:
        report = json.loads(a.replot.read_text())
        write_outputs(report, a.out or a.replot.parent, a.replot if a.out is None else None)
        return 0
    import torch

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.startswith("cuda")
    shape = GPU_SHAPE if (gpu or a.gpu_defaults) else CPU_SHAPE
    for k, v in shape.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.new_tokens is None:
        a.new_tokens = 500 if (gpu or a.gpu_defaults) else 64
    if a.batches is None:
        a.batches = [1, 8, 32] if (gpu or a.gpu_defaults) else [1, 8]
    if a.threads is None:
        a.threads = 0 if gpu else 1
    if a.threads:
        torch.set_num_threads(a.threads)
    sections = [s for s in a.sections.split(",") if s]
    if bad := [s for s in sections if s not in SECTIONS]:
        raise SystemExit(f"unknown sections {bad}; choose from {SECTIONS}")
    out = a.out or ROOT / "results" / device_slug(device)
    report: dict = {
        "task": "bench",
        "device": device_slug(device),
        "device_name": torch.cuda.get_device_name(0) if gpu else f"CPU {platform.processor() or platform.machine()}",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "sections": {},
        "seconds": {},
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(sys.argv[1:] if argv is None else argv)]),
    }
    with tempfile.TemporaryDirectory(prefix="lsgpt-bench-") as tmp:
        for s in sections:
            print(f"== {s}", flush=True)
            t0 = time.time()
            if s == "generate":
                def partial(res: dict) -> None:
                    report["sections"]["generate"] = res
                    out.mkdir(parents=True, exist_ok=True)
                    (out / "bench.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))

                res = section_generate(a, device, partial)
            elif s == "e2e":
                res = section_e2e(a, device)
            else:
                res = section_train(a, device, Path(tmp))
            report["sections"][s] = res
            report["seconds"][s] = round(time.time() - t0, 1)
            if "skipped" in res:
                print(f"  skipped: {res['skipped']}", flush=True)
            out.mkdir(parents=True, exist_ok=True)
            (out / "bench.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))  # partial results
    write_outputs(report, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
