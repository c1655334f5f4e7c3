"""Tile sweep of the fused linear kernel (lsgpt.engine.kernels.linear) at large decode batches (issue 33).

The shipped tile rule (kernels._config) was swept at 1 and 64 rows only; a batch of 128-256 rows runs the same
narrow tiles. This times each candidate tile on the article's layer shapes inside a CUDA graph (what the engine
replays), checks every candidate's output against the rule's (int8: equal, the integer sums are exact; fp16:
within rounding), and writes gemm_sweep.json whose "table" LSGPT_GEMM_TABLE applies, so that one GPU call can
run benchmarks.generation with and without it:

    python3 -m benchmarks.gemm_sweep --rows 128,256 --out $OUT/gemm_sweep.json
    LSGPT_GEMM_TABLE=$OUT/gemm_sweep.json python3 -m benchmarks.generation --batches 64,128,256 ...

A shape enters the table only where its best tile beats the rule by --min-gain (default 5%).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch


def shapes(h: int, inner: int, vocab: int) -> dict[str, dict]:
    """name -> K, N and the epilogue the engine runs (scales are arbitrary finite values: speed does not depend
    on them). LayerNorm is its own kernel: the sweep times the GEMM alone."""
    return {
        "qkv": dict(K=h, N=3 * h, opts=dict(alpha=1e-3, deq_scale=0.1, out_scale=10.0)),
        "out": dict(K=h, N=h, residual=True, opts=dict(alpha=1e-3, deq_scale=0.1)),
        "ffn1": dict(K=h, N=inner, opts=dict(alpha=1e-3, deq_scale=0.1, gelu=True, out_scale=10.0)),
        "ffn2": dict(K=inner, N=h, residual=True, opts=dict(deq_scale=1e-4)),
        "head": dict(K=h, N=vocab, head=True, opts=dict(alpha=1e-3, deq_scale=0.1)),
    }


def candidates(int8: bool) -> list[tuple[int, int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): wider M and N tiles than the decode rule, 8 warps
    where the tile is large enough to feed them."""
    bks = (128, 256) if int8 else (64, 128)
    out = []
    for bm, bn, bk in itertools.product((64, 128), (16, 32, 64, 128), bks):
        out.append((bm, bn, bk, 4, 3))
        if bm * bn >= 128 * 64:
            out.append((bm, bn, bk, 8, 3))
    return out


def sweep_shape(K, name: str, s: dict, M: int, int8: bool, rep: int) -> dict:
    from triton.testing import do_bench_cudagraph

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    Kd, N = s["K"], s["N"]
    if int8:
        w = torch.randint(-127, 128, (N, Kd), device=dev, dtype=torch.int8, generator=g).t()  # K-major, as loaded
        x = torch.randint(-127, 128, (M, Kd), device=dev, dtype=torch.int8, generator=g)
        opts = dict(s["opts"])
        out_dt = torch.int8 if "out_scale" in opts else torch.float32 if (s.get("residual") or s.get("head")) else torch.float16
    else:
        w = (torch.randn(N, Kd, device=dev, generator=g) * 0.02).half()
        w = w.t() if s.get("head") else w.t().contiguous()  # fp16 weights are N-major, the tied head K-major
        x = torch.randn(M, Kd, device=dev, generator=g).half()
        opts = {k: v for k, v in s["opts"].items() if k == "gelu"}
        out_dt = torch.float32 if (s.get("residual") or s.get("head")) else torch.float16
    bias = None if s.get("head") else torch.randn(N, device=dev, generator=g).half()
    res0 = torch.randn(M, N, device=dev, generator=g) if s.get("residual") else None

    def run(cfg):
        out = res0.clone() if res0 is not None else torch.empty(M, N, device=dev, dtype=out_dt)
        K.linear(x, w, out, bias=bias, residual=out if res0 is not None else None, config=cfg, **opts)
        return out

    def timed(cfg):
        out = torch.empty(M, N, device=dev, dtype=out_dt)  # (residual in place: the timing does not care)
        return 1e3 * do_bench_cudagraph(
            lambda: K.linear(x, w, out, bias=bias, residual=out if res0 is not None else None, config=cfg, **opts),
            rep=rep)

    rule = K._config(M, N, Kd, int8)
    want = run(rule).float()
    res = {"shape": name, "M": M, "int8": int8, "K": Kd, "N": N, "rule": list(rule), "rule_us": round(timed(rule), 2)}
    rows = []
    for cfg in candidates(int8):
        try:
            got = run(cfg).float()
            t = timed(cfg)
        except Exception as e:  # noqa: BLE001 - a tile the compiler rejects (shared memory, registers) is skipped
            print(f"  skip {name} M={M} {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
            continue
        if int8:
            ok = torch.equal(got, want)
        else:
            ok = torch.allclose(got, want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
        rows.append({"config": list(cfg), "us": round(t, 2), "same_output": bool(ok)})
    good = [r for r in rows if r["same_output"]]
    best = min(good, key=lambda r: r["us"]) if good else None
    res |= {"best": best and best["config"], "best_us": best and best["us"], "candidates": rows,
            "wrong": [r["config"] for r in rows if not r["same_output"]]}
    print(json.dumps({k: v for k, v in res.items() if k != "candidates"}), flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="128,256", help="decode batch sizes (comma-separated)")
    p.add_argument("--dtypes", default="int8,fp16")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--vocab", type=int, default=21128)
    p.add_argument("--rep", type=int, default=25, help="ms of timed replays per candidate")
    p.add_argument("--min-gain", type=float, default=0.05, help="a tile enters the table if this much faster")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gemm_sweep: needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    from lsgpt.engine import kernels as K

    rows = [int(r) for r in a.rows.split(",")]
    report = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__,
              "command": "python -m benchmarks.gemm_sweep " + " ".join(argv if argv is not None else sys.argv[1:]),
              "results": [], "table": {}}
    for dtype in a.dtypes.split(","):
        int8 = dtype == "int8"
        for M in rows:
            for name, s in shapes(a.hidden, 4 * a.hidden, a.vocab).items():
                r = sweep_shape(K, name, s, M, int8, a.rep)
                report["results"].append(r)
                if r["best_us"] is not None and r["best_us"] < (1 - a.min_gain) * r["rule_us"]:
                    report["table"].setdefault(dtype, {}).setdefault(str(M), {})[f"{r['K']}x{r['N']}"] = r["best"]
    # per batch, the summed GEMM time of one layer-stack step (4 GEMMs x layers ignored: the shapes' sum)
    for dtype in a.dtypes.split(","):
        for M in rows:
            rs = [r for r in report["results"] if r["M"] == M and r["int8"] == (dtype == "int8")]
            rule = sum(r["rule_us"] for r in rs)
            best = sum(min(r["rule_us"], r["best_us"] or r["rule_us"]) for r in rs)
            print(f"{dtype} M={M}: the five GEMMs {rule:.1f} us by the rule, {best:.1f} us by the best tiles "
                  f"({rule / best:.2f}x)", flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=1))
    print(f"table: {json.dumps(report['table'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
