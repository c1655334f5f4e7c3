#!/usr/bin/env python3
"""Capacity plan: how many replicas for R requests/s at a p95 latency of L ms, from one replica's measured curve.

A replica with in-flight batching serves the requests it holds together: with n in flight it completes X(n)
requests/s in all (X measured in a closed loop at a few concurrencies, flat beyond the last), each request
getting X(n)/n of it (processor sharing). A small discrete-event simulation runs N such replicas behind a
least-request balancer under Poisson arrivals and reports latency percentiles; the plan is the smallest N whose
simulated p95 meets the target.

    python benchmarks/capacity.py --validate          # measure 1 replica, then 2 real replicas vs the simulation
    python benchmarks/capacity.py --curve 1:4.4,8:13.9,32:14.1 --rates 10,100,1000 --p95-ms 2000

--validate (this machine, the tiny random model, equal requests): one tritonserver pinned to core 0 measured in a
closed loop at concurrency 1,2,4,8 (our client), then two tritonservers pinned to cores 0 and 1 with a client-side
least-request balancer under Poisson arrivals at a rate that loads them ~70%, measured p50/p95 beside the
simulation of the same setting (needs 2 cores and `taskset`). Writes results/<device>/capacity/capacity.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path

import numpy as np

from lsgpt.contract import CLS_ID

if __name__ == "__main__":  # run as a script: its sibling module (the tests import the simulation alone)
    import common


def rate_at(curve: dict[int, float], n: int) -> float:
    """X(n): completions/s with n requests in flight (linear between measured points, flat beyond the last)."""
    xs = sorted(curve)
    if n <= 0:
        return 0.0
    return float(np.interp(n, [0, *xs], [0.0, *(curve[x] for x in xs)]))


def simulate(curve: dict[int, float], replicas: int, rate: float, n: int = 20000, seed: int = 0) -> np.ndarray:
    """Latencies (s) of n equal requests, Poisson arrivals at `rate`/s, least-request balancing over processor-
    sharing replicas whose speed with k in flight is rate_at(curve, k)."""
    rnd = random.Random(seed)
    t, arrivals = 0.0, []
    for _ in range(n):
        t += rnd.expovariate(rate)
        arrivals.append(t)
    work: list[dict[int, float]] = [dict() for _ in range(replicas)]  # request -> remaining work (1 = a request)
    start = np.zeros(n)
    done = np.full(n, np.nan)
    now, i = 0.0, 0
    while i < n or any(work):
        # next completion: the replica whose smallest remaining work finishes first at its current share
        best, when = None, float("inf")
        for r, w in enumerate(work):
            if w:
                share = rate_at(curve, len(w)) / len(w)
                k = min(w, key=w.get)
                if now + w[k] / share < when:
                    best, when = (r, k), now + w[k] / share
        nxt = arrivals[i] if i < n else float("inf")
        step = min(when, nxt) - now
        for w in work:  # everyone progresses until the next event
            if w:
                share = rate_at(curve, len(w)) / len(w)
                for k in w:
                    w[k] -= share * step
        now += step
        if nxt <= when:
            r = min(range(replicas), key=lambda j: (len(work[j]), rnd.random()))
            work[r][i], start[i] = 1.0, now
            i += 1
        else:
            r, k = best
            del work[r][k]
            done[k] = now
    return done - np.asarray(arrivals)


def plan(curve: dict[int, float], rate: float, p95_ms: float, max_replicas: int = 512) -> tuple[int, float]:
    """Smallest N (by doubling, then bisection) whose simulated p95 meets the target; (N, its p95 in ms)."""
    def p95(nr: int) -> float:
        if rate >= nr * max(curve.values()):  # saturated: latency grows without bound
            return float("inf")
        return float(np.percentile(simulate(curve, nr, rate, n=min(20000, int(rate * 200) + 2000)), 95)) * 1000

    hi = max(1, int(rate / max(curve.values())))
    while p95(hi) > p95_ms:
        hi *= 2
        if hi > max_replicas:
            return -1, float("inf")
    lo = hi // 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if p95(mid) <= p95_ms else (mid, hi)
    return hi, p95(hi)


# ---- measuring real replicas --------------------------------------------------------------------------------


async def closed_loop(urls: list[str], conc: int, seconds: float, req) -> float:
    """Completions/s with `conc` requests always in flight on one server."""
    import tritonclient.grpc.aio as aio

    c = aio.InferenceServerClient(urls[0])
    done, stop = 0, time.perf_counter() + seconds

    async def worker():
        nonlocal done
        while time.perf_counter() < stop:
            await req(c)
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conc)))
    elapsed = time.perf_counter() - t0
    await c.close()
    return done / elapsed


async def open_loop(urls: list[str], rate: float, n: int, req, seed: int = 1) -> np.ndarray:
    """Latencies of n requests sent at Poisson times, each to the server with the fewest in flight."""
    import tritonclient.grpc.aio as aio

    clients = [aio.InferenceServerClient(u) for u in urls]
    inflight = [0] * len(urls)
    rnd, lat = random.Random(seed), []

    async def one(r: int):
        t0 = time.perf_counter()
        await req(clients[r])
        lat.append(time.perf_counter() - t0)
        inflight[r] -= 1

    tasks, t_next = [], time.perf_counter()
    for _ in range(n):
        t_next += rnd.expovariate(rate)
        await asyncio.sleep(max(0.0, t_next - time.perf_counter()))
        r = min(range(len(urls)), key=lambda j: (inflight[j], rnd.random()))
        inflight[r] += 1
        tasks.append(asyncio.create_task(one(r)))
    await asyncio.gather(*tasks)
    for c in clients:
        await c.close()
    return np.asarray(lat)


def _pinned(repo: Path, cpu: int):
    """A tritonserver (and its model processes, which inherit it) on one CPU core, so that two replicas on one
    machine each get what the single replica had when its curve was measured."""
    from lsgpt.serving.launcher import TritonServer, free_port

    class Pinned(TritonServer):
        def command(self, backend_dir, binary):
            return ["taskset", "-c", str(cpu), *super().command(backend_dir, binary)]

    return Pinned(repo, models=["gpt2"], grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(),
                  threads=1, poll_secs=3600)


def validate(a: argparse.Namespace) -> dict:
    import tempfile

    import tritonclient.grpc.aio as aio

    from lsgpt.client.api import _inputs

    prompt = [CLS_ID, *range(1000, 1000 + a.prompt_tokens)]
    params = {"max_new_tokens": a.new_tokens, "top_k": 1}

    async def req(c):
        await c.infer("gpt2", _inputs(aio, prompt, params))

    with tempfile.TemporaryDirectory(prefix="lsgpt-capacity-") as tmp:
        fp, _ = common.export_pair(common.random_model(*a.shape[:3]), Path(tmp), a.shape[3])
        repo = common.repository(Path(tmp) / "repo", {"gpt2": fp}, None, common.ROOT / "model_repository")
        with _pinned(repo, 0) as one:
            one.wait_ready(300)
            asyncio.run(closed_loop([one.grpc_url], 1, 3, req))  # warm-up
            curve = {c: round(asyncio.run(closed_loop([one.grpc_url], c, a.seconds, req)), 2) for c in (1, 2, 4, 8)}
        print(f"one replica (one core): {curve} requests/s at concurrency 1/2/4/8", flush=True)
        rate = a.load * 2 * max(curve.values())
        with _pinned(repo, 0) as r1, _pinned(repo, 1) as r2:
            r1.wait_ready(300), r2.wait_ready(300)
            urls = [r1.grpc_url, r2.grpc_url]
            asyncio.run(open_loop(urls, rate, 20, req))  # warm-up
            measured = asyncio.run(open_loop(urls, rate, a.requests, req))
    sim = simulate(curve, 2, rate)
    row = {"rate": round(rate, 2), "requests": a.requests,
           "measured_p50_ms": round(float(np.percentile(measured, 50)) * 1000, 1),
           "measured_p95_ms": round(float(np.percentile(measured, 95)) * 1000, 1),
           "simulated_p50_ms": round(float(np.percentile(sim, 50)) * 1000, 1),
           "simulated_p95_ms": round(float(np.percentile(sim, 95)) * 1000, 1)}
    print(f"two replicas at {rate:.2f} requests/s: measured p50/p95 {row['measured_p50_ms']}/"
          f"{row['measured_p95_ms']} ms, simulated {row['simulated_p50_ms']}/{row['simulated_p95_ms']} ms")
    return {"curve": curve, "two_replicas": row, "shape": a.shape, "prompt_tokens": a.prompt_tokens,
            "new_tokens": a.new_tokens}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--validate", action="store_true", help="measure one and two real replicas here (CPU: minutes)")
    p.add_argument("--curve", default="", help="concurrency:requests_per_s,... of one replica (instead of measuring)")
    p.add_argument("--rates", default="10,100,1000", help="requests/s to plan for")
    p.add_argument("--p95-ms", type=float, default=2000)
    p.add_argument("--shape", default="2,128,4,128", help="--validate: layers,hidden,heads,max_step of the model")
    p.add_argument("--prompt-tokens", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--seconds", type=float, default=8, help="--validate: per closed-loop level")
    p.add_argument("--requests", type=int, default=200, help="--validate: open-loop requests on two replicas")
    p.add_argument("--load", type=float, default=0.7, help="--validate: offered load / two replicas' peak")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    a.shape = [int(x) for x in a.shape.split(",")]
    report: dict = {"task": "capacity", "device": common.device_slug(), "command": common.command_line(argv)}
    if a.validate:
        report["validation"] = validate(a)
        curve = report["validation"]["curve"]
    elif a.curve:
        curve = {int(k): float(v) for k, v in (x.split(":") for x in a.curve.split(","))}
    else:
        p.error("give --validate or --curve")
    report["curve"] = curve
    report["plan"] = []
    for r in (float(x) for x in a.rates.split(",")):
        n, p95 = plan(curve, r, a.p95_ms)
        report["plan"].append({"rate": r, "p95_target_ms": a.p95_ms, "replicas": n, "simulated_p95_ms": round(p95, 1)})
        print(f"{r:g} requests/s at p95 <= {a.p95_ms:g} ms: {n} replicas (simulated p95 {p95:.0f} ms)")
    out = a.out or common.results_dir("capacity")
    common.write_json(out / "capacity.json", report)
    lines = ["| requests/s | p95 target | replicas | simulated p95 |", "|---|---|---|---|"]
    lines += [f"| {x['rate']:g} | {x['p95_target_ms']:g} ms | {x['replicas']} | {x['simulated_p95_ms']:.0f} ms |"
              for x in report["plan"]]
    (out / "capacity.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'capacity.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
