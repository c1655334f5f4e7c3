#!/usr/bin/env python3
"""Serving: what does tritonserver cost over the engine in process, and does in-flight batching answer a
short request while a long one runs? One real tritonserver (gRPC, our Python-based backend), two sections:

  overhead  the same exported random GPT-2 (fp and int8) and the same greedy request — one prompt, and 8
            prompts at once — through the server (client -> server -> client, requests built by the client
            library) vs Engine.generate in this process; interleaved runs, medians.
  inflight  a 5-token request sent while a long one runs (probe: in-flight batching answers it at once), then
            closed-loop mixed load per concurrency (prompts 4..64 random ids, 16..256 new tokens): requests/s,
            generated tokens/s, latency p50/p95, failures.
            Also, per level, the mean running batch (tokens per decode step).

    python -m benchmarks.serving                                       # both sections, a random model
    python -m benchmarks.serving --sections overhead --layers 12 --hidden 768 --heads 12 --new-tokens 500
    python -m benchmarks.serving --sections inflight --hdf5 model/fp16/pytorch_model.hdf5 --concurrency 1,8,32
    git worktree add /tmp/before <commit>; cd /tmp/before && PYTHONPATH=/tmp/before:$OLDPWD python -m \\
        benchmarks.serving --sections inflight --hdf5 ... --out /tmp/sv-before   # the same load, the older lsgpt

Writes results/tmp/<device>/serving/serving.{json,md,png} (--record: results/<device>/serving/).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks import common
from lsgpt.contract import VOCAB_SIZE


def overhead(a, url: str, files: dict[str, Path]) -> dict:
    import tritonclient.grpc as grpcclient

    from lsgpt.engine.engine import Engine, SamplingParams

    n, rows = a.new_tokens, []
    g = np.random.default_rng(7)
    prompts = g.integers(1000, a.vocab, (8, a.prompt_len)).tolist()
    params = SamplingParams(max_new_tokens=n, top_k=1, ignore_eos=True)
    clients = [grpcclient.InferenceServerClient(url) for _ in range(8)]
    with ThreadPoolExecutor(8) as pool:
        for m, f in files.items():
            eng = Engine.load(f, a.device)
            for label, ps in (("1 prompt", prompts[:1]), ("8 prompts at once", prompts)):
                med, outs = common.timed({
                    "in_process": lambda eng=eng, ps=ps: eng.generate(ps, params),
                    "triton": lambda m=m, ps=ps: list(pool.map(lambda i: common.infer(clients[i], m, ps[i], n), range(len(ps)))),
                }, a.runs, a.device, pause=0.2)
                # the server runs without ignore_eos: a row may stop at EOS earlier; compare the common prefix
                same = all(x[: len(y)] == y or y[: len(x)] == x for y, x in zip(outs["in_process"], outs["triton"]))
                rows.append({"model": m, "request": label, "batch": len(ps), "new_tokens": n,
                             "in_process_s": round(med["in_process"], 4), "triton_s": round(med["triton"], 4),
                             "triton_over_in_process": round(med["triton"] / med["in_process"], 2),
                             "overhead_ms": round(1000 * (med["triton"] - med["in_process"]), 1), "same_tokens": same})
                print(json.dumps(rows[-1]), flush=True)
    for c in clients:
        c.close()
    return {"task": "e2e", "prompt_len": a.prompt_len, "new_tokens": n, "runs": a.runs, "results": rows,
            "server_threads": a.threads or "torch default",
            "note": "triton = tritonclient gRPC infer() timed at the client (client -> server -> client)"}


def make_load(rng: random.Random, vocab: int, cap: int, count: int) -> list[tuple[list[int], int]]:
    lens = [rng.randint(4, min(64, cap // 2)) for _ in range(count)]
    return [([rng.randint(100, vocab - 1) for _ in range(k)], min(rng.randint(16, 256), cap - k)) for k in lens]


def scrape(port: int, model: str) -> dict[str, float]:
    """The model's lsgpt_* counters from Triton's metrics port ({} when it has none: an older checkout)."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("lsgpt_") and f'model="{model}"' in line:
            key, _, value = line.rpartition(" ")
            out[key.split("{")[0]] = float(value)
    return out


