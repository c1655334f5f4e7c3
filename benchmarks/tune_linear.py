#!/usr/bin/env python3
"""Tile sweep for the fused linear kernel (lsgpt.kernels.linear) on the GPT-2 layer shapes, int8 and fp16.

Times each (BLOCK_N, BLOCK_K, num_stages) candidate at decode row counts inside a CUDA graph (what the engine
replays), prints the best per shape beside the current heuristic's time, and writes a JSON that
``lsgpt.kernels._config`` cites. Also breaks one decode step down by kernel (torch.profiler).

    python benchmarks/tune_linear.py --rows 1,64 --out results/h100/tune_linear.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench_cudagraph  # noqa: E402

from lsgpt import kernels as K  # noqa: E402


def shapes(h: int, inner: int, vocab: int) -> dict[str, dict]:
    """name -> (K, N, launch options); int8 scales are arbitrary finite values (speed does not depend on them)."""
    return {
        "qkv": dict(K=h, N=3 * h, ln=True, opts=dict(alpha=1e-3, deq_scale=0.1, out_scale=10.0)),
        "out": dict(K=h, N=h, ln=False, residual=True, opts=dict(alpha=1e-3, deq_scale=0.1)),
        "ffn1": dict(K=h, N=inner, ln=True, opts=dict(alpha=1e-3, deq_scale=0.1, gelu=True, out_scale=10.0)),
        "ffn2": dict(K=inner, N=h, ln=False, residual=True, opts=dict(deq_scale=1e-4)),
        "head": dict(K=h, N=vocab, ln=True, opts=dict(alpha=1e-3, deq_scale=0.1), out=torch.float32),
    }


def bench_shape(name: str, s: dict, M: int, int8: bool, configs) -> dict:
    dev = torch.device("cuda")
    Kd, N = s["K"], s["N"]
    wdt = torch.int8 if int8 else torch.float16
    w = (torch.randint(-127, 128, (N, Kd), device=dev, dtype=torch.int8) if int8
         else torch.randn(N, Kd, device=dev, dtype=torch.float16) * 0.02).t()  # K contiguous
    # LayerNorm is its own kernel: the sweep times the GEMM alone
    x = torch.randint(-127, 128, (M, Kd), device=dev, dtype=torch.int8) if int8 else torch.randn(M, Kd, device=dev, dtype=torch.float16)
    ln = None
    out_dt = s.get("out") or (torch.int8 if int8 and "out_scale" in s["opts"] else torch.float32 if s.get("residual") else wdt)
    out = torch.zeros(M, N, device=dev, dtype=out_dt)
    opts = dict(s["opts"]) if int8 else {k: v for k, v in s["opts"].items() if k == "gelu"}
    bias = None if name == "head" else torch.zeros(N, device=dev, dtype=torch.float16)

    def call(cfg):
        return lambda: K.linear(x, w, out, ln=ln, bias=bias, residual=out if s.get("residual") else None,
                                config=cfg, **opts)

    res = {"shape": name, "M": M, "int8": int8, "K": Kd, "N": N}
    res["heuristic"] = K._config(M, N, Kd, int8)
    res["heuristic_us"] = round(1e3 * do_bench_cudagraph(call(None), rep=30), 2)
    best = None
    for cfg in configs:
        try:
            t = 1e3 * do_bench_cudagraph(call(cfg), rep=30)
        except Exception as e:  # noqa: BLE001 - a config the compiler rejects (e.g. shared memory) is skipped
            print(f"  skip {cfg}: {type(e).__name__}")
            continue
        if best is None or t < best[1]:
            best = (cfg, t)
    res["best"], res["best_us"] = best[0], round(best[1], 2)
    gb = (Kd * N * (1 if int8 else 2)) / 1e9
    res["weight_GBps_at_best"] = round(gb / (best[1] * 1e-6))
    print(json.dumps(res), flush=True)
    return res


def bench_attention(M: int, int8: bool, n_head: int = 12, hd: int = 64, S: int = 508, keys: int = 250) -> dict:
    """Decode attention at `keys` cached positions (of S), each (splits, BLOCK_S, warps) candidate."""
    dev = torch.device("cuda")
    H = n_head * hd
    dt = torch.int8 if int8 else torch.float16
    mk = (lambda *s: torch.randint(-127, 128, s, device=dev, dtype=torch.int8)) if int8 else (
        lambda *s: torch.randn(*s, device=dev, dtype=torch.float16))
    q, kc, vc = mk(M, H), mk(M, S, H), mk(M, S, H)
    pos = torch.full((M,), keys - 1, device=dev)
    out = torch.empty(M, H, device=dev, dtype=dt)
    opts = dict(score_scale=1e-4, v_scale=0.01, out_scale=10.0) if int8 else dict(score_scale=0.125)

    def call(cfg):
        return lambda: K.attention(q, kc, vc, pos, 1, n_head, out, config=cfg, **opts)

    res = {"shape": "attention", "M": M, "int8": int8, "keys": keys, "heuristic": K._attention_config(M, n_head, S)}
    res["heuristic_us"] = round(1e3 * do_bench_cudagraph(call(None), rep=30), 2)
    best = None
    for cfg in itertools.product((1, 4, 8), (32, 64), (2, 4)):
        t = 1e3 * do_bench_cudagraph(call(cfg), rep=30)
        if best is None or t < best[1]:
            best = (cfg, t)
    res["best"], res["best_us"] = best[0], round(best[1], 2)
    kv_bytes = 2 * M * keys * H * (1 if int8 else 2)
    res["kv_GBps_at_best"] = round(kv_bytes / 1e9 / (best[1] * 1e-6))
    print(json.dumps(res), flush=True)
    return res


def step_breakdown(batch: int) -> dict:
    """One decode step of the article's shape, fused int8 and fp16: launches and GPU µs per kernel name."""
    import tempfile

    import bench_generate
    from lsgpt.engine import Engine

    model = bench_generate.random_model(12, 768, 12, 21128, 1024)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        fp, q = bench_generate.export_pair(model, Path(tmp), 508)
        for label, path in (("fp16", fp), ("int8", q)):
            out[label] = bench_generate.profile_decode(Engine.load(path, "cuda"), batch, steps=11)["per_kernel"]
            print(label, json.dumps(out[label][:12]), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,64")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--vocab", type=int, default=21128)
    p.add_argument("--breakdown", action="store_true", help="also profile one decode step per kernel")
    p.add_argument("--out", type=Path, default=Path("results/tune_linear.json"))
    a = p.parse_args()
    rows = [int(r) for r in a.rows.split(",")]
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
              "command": "python " + " ".join(sys.argv), "results": []}
    for int8 in (True, False):
        for M in rows:
            if M <= 16:
                bks = (128, 256, 512) if int8 else (64, 128, 256)
                configs = [(16, bn, bk, 4, 3) for bn, bk in itertools.product((16, 32, 64), bks)]
            else:
                bks = (64, 128) if int8 else (32, 64)
                configs = [(64, bn, bk, 4, 3) for bn, bk in itertools.product((32, 64, 128), bks)]
            for name, s in shapes(a.hidden, 4 * a.hidden, a.vocab).items():
                report["results"].append(bench_shape(name, s, M, int8, configs))
    for int8 in (True, False):
        for M in rows:
            report["results"].append(bench_attention(M, int8))
    if a.breakdown:
        report["breakdown_batch1"] = step_breakdown(1)
        report["breakdown_batch64"] = step_breakdown(64)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
