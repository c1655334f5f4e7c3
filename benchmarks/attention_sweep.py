#!/usr/bin/env python3
"""Decode attention launch settings, swept on the GPU: which (SPLITS, BLOCK_S, num_warps) of
`lsgpt.engine.kernels.attention` is fastest per batch size, against the one `_attention_config` picks today.

At batch 64 and a 300-token context the int8 attention is 46% of a decode step (309 of 671 µs on the H100,
`results/h100/fastpath/fusion-ab-2026-11-27/NOTES.md`) while its int8 cache is ~30 MB: it is latency-bound, not
bandwidth-bound, so how the work is cut into programs is the lever. This script measures that, one kernel, with
CUDA events (triton.testing.do_bench, median), on random int8 / fp16 caches of the article's model (12 heads × 64).
Every setting's output is checked against the default's (int8: within one step; fp16: 5e-3); a setting that
disagrees is reported and never chosen.

    python benchmarks/attention_sweep.py                                  # GPU: ~3 min, int8 and fp16
    python benchmarks/attention_sweep.py --rows 64,256 --contexts 150,450 --dtypes int8
    TRITON_INTERPRET=1 python benchmarks/attention_sweep.py --quick       # CPU smoke run (the interpreter)

Writes results/<device>/attention_sweep/attention_sweep.{json,md}.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import math
import os
import sys
import time
from pathlib import Path

import common


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,8,32,64,128,256", help="decode rows (one query each)")
    p.add_argument("--contexts", default="150,400", help="keys each row attends to (positions 0..context-1)")
    p.add_argument("--cache-len", type=int, default=512, help="the KV cache's length (a CUDA graph's static bound)")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtypes", default="int8,fp16")
    p.add_argument("--splits", default="1,2,4,8,16")
    p.add_argument("--block-s", default="32,64,128")
    p.add_argument("--warps", default="2,4,8")
    p.add_argument("--quick", action="store_true", help="tiny shapes and few settings (the CPU interpreter)")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def best_table(results: list[dict]) -> dict[str, dict[str, list[int]]]:
    """Per dtype and row count, the setting with the least total time over the contexts swept, among those
    that agreed with the default at every context: {dtype: {rows: [keys per split, BLOCK_S, warps]}} — the
    format of `lsgpt.engine.kernels.ATTENTION_TABLE` and of LSGPT_ATTENTION_TABLE."""
    from lsgpt.engine.kernels import (
        keys_per_split,  # as main() imports the kernels: after the interpreter is chosen
    )

    total: dict[tuple[str, int], dict[tuple, list[float]]] = {}
    for r in results:
        per = total.setdefault((r["dtype"], r["rows"]), {})
        for x in r["settings"]:
            per.setdefault(tuple(x["config"]), []).append(x["us"] if x.get("agrees") else float("inf"))
    n_ctx = {key: sum(1 for r in results if (r["dtype"], r["rows"]) == key) for key in total}
    table: dict[str, dict[str, list[int]]] = {}
    for (dtype, rows), per in sorted(total.items()):
        full = {c: sum(t) for c, t in per.items() if len(t) == n_ctx[(dtype, rows)]}
        splits, block_s, warps = min(full, key=full.get)
        cache_len = next(r["cache_len"] for r in results if (r["dtype"], r["rows"]) == (dtype, rows))
        table.setdefault(dtype, {})[str(rows)] = [keys_per_split(cache_len, splits, block_s), block_s, warps]
    return table


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.quick:
        a.rows, a.contexts, a.cache_len, a.heads, a.head_dim = "1,3", "40", 64, 2, 16
        a.splits, a.block_s, a.warps = "1,2", "16,32", "1,4"
    import torch

    from lsgpt.engine import kernels as K

    bad = set(a.dtypes.split(",")) - {"int8", "fp16"}
    if bad:
        raise SystemExit(f"attention_sweep: --dtypes takes int8 and/or fp16, not {', '.join(sorted(bad))}")
    interp = bool(os.environ.get("TRITON_INTERPRET"))
    dev = "cuda" if torch.cuda.is_available() and not interp else "cpu"
    if dev == "cpu" and not interp:
        raise SystemExit("attention_sweep: no GPU; on the CPU run it under TRITON_INTERPRET=1 (--quick)")
    out_dir = common.results_dir("attention_sweep", a.out, dev)
    n_head, hd = a.heads, a.head_dim
    H = n_head * hd
    g = torch.Generator().manual_seed(0)
    rows_list, contexts = ints(a.rows), ints(a.contexts)
    settings = list(itertools.product(ints(a.splits), ints(a.block_s), ints(a.warps)))
    results, lines = [], []
    t_start = time.time()

    def timed(fn) -> float:
        if dev == "cpu":  # the interpreter: one call, wall clock (a smoke run, not a figure)
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e6
        from triton.testing import do_bench

        return do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3  # µs

    for dtype, rows, ctx in itertools.product(a.dtypes.split(","), rows_list, contexts):
        int8 = dtype == "int8"
        S = a.cache_len
        if int8:
            q = torch.randint(-127, 128, (rows, H), generator=g, dtype=torch.int8)
            kc = torch.randint(-127, 128, (rows, S, H), generator=g, dtype=torch.int8)
            vc = torch.randint(-127, 128, (rows, S, H), generator=g, dtype=torch.int8)
        else:
            q, kc, vc = (torch.randn(shape, generator=g).half() for shape in ((rows, H), (rows, S, H), (rows, S, H)))
        q, kc, vc = q.to(dev), kc.to(dev), vc.to(dev)
        pos = torch.full((rows,), ctx - 1, dtype=torch.long, device=dev)
        s = 3.0 / 127
        kw = dict(score_scale=s * s / math.sqrt(hd), v_scale=s, out_scale=127 / 1.5) if int8 else \
            dict(score_scale=1 / math.sqrt(hd))
        out_dtype = torch.int8 if int8 else torch.float16
        sem = torch.zeros(rows * n_head, dtype=torch.int32, device=dev)

        run = functools.partial(K.attention, q, kc, vc, pos, 1, n_head, sem=sem, **kw)  # (out, config=...)
        default = K._attention_config(rows, n_head, S, int8)
        want = run(torch.empty(rows, H, dtype=out_dtype, device=dev), config=default).clone()
        entry = {"dtype": dtype, "rows": rows, "context": ctx, "cache_len": S, "default": list(default), "settings": []}
        for config in dict.fromkeys([default, *settings]):
            splits, block_s, warps = config
            if config != default and splits > 1 and splits * block_s > S:  # today's choice is always timed
                continue
            out = torch.empty(rows, H, dtype=out_dtype, device=dev)
            try:
                got = run(out, config=config)
                diff = float((got.float() - want.float()).abs().max())
                ok = diff <= (1 if int8 else 5e-3) and bool((sem == 0).all())
                us = timed(functools.partial(run, out, config=config))
            except Exception as e:  # noqa: BLE001 - a setting Triton cannot compile is reported, not fatal
                entry["settings"].append({"config": list(config), "error": f"{type(e).__name__}: {e}"[:200]})
                continue
            entry["settings"].append({"config": list(config), "us": round(us, 2), "agrees": ok, "max_diff": diff})
        good = [x for x in entry["settings"] if x.get("agrees")]
        base = next(x for x in entry["settings"] if x["config"] == list(default))
        best = min(good, key=lambda x: x["us"])
        entry |= {"default_us": base["us"], "best": best["config"], "best_us": best["us"],
                  "speedup": round(base["us"] / best["us"], 3) if best["us"] else None,
                  "disagreeing": [x["config"] for x in entry["settings"] if "agrees" in x and not x["agrees"]]}
        results.append(entry)
        line = (f"| {dtype} | {rows} | {ctx} | {tuple(default)} {base['us']:.1f} | {tuple(best['config'])} "
                f"{best['us']:.1f} | {entry['speedup']:.2f}× |")
        lines.append(line)
        print(line, flush=True)

    table = best_table(results)
    lines.append("")
    lines += [f"table {dtype} rows <= {rows}: keys per split {cfg[0]}, BLOCK_S {cfg[1]}, warps {cfg[2]}"
              for dtype, by_rows in table.items() for rows, cfg in by_rows.items()]
    head = (f"Decode attention settings (SPLITS, BLOCK_S, num_warps), {n_head} heads × {hd}, cache {a.cache_len}; "
            f"µs per call, median (do_bench) on {common.device_slug(dev)}\n\n"
            "| dtype | rows | context | today's setting, µs | best setting, µs | speed-up |\n|---|---|---|---|---|---|")
    md = head + "\n" + "\n".join(lines) + "\n"
    (out_dir / "attention_sweep.md").write_text(md)
    common.write_json(out_dir / "attention_sweep.json", {
        "task": "attention_sweep", "device": common.device_slug(dev), "interpreter": interp,
        "heads": n_head, "head_dim": hd, "cache_len": a.cache_len, "results": results, "table": table,
        "seconds": round(time.time() - t_start, 1), "command": common.command_line(argv)})
    print(md)
    print(f"wrote {out_dir / 'attention_sweep.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
