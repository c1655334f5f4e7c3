#!/usr/bin/env python3
"""`make bench`: every speed question in one run, each into results/tmp/<device>/<benchmark>/ (--record: results/):
generation (generation.py), serving overhead (serving.py --sections overhead) and training
(train_throughput.py, run as a subprocess; its table and figure are made here, in the train/ folder).

    python -m benchmarks.bench                                    # CPU: a few minutes
    python -m benchmarks.bench --sections train --train-arg=--steps=5
    python -m benchmarks.bench --replot results/h100/train/train-throughput.json --out results/tmp/replot   # the training figure again
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from benchmarks import common, generation, serving

SECTIONS = ("generation", "serving", "train")


def train_report(res: dict, out: Path) -> None:
    """Markdown table and bar chart of a train_throughput.py JSON, speeds against HF fp16 (else fp32)."""
    modes = {m: v for m, v in res["modes"].items() if "tokens_per_s" in v}
    base = "hf-fp16" if "hf-fp16" in modes else "hf-fp32"
    vs = {m: v["tokens_per_s"] / modes[base]["tokens_per_s"] if base in modes else 0.0 for m, v in modes.items()}
    s = res.get("shape", {})
    md = [f"**Training** (HF Trainer, random tokens) — {s.get('n_layer')} layers, {s.get('n_embd')} hidden, block "
          f"{s.get('block')}, batch {s.get('batch')}; {res.get('device')}", "", f"| mode | precision | tokens/s | vs {base} |",
          "|---|---|---|---|"] + [f"| {m} | {v.get('precision', '—')} | " + (f"{v['tokens_per_s']:.0f} | {vs[m]:.2f}× |"
                                   if m in modes else f"skipped: {v.get('skipped', '?')} | |") for m, v in res["modes"].items()]
    (out / "train_throughput.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    with common.figure(out / "train_throughput.png", figsize=(2 + 1.6 * len(modes), 4.2)) as (fig, ax):
        if fig is not None:
            b = ax.bar(list(modes), [v["tokens_per_s"] for v in modes.values()],
                       color=["#999999" if m.startswith("hf") else "#1f77b4" for m in modes])
            ax.bar_label(b, labels=[f"{v['tokens_per_s']:.0f}\n({vs[m]:.2f}×)" for m, v in modes.items()], fontsize=8)
            ax.set(ylabel="training tokens / s (higher is better)", title=f"training throughput — {res.get('device')}")
            ax.grid(axis="y", alpha=0.3)
            ax.margins(y=0.15)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", type=common.sections_type(SECTIONS), default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--generation-arg", action="append", default=[], help="passed to generation.py (repeatable)")
    p.add_argument("--serving-arg", action="append", default=[], help="passed to serving.py (repeatable)")
    p.add_argument("--train-arg", action="append", default=[], help="passed to train_throughput.py (repeatable)")
    p.add_argument("--train-timeout", type=float, default=900)
    p.add_argument("--record", action="store_true", help="write into results/<device>/ (committed) instead of "
                   "results/tmp/<device>/ (git-ignored)")
    p.add_argument("--replot", type=Path, help="only re-make the training table and figure from its JSON")
    p.add_argument("--out", type=Path, help="--replot: the folder for them (default: the JSON's)")
    a = p.parse_args(argv)
    if a.replot:
        res, out = common.read_replot(a.replot, "bench"), a.out or a.replot.parent
        out.mkdir(parents=True, exist_ok=True)
        train_report(res, out)
        return 0
    status, sections, rec = 0, a.sections, ["--record"] if a.record else []
    if "generation" in sections:
        status |= generation.main(a.generation_arg + rec)
    if "serving" in sections:
        status |= serving.main(["--sections", "overhead", *a.serving_arg, *rec])
    if "train" in sections:
        out = common.results_dir("train", record=a.record)
        cmd = [sys.executable, "-m", "benchmarks.train_throughput", "--out",
               str(out / "train_throughput.json"), *a.train_arg]
        print(" ".join(cmd), flush=True)
        if subprocess.run(cmd, timeout=a.train_timeout, cwd=common.ROOT).returncode == 0:
            train_report(json.loads((out / "train_throughput.json").read_text()), out)
        else:
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