def closed_loop(send, conc: int, reqs: list) -> dict:
    """`conc` threads send `reqs` back to back through send(thread_state, prompt, new) -> new tokens."""
    lat, gen, fails, lock, it = [], [0], [0], threading.Lock(), iter(reqs)

    def worker():
        state: dict = {}
        while (r := next(it, None)) is not None:  # next() on a list iterator is thread-safe in CPython
            t0 = time.perf_counter()
            try:
                k = send(state, *r)
            except Exception:  # noqa: BLE001 - counted, reported
                with lock:
                    fails[0] += 1
                continue
            with lock:
                lat.append(time.perf_counter() - t0)
                gen[0] += k

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(conc)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    p50, p95 = (common.percentile(lat, q, digits=4) for q in (50, 95))
    row = {"concurrency": conc, "requests": len(reqs), "failed": fails[0], "wall_s": round(wall, 3),
           "requests_per_s": round(len(lat) / wall, 2), "output_tokens_per_s": round(gen[0] / wall, 1),
           "latency_p50_s": p50, "latency_p95_s": p95, "mean_new_tokens": round(gen[0] / max(1, len(lat)), 1)}
    return row


def inflight(a, url: str, model: str, hdf5: Path, server=None) -> dict:
    from lsgpt.format import read_hdf5

    cfg, _ = read_hdf5(hdf5)
    rng, cap = random.Random(a.seed), cfg.max_step - 1
    res: dict = {"model": model, "max_step": cfg.max_step, "levels": []}
    import tritonclient.grpc as grpcclient

    def send(state, prompt, new):
        c = state.setdefault("c", grpcclient.InferenceServerClient(url))
        return len(common.infer(c, model, prompt, new)) - len(prompt)  # one row: no EOS padding

    for n in (3, 4, 8, 16, 17, 32, 33, 48, 64):  # warm-up: every prefill tile shape compiles here, not mid-run
        send({}, [101 + i for i in range(min(n, cap // 2))], 4)
    long_new, times = min(256, cap - 8), {}

    def probe(name, prompt, new):
        t0 = time.perf_counter()
        send({}, prompt, new)
        times[name] = time.perf_counter() - t0

    t_long = threading.Thread(target=probe, args=("long", [101 + i for i in range(8)], long_new))
    t_long.start()
    time.sleep(0.05)
    probe("short", [201, 202, 203, 204], 5)
    t_long.join()
    res["probe"] = {"long_new_tokens": long_new, "long_s": round(times["long"], 4), "short_s": round(times["short"], 4),
                    "short_over_long": round(times["short"] / times["long"], 3)}
    print(json.dumps(res["probe"]), flush=True)
    for conc in a.concurrency:
        m0 = scrape(server.metrics_port, model) if server is not None else {}
        row = closed_loop(send, conc, make_load(rng, cfg.vocab, cap, a.requests))
        if "lsgpt_decode_steps_total" in m0:  # the metrics thread publishes every 0.5 s
            time.sleep(1.2)
            m1 = scrape(server.metrics_port, model)
            steps = m1["lsgpt_decode_steps_total"] - m0["lsgpt_decode_steps_total"]
            row |= {"steps": int(steps), "tokens_per_step": round(
                (m1["lsgpt_generated_tokens_total"] - m0["lsgpt_generated_tokens_total"]) / max(1, steps), 2)}
        res["levels"].append(row)
        print(json.dumps(res["levels"][-1]), flush=True)
    return res


def markdown(r: dict) -> str:
    out = [f"Device: **{r.get('device_name', r.get('device'))}**. Command: `{r.get('command')}`", ""]
    if e := r.get("overhead"):
        out += [f"**End to end** — the same exported model and request, {e['new_tokens']} new tokens greedy, median of "
                f"{e['runs']}: through tritonserver (gRPC) vs the engine in process", "",
                "| model | request | in process s | Triton s | Triton / in process | overhead ms | same tokens |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| {x['model']} | {x['request']} | {x['in_process_s']:.3f} | {x['triton_s']:.3f} | "
                f"{x['triton_over_in_process']:.2f}× | {x['overhead_ms']:.0f} | {'yes' if x['same_tokens'] else 'NO'} |"
                for x in e["results"]] + [""]
    if i := r.get("inflight"):
        p = i.get("probe")
        out += [f"**In-flight** — {i['model']}" + (f"; probe: a 5-token request during a {p['long_new_tokens']}-token "
                f"one took {p['short_over_long']:.2f}× its time" if p else " (in process)"), "",
                "| concurrency | req/s | tokens/s | p50 s | p95 s | failed |", "|---|---|---|---|---|---|"]
        out += [f"| {x['concurrency']} | {x['requests_per_s']} | {x['output_tokens_per_s']} | {x['latency_p50_s']} | "
                f"{x['latency_p95_s']} | {x['failed']} |" for x in i["levels"]]
    return "\n".join(out)


def plot(r: dict, png: Path) -> None:
    rows = (r.get("overhead") or {}).get("results")
    if not rows:
        return
    with common.figure(png, figsize=(2.2 + 2.2 * len(rows), 4.2)) as (fig, ax):
        if fig is None:
            return
        common.bars(ax, [f"{x['model']}\n{x['request']}" for x in rows],
             {"in process": [x["in_process_s"] * 1000 for x in rows],
              "through Triton (gRPC)": [x["triton_s"] * 1000 for x in rows]}, "%.0f",
             {"through Triton (gRPC)": [f"{x['triton_s'] * 1000:.0f} ({x['triton_over_in_process']:.2f}×)" for x in rows]})
        ax.set(ylabel="ms until every result is back (lower is better)",
               title=f"end to end vs in process, {r['overhead']['new_tokens']} new tokens — {r.get('device_name')}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", type=common.sections_type(("overhead", "inflight")), default="overhead,inflight",
                   help="comma-separated subset of overhead,inflight")
    p.add_argument("--device", help="cpu / cuda (default: cuda when present)")
    for k in ("layers", "hidden", "heads"):
        p.add_argument(f"--{k}", type=int, help="random model (default 12/768/12 on CUDA, 4/256/4 on the CPU)")
    p.add_argument("--vocab", type=int, default=VOCAB_SIZE)
    p.add_argument("--hdf5", type=Path, help="serve this exported file instead of the random fp + int8 models")
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32, help="overhead: new tokens per request")
    p.add_argument("--runs", type=int, default=5, help="overhead: timed runs per path")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=64, help="inflight: requests per concurrency level")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the server (default 1 on the CPU)")
    common.add_output_args(p, "serving", replot="the Markdown and PNG")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.replot:
        report, out = common.read_replot(a.replot, "serving"), a.out or a.replot.parent
    else:
        import torch

        a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
        gpu, sections = a.device.startswith("cuda"), a.sections
        for k, g, c in (("layers", 12, 4), ("hidden", 768, 256), ("heads", 12, 4), ("threads", 0, 1)):
            setattr(a, k, getattr(a, k) if getattr(a, k) is not None else (g if gpu else c))
        if a.threads:
            torch.set_num_threads(a.threads)
        report = {"task": "serving", "device": common.device_slug(a.device), "command": common.command_line(argv),
                  "device_name": torch.cuda.get_device_name(0) if gpu else "CPU"}
        with tempfile.TemporaryDirectory(prefix="lsgpt-serving-") as tmp:
            if a.hdf5 is not None:
                files = {_served_name(a.hdf5): a.hdf5}
            else:
                max_step = max(a.prompt_len + a.new_tokens, 512)
                fp, q = common.export_pair(common.random_model(a.layers, a.hidden, a.heads, a.vocab, 1024), Path(tmp), max_step)
                files = {"gpt2": fp, "gpt2_int8": q}
            probe = ("gpt2_int8", files["gpt2_int8"]) if "gpt2_int8" in files else next(iter(files.items()))
            repo = common.repository(Path(tmp) / "repo", files)
            with common.served(repo, list(files), device=a.device if gpu else None,
                               threads=a.threads or None) as (url, server):
                if "overhead" in sections:
                    report["overhead"] = overhead(a, url, files)
                if "inflight" in sections:
                    report["inflight"] = inflight(a, url, *probe, server=server)
        out = common.results_dir("serving", a.out, a.device, a.record)
    common.write_report(out, "serving", report, plot, markdown(report), save=not a.replot)
    return 0 if all(x["failed"] == 0 for x in report.get("inflight", {}).get("levels", [])) else 1


def _served_name(hdf5: Path) -> str:
    from lsgpt.format import read_hdf5

    return "gpt2_int8" if read_hdf5(hdf5)[0].quantized else "gpt2"


if __name__ == "__main__":
    sys.exit(main())
