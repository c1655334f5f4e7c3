#!/usr/bin/env python3
"""In-flight batching vs the code of another checkout (e.g. the dynamic-batching version), through the real
server: the same mixed load of unary gRPC requests, side by side.

    python benchmarks/inflight.py --hdf5 model/fp16/pytorch_model.hdf5 --out results/cpu/inflight.json
    git worktree add /tmp/before <commit>      # the version to compare against
    python benchmarks/inflight.py --hdf5 ... --root /tmp/before --out results/cpu/inflight-before.json

Load: prompts of 4..64 random token ids, max_new_tokens spread over 16..256 (capped by the model's max_step),
greedy; `--concurrency` client threads send them back to back. Reported per concurrency: requests/s,
generated tokens/s (from the answers), request latency p50/p95, failures. Probe first, on an idle server: a
5-token request sent while a long request runs (its latency over the long one's: in-flight batching answers
it at once; a batch-to-completion server makes it wait).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hdf5", required=True, help="exported model file to serve")
    ap.add_argument("--model", default=None, help="served model name (default gpt2 or gpt2_int8 by the file)")
    ap.add_argument("--root", default=None, help="checkout whose lsgpt/ and model_repository/ serve (default: this)")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None, help="force the engine's device (cpu, cuda)")
    ap.add_argument("--in-process", action="store_true",
                    help="the same load on lsgpt.scheduler.Scheduler directly (no Triton): where the time goes")
    ap.add_argument("--out", default=None, help="JSON results")
    return ap.parse_args(argv)


def infer(client, model: str, prompt: list[int], new: int) -> int:
    import tritonclient.grpc as g

    from client.api import _inputs  # the client library's request tensors

    out = client.infer(model, _inputs(g, prompt, {"max_new_tokens": new, "top_k": 1})).as_numpy("result")[0]
    return len(out) - len(prompt)  # rows are padded with EOS only in multi-row requests


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def main(argv=None) -> int:
    a = parse_args(argv)
    root = Path(a.root or Path(__file__).resolve().parents[1]).resolve()
    sys.path.insert(0, str(root))  # lsgpt of the checkout under test
    sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's client library
    import shutil

    import tritonclient.grpc as g

    from lsgpt.format import read_hdf5
    from lsgpt.repository import publish
    from lsgpt.launcher import TritonServer, free_port

    cfg, _ = read_hdf5(a.hdf5)
    model = a.model or ("gpt2_int8" if cfg.quantized else "gpt2")
    rng = random.Random(a.seed)
    cap = cfg.max_step - 1
    if a.in_process:
        return in_process(a, cfg, rng, cap)
    work = Path(tempfile.mkdtemp(prefix="lsgpt-inflight-"))
    repo = work / "repo"
    src = root / "model_repository"
    (repo / model / "1").mkdir(parents=True)
    shutil.copy(src / model / "config.pbtxt", repo / model / "config.pbtxt")
    publish(a.hdf5, repo, model, lightseq=False)
    ports = dict(grpc_port=free_port(), http_port=free_port(), metrics_port=free_port())
    results: dict = {"root": str(root), "model": model, "hdf5": str(a.hdf5), "max_step": cfg.max_step, "levels": []}
    with TritonServer(repo, models=[model], device=a.device, **ports) as server:
        server.wait_ready(600)
        c = g.InferenceServerClient(server.grpc_url)
        for n in (3, 4, 8, 16, 17, 32, 33, 48, 64):  # warm-up: every prefill tile shape compiles here, not mid-run
            infer(c, model, [101 + i for i in range(min(n, cap // 2))], 4)
        # probe: a short request while a long one runs
        long_new = min(256, cap - 8)
        times: dict[str, float] = {}

        def timed(name, prompt, new):
            cc = g.InferenceServerClient(server.grpc_url)
            t0 = time.perf_counter()
            infer(cc, model, prompt, new)
            times[name] = time.perf_counter() - t0

        t_long = threading.Thread(target=timed, args=("long", [101 + i for i in range(8)], long_new))
        t_long.start()
        time.sleep(0.05)
        timed("short", [201, 202, 203, 204], 5)
        t_long.join()
        results["probe"] = {"long_new_tokens": long_new, "long_s": round(times["long"], 4),
                            "short_s": round(times["short"], 4), "short_over_long": round(times["short"] / times["long"], 3)}
        print(json.dumps(results["probe"]), flush=True)
        for conc in [int(x) for x in a.concurrency.split(",")]:
            reqs = make_load(rng, cfg, cap, a.requests)
            lat: list[float] = []
            gen = [0]
            fails = [0]
            lock = threading.Lock()
            it = iter(reqs)

            def worker():
                cc = g.InferenceServerClient(server.grpc_url)
                while True:
                    with lock:
                        r = next(it, None)
                    if r is None:
                        return
                    t0 = time.perf_counter()
                    try:
                        n = infer(cc, model, *r)
                    except Exception:  # noqa: BLE001 - counted, reported
                        with lock:
                            fails[0] += 1
                        continue
                    with lock:
                        lat.append(time.perf_counter() - t0)
                        gen[0] += n

            t0 = time.perf_counter()
            threads = [threading.Thread(target=worker) for _ in range(conc)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            row = {"concurrency": conc, "requests": a.requests, "failed": fails[0], "wall_s": round(wall, 3),
                   "requests_per_s": round(len(lat) / wall, 2), "output_tokens_per_s": round(gen[0] / wall, 1),
                   "latency_p50_s": round(pct(lat, 50), 4), "latency_p95_s": round(pct(lat, 95), 4),
                   "mean_new_tokens": round(gen[0] / max(1, len(lat)), 1)}
            results["levels"].append(row)
            print(json.dumps(row), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(results, indent=1))
        print(f"wrote {a.out}")
    return 0 if all(r["failed"] == 0 for r in results["levels"]) else 1


def make_load(rng, cfg, cap: int, count: int) -> list[tuple[list[int], int]]:
    reqs = []
    for _ in range(count):
        n = rng.randint(4, min(64, cap // 2))
        reqs.append(([rng.randint(100, cfg.vocab - 1) for _ in range(n)], min(rng.randint(16, 256), cap - n)))
    return reqs


def in_process(a, cfg, rng, cap: int) -> int:
    """Closed-loop load on the scheduler itself; prints tokens/s and the host time split per level."""
    from lsgpt.engine import Engine, SamplingParams
    from lsgpt.scheduler import Scheduler

    engine = Engine.load(a.hdf5, a.device)
    for conc in [int(x) for x in a.concurrency.split(",")]:
        sched = Scheduler(engine, max_rows=max(conc, 1))
        reqs = make_load(rng, cfg, cap, a.requests)
        it, lock, done, gen = iter(reqs), threading.Lock(), threading.Event(), [0, 0]

        def submit_next():
            with lock:
                r = next(it, None)
            if r is None:
                return
            sched.submit(r[0], SamplingParams(max_new_tokens=r[1], top_k=1), finished)

        def finished(ids, err):
            with lock:
                gen[0] += 1
                gen[1] += 0 if ids is None else len(ids)
                if gen[0] == a.requests:
                    done.set()
            submit_next()

        t0 = time.perf_counter()
        for _ in range(conc):
            submit_next()
        done.wait(600)
        wall = time.perf_counter() - t0
        st = sched.stats
        sched.close()
        new = st.generated_tokens
        print(json.dumps({"in_process": True, "concurrency": conc, "output_tokens_per_s": round(new / wall, 1),
                          "wall_s": round(wall, 3), "steps": st.steps, "prefills": st.prefills,
                          "ms_per_step": round(1e3 * st.step_s / max(1, st.steps), 3),
                          "ms_per_prefill": round(1e3 * st.prefill_s / max(1, st.prefills), 3),
                          "rows_per_step": round((new - st.requests) / max(1, st.steps), 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
