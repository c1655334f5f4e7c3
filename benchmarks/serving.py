#!/usr/bin/env python3
"""Serving: what does tritonserver cost over the engine in process, and does in-flight batching answer a
short request while a long one runs? One real tritonserver (gRPC, our Python-based backend), two sections:

  overhead  the same exported random GPT-2 (fp and int8) and the same greedy request — one prompt, and 8
            prompts at once — through the server (client -> server -> client, requests built by the client
            library) vs Engine.generate in this process; interleaved runs, medians.
  inflight  a 5-token request sent while a long one runs (probe: in-flight batching answers it at once), then
            closed-loop mixed load per concurrency (prompts 4..64 random ids, 16..256 new tokens): requests/s,
            generated tokens/s, latency p50/p95, failures.
            Also, per level, the mean running batch (tokens per decode step). --in-process adds, per level, the
            same load on a Scheduler in this process and the engine's fixed-batch decode at that mean running
            batch (served | in process | fixed batch and their ratios: where the loss is), and TTFT/ITL p50/p95
            streamed through the model's decoupled twin (a quarter of the requests) and the Scheduler's own.
  joiner    in process: N streams running, ITL p50/p95/p99 of their tokens without and with long prompts
            (768 tokens) joining, at the default prefill budget and a chunking one (--joiner-budget).

    python -m benchmarks.serving                                       # both sections, a random model
    python -m benchmarks.serving --sections overhead --layers 12 --hidden 768 --heads 12 --new-tokens 500
    python -m benchmarks.serving --sections inflight --hdf5 model/fp16/pytorch_model.hdf5 --concurrency 1,8,32
    python -m benchmarks.serving --sections inflight,joiner --in-process --hdf5 /tmp/int8.hdf5 --concurrency 32,256
    git worktree add /tmp/before <commit>; cd /tmp/before && PYTHONPATH=/tmp/before:$OLDPWD python -m \\
        benchmarks.serving --sections inflight --hdf5 ... --out /tmp/sv-before   # the same load, the older lsgpt

Writes results/tmp/<device>/serving/serving.{json,md,png} (--record: results/<device>/serving/).
"""

from __future__ import annotations

import argparse
import json
import queue
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


def _loop(send, conc: int, reqs: list) -> tuple[list[float], int, int, float, float]:
    """`conc` threads send `reqs` back to back through send(thread_state, prompt, new) -> new tokens:
    (latencies, new tokens, failures, start, end) on the machine-wide monotonic clock."""
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

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(conc)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat, gen[0], fails[0], t0, time.monotonic()


def _summary(conc: int, n: int, lat: list[float], gen: int, fails: int, wall: float) -> dict:
    p50, p95 = (common.percentile(lat, q, digits=4) for q in (50, 95))
    return {"concurrency": conc, "requests": n, "failed": fails, "wall_s": round(wall, 3),
            "requests_per_s": round(len(lat) / wall, 2), "output_tokens_per_s": round(gen / wall, 1),
            "latency_p50_s": p50, "latency_p95_s": p95, "mean_new_tokens": round(gen / max(1, len(lat)), 1)}


def closed_loop(send, conc: int, reqs: list) -> dict:
    """`conc` threads of this process send `reqs` back to back through send(thread_state, prompt, new)."""
    lat, gen, fails, t0, t1 = _loop(send, conc, reqs)
    return _summary(conc, len(reqs), lat, gen, fails, t1 - t0)


def _unary_send(url: str, model: str):
    import tritonclient.grpc as grpcclient

    def send(state, prompt, new):
        c = state.setdefault("c", grpcclient.InferenceServerClient(url))
        return len(common.infer(c, model, prompt, new)) - len(prompt)  # one row: no EOS padding
    return send


class _Sender:
    """A closed loop's send(thread_state, prompt, new) of one kind (unary: the model's one answer; stream: its
    decoupled twin, gathering TTFT/ITL as stream_send does), made where it runs (a client process builds its own)."""

    def __init__(self, kind: str, url: str, model: str):
        self.ttft: list[float] = []
        self.itl: list[float] = []
        self.clients: list = []
        self.send = (_unary_send(url, model) if kind == "unary"
                     else stream_send(url, model, self.ttft, self.itl, self.clients))

    def close(self) -> None:
        for c in self.clients:
            c.stop_stream()
            c.close()


def _client_process(kind: str, url: str, model: str, conc: int, reqs: list, ready, go, results) -> None:
    s = _Sender(kind, url, model)
    ready.release()
    go.wait()
    out = _loop(s.send, conc, reqs)
    s.close()
    results.put((*out, s.ttft, s.itl))


def closed_loop_procs(kind: str, url: str, model: str, conc: int, reqs: list, procs: int) -> tuple[dict, list, list]:
    """closed_loop over gRPC (kind: unary or stream, as _Sender) from `procs` client processes, conc threads and
    reqs dealt among them: one Python process's GIL caps what its gRPC clients take in (on the CPU box ~1.3 ms of
    client CPU a unary request, ~170 us a streamed token), which at a few hundred streams would be measured instead
    of the server. -> (closed_loop's row, TTFT s, ITL s); wall: the common start to the last end."""
    import multiprocessing as mp

    procs = max(1, min(procs, conc))
    if procs == 1:
        s = _Sender(kind, url, model)
        try:
            return closed_loop(s.send, conc, reqs), s.ttft, s.itl
        finally:
            s.close()
    ctx = mp.get_context("spawn")  # gRPC channels do not survive fork
    ready, go, results = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    kids = [ctx.Process(target=_client_process, args=(kind, url, model, len(range(i, conc, procs)), reqs[i::procs],
                                                      ready, go, results), daemon=True) for i in range(procs)]
    for k in kids:
        k.start()
    deadline, started = time.monotonic() + 120, 0
    while started < procs:
        if ready.acquire(timeout=0.5):
            started += 1
        elif time.monotonic() > deadline or any(k.exitcode is not None for k in kids):
            for k in kids:
                k.kill()
            raise RuntimeError(f"client processes: {started} of {procs} started (exit codes "
                               f"{[k.exitcode for k in kids]})")
    t0 = time.monotonic()
    go.set()
    parts: list = []
    while len(parts) < procs:
        try:
            parts.append(results.get(timeout=1.0))
        except queue.Empty:  # a client process that died leaves no result: say so rather than wait
            if any(k.exitcode not in (None, 0) for k in kids):
                for k in kids:
                    k.kill()
                raise RuntimeError(f"a client process failed (exit codes {[k.exitcode for k in kids]})") from None
    for k in kids:
        k.join(10)
    lat = [x for p in parts for x in p[0]]
    row = _summary(conc, len(reqs), lat, sum(p[1] for p in parts), sum(p[2] for p in parts),
                   max(p[4] for p in parts) - t0) | {"client_processes": procs}
    return row, [x for p in parts for x in p[5]], [x for p in parts for x in p[6]]


def stream_send(url: str, model: str, ttft: list, itl: list, clients: list):
    """send() through the decoupled twin, one gRPC stream per thread: new tokens; each request's time to its
    first token and the gaps between the next ones (as the client sees them: tokens that come in one response
    share its time) into ttft and itl. Asks for gathered tokens (contract.COALESCE), as the client library does."""
    import tritonclient.grpc as grpcclient

    from lsgpt.client.api import _inputs
    from lsgpt.contract import COALESCE

    def send(state, prompt, new):
        if "c" not in state:
            state["q"], state["c"] = q, c = queue.Queue(), grpcclient.InferenceServerClient(url)
            c.start_stream(callback=lambda result, error: q.put((result, error)))
            clients.append(c)
        t = [time.perf_counter()]
        state["c"].async_stream_infer(model, _inputs(grpcclient, prompt, {"max_new_tokens": new, "top_k": 1}),
                                      enable_empty_final_response=True, parameters={COALESCE: True})
        while True:
            result, error = state["q"].get(timeout=600)
            if error is not None:
                raise error
            ids = result.as_numpy("result")
            t += [time.perf_counter()] * (0 if ids is None else ids.size)
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
        gaps = np.diff(t).tolist()
        ttft.extend(gaps[:1])
        itl.extend(gaps[1:])
        return len(gaps)

    return send


def scheduler_send(sched):
    """send() onto a Scheduler in this process (the served model's request, greedy, EOS on)."""
    from lsgpt.engine.sampling import SamplingParams

    def send(state, prompt, new):
        done, out = threading.Event(), []
        sched.submit(prompt, SamplingParams(max_new_tokens=new, top_k=1),
                     lambda ids, err: (out.append((ids, err)), done.set()))
        done.wait(600)
        if out[0][1] is not None:
            raise out[0][1]
        return len(out[0][0]) - len(prompt)  # new tokens, as the served side counts them

    return send


def lat(xs: list, prefix: str) -> dict:
    return {f"{prefix}_p{q}_ms": common.percentile(xs, q, 1e3, 2) for q in (50, 95)}


def gpu_window(fn) -> dict:
    """fn() under torch.profiler (CUDA kernels only): the GPU-busy fraction of its wall time and the kernel time,
    which tell a host-bound loop (busy well under 1) from one whose GPU work grew (busy ~1, more kernel time)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    kernels = common.gpu_kernels(prof)
    return {"gpu_busy": round(common.busy_us(kernels) / 1e6 / wall, 3), "kernel_s": sum(e - s for s, e, _ in kernels) / 1e6}


def gpu_profile(sched, conc: int, reqs: list, fixed, fixed_steps: int) -> dict:
    """--gpu-profile: a share of the level's load in process and the fixed batch again, each under gpu_window:
    GPU busy and kernel ms per decode step, side by side (where in-process / fixed loses: GPU work or the host)."""
    st = sched.stats
    steps0, prefills0 = st.steps, st.prefills
    w = gpu_window(lambda: closed_loop(scheduler_send(sched), conc, reqs[: max(2 * conc, len(reqs) // 4)]))
    steps = max(1, st.steps - steps0)
    f = gpu_window(fixed)
    return {"in_process_gpu_busy": w["gpu_busy"], "in_process_kernel_ms_per_step": round(1e3 * w["kernel_s"] / steps, 3),
            "in_process_prefills_per_step": round((st.prefills - prefills0) / steps, 3), "fixed_gpu_busy": f["gpu_busy"],
            "fixed_kernel_ms_per_step": round(1e3 * f["kernel_s"] / fixed_steps, 3)}


def in_process_level(a, sched, conc: int, reqs: list, cap: int) -> dict:
    """The load of a served level on `sched`, then the engine's fixed batch at its mean running batch."""
    from lsgpt.engine.sampling import SamplingParams

    keys = ("steps", "prefills", "chunks", "prefill_s", "step_s", "generated_tokens")
    st = sched.stats
    before = {k: getattr(st, k) for k in keys}
    st.ttft.clear()
    st.itl.clear()
    row = closed_loop(scheduler_send(sched), conc, reqs)
    d = {k: getattr(st, k) - before[k] for k in keys}
    batch = d["generated_tokens"] / max(1, d["steps"])
    out = {"in_process_tokens_per_s": row["output_tokens_per_s"], "in_process_failed": row["failed"],
           "in_process_tokens_per_step": round(batch, 2), "ms_per_step": round(1e3 * d["step_s"] / max(1, d["steps"]), 3),
           "ms_per_prefill": round(1e3 * d["prefill_s"] / max(1, d["prefills"]), 3), "prefills": d["prefills"],
           "chunks": d["chunks"], "host_prefill_share": round(d["prefill_s"] / max(1e-9, d["prefill_s"] + d["step_s"]), 3)}
    out |= lat(list(st.ttft), "in_process_ttft") | lat(list(st.itl), "in_process_itl")
    B, new, eng = max(1, round(batch)), min(128, cap - 16), sched.engine
    ps = [[100 + (7 * i + j) % 900 for j in range(16)] for i in range(B)]
    fixed = lambda: eng.generate(ps, SamplingParams(max_new_tokens=new, top_k=1, ignore_eos=True))  # noqa: E731
    med, _ = common.timed({"fixed": fixed}, 2, a.device)
    out |= {"fixed_batch": B, "fixed_batch_tokens_per_s": round(B * new / med["fixed"], 1)}
    if a.gpu_profile and eng.device.type == "cuda":
        try:  # an extra: its failure must not cost the level's figures
            out |= gpu_profile(sched, conc, reqs, fixed, new)
        except Exception as e:  # noqa: BLE001
            out["gpu_profile_error"] = f"{type(e).__name__}: {e}"
    eng._graphs.clear()  # its B-row decode graph holds a max_step cache of B rows: not kept across levels
    return out


def spy_on(a, server, model: str):
    """--py-spy: a py-spy recording of the model's (first) stub process over the level about to run, or None."""
    if not a.py_spy or server is None:
        return None
    from benchmarks import pyspy

    pid = server.stub_processes().get(f"{model}_0_0")
    if pid is None:
        return None
    child = pyspy.engine_child(pid)  # the engine in its own process: its scheduler's GIL is apart, recorded too
    rec = pyspy.Recording(pid, a.py_spy, gil=a.py_spy_gil)
    rec.engine = None if child is None else pyspy.Recording(child, a.py_spy, gil=a.py_spy_gil)
    return rec


def inflight(a, url: str, model: str, hdf5: Path, server=None) -> dict:
    from lsgpt.format import read_hdf5

    cfg, _ = read_hdf5(hdf5)
    rng, cap = random.Random(a.seed), cfg.max_step - 1
    res: dict = {"model": model, "max_step": cfg.max_step, "levels": []}

    send = _unary_send(url, model)
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
    sched = None
    if a.in_process:
        from lsgpt.engine.engine import Engine
        from lsgpt.engine.scheduler import Scheduler

        sched = Scheduler(Engine.load(hdf5, a.device), max_rows="auto")
    for conc in a.concurrency:
        reqs = make_load(rng, cfg.vocab, cap, max(a.requests, 8 * conc) if a.in_process else a.requests)
        m0 = scrape(server.metrics_port, model) if server is not None else {}
        spy = spy_on(a, server, model)
        row = closed_loop_procs("unary", url, model, conc, reqs, a.client_procs if conc >= 64 else 1)[0]
        if spy is not None:
            row["py_spy"] = spy.summary()
            if spy.engine is not None:
                row["py_spy_engine"] = spy.engine.summary()
        if "lsgpt_decode_steps_total" in m0:  # the metrics thread publishes every 0.5 s
            time.sleep(1.2)
            m1 = scrape(server.metrics_port, model)
            steps = m1["lsgpt_decode_steps_total"] - m0["lsgpt_decode_steps_total"]
            row |= {"steps": int(steps), "tokens_per_step": round(
                (m1["lsgpt_generated_tokens_total"] - m0["lsgpt_generated_tokens_total"]) / max(1, steps), 2)}
        if sched is not None:
            sspy = spy_on(a, server, model + "_stream")
            srow, ttft, itl = closed_loop_procs("stream", url, model + "_stream", conc, reqs[: max(conc, len(reqs) // 4)],
                                                min(a.client_procs, max(1, conc // 4)))
            if sspy is not None:
                row["py_spy_stream"] = sspy.summary()
                if sspy.engine is not None:
                    row["py_spy_stream_engine"] = sspy.engine.summary()
            row |= {"stream_tokens_per_s": srow["output_tokens_per_s"], "stream_failed": srow["failed"]}
            row |= lat(ttft, "stream_ttft") | lat(itl, "stream_itl") | in_process_level(a, sched, conc, reqs, cap)
            row |= {"served_over_in_process": round(row["output_tokens_per_s"] / row["in_process_tokens_per_s"], 3),
                    "in_process_over_fixed": round(row["in_process_tokens_per_s"] / row["fixed_batch_tokens_per_s"], 3)}
        res["levels"].append(row)
        print(json.dumps(res["levels"][-1]), flush=True)
    if sched is not None:
        res |= {"in_process_rows": sched.max_rows, "prefill_tokens": sched.prefill_tokens,
                "admit_every": sched.admit_every}
        sched.close()
    return res


def joiner_case(sched, streams: int, window: int, joiners: list[list[int]], vocab: int) -> dict:
    """`streams` greedy rows of 16-token prompts running; once each has 8 tokens, `joiners` are submitted; the
    gaps between tokens 8..8+window of every stream (as the scheduler emits them), and the joiners' latency."""
    from lsgpt.engine.sampling import SamplingParams

    rng, times, done = random.Random(1), [[] for _ in range(streams)], threading.Semaphore(0)
    sp = SamplingParams(max_new_tokens=window + 16, top_k=1, ignore_eos=True)
    for t in times:
        sched.submit([rng.randint(100, vocab - 1) for _ in range(16)], sp, lambda ids, err: done.release(),
                     on_token=lambda tok, t=t: t.append(time.perf_counter()))
    while min(len(t) for t in times) < 8:
        time.sleep(0.0005)
    t0, lat_s = time.perf_counter(), []
    for p in joiners:
        sched.submit(p, SamplingParams(max_new_tokens=4, top_k=1, ignore_eos=True),
                     lambda ids, err: (lat_s.append(time.perf_counter() - t0), done.release()))
    for _ in range(streams + len(joiners)):
        done.acquire(timeout=600)
    gaps = [b - a for t in times for a, b in zip(t[8: 8 + window], t[9: 9 + window])]
    return {f"itl_p{q}_ms": common.percentile(gaps, q, 1e3, 3) for q in (50, 95, 99)} | {
        "itl_max_ms": round(1e3 * max(gaps), 3), "joiner_latency_max_ms": round(1e3 * max(lat_s), 2) if lat_s else None}


def joiner(a, hdf5: Path) -> dict:
    """joiner_case without and with the long prompts, at the default prefill budget and at --joiner-budget."""
    from lsgpt.engine.engine import Engine
    from lsgpt.engine.scheduler import Scheduler

    eng = Engine.load(hdf5, a.device)
    cfg, rows = eng.config, []
    rng = random.Random(a.seed)
    n = min(768, cfg.max_step - 8)
    long = [[rng.randint(100, cfg.vocab - 1) for _ in range(n)] for _ in range(a.joiners)]
    for budget in (None, a.joiner_budget):
        sched = Scheduler(eng, max_rows="auto", prefill_tokens=budget)
        try:
            joiner_case(sched, min(8, a.joiner_streams), 16, [], cfg.vocab)  # warm (CUDA: first-use costs)
            for with_j in (False, True):
                row = {"prefill_tokens": sched.prefill_tokens, "admit_every": sched.admit_every, "rows": sched.max_rows,
                       "streams": a.joiner_streams, "joiners": len(long) if with_j else 0, "joiner_len": n}
                c0 = sched.stats.chunks
                row |= joiner_case(sched, a.joiner_streams, a.joiner_window, long if with_j else [], cfg.vocab)
                rows.append(row | {"chunks": sched.stats.chunks - c0})
                print(json.dumps(rows[-1]), flush=True)
        finally:
            sched.close()
    for r0, r1 in zip(rows[::2], rows[1::2]):
        r1["itl_p95_over_without"] = round(r1["itl_p95_ms"] / r0["itl_p95_ms"], 2)
    return {"model": hdf5.name, "window_tokens": a.joiner_window, "rows": rows}


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
        if "in_process_rows" in i:
            out += ["", f"Served vs in process ({i['in_process_rows']} rows, prefill budget {i['prefill_tokens']}, admit "
                    f"every {i['admit_every']}) vs the engine's fixed batch; TTFT/ITL ms streamed (served twin) | in process",
                    "", "| conc | served tok/s | in process | fixed batch (B) | served/in proc | in proc/fixed | tok/step |"
                    " ms/step | ms/prefill | TTFT p50/p95 | ITL p50/p95 |", "|" + "---|" * 11]
            out += [f"| {x['concurrency']} | {x['output_tokens_per_s']} | {x['in_process_tokens_per_s']} | "
                    f"{x['fixed_batch_tokens_per_s']} ({x['fixed_batch']}) | {x['served_over_in_process']} | "
                    f"{x['in_process_over_fixed']} | {x['in_process_tokens_per_step']} | {x['ms_per_step']} | "
                    f"{x['ms_per_prefill']} | {x['stream_ttft_p50_ms']}/{x['stream_ttft_p95_ms']} \\| "
                    f"{x['in_process_ttft_p50_ms']}/{x['in_process_ttft_p95_ms']} | {x['stream_itl_p50_ms']}/"
                    f"{x['stream_itl_p95_ms']} \\| {x['in_process_itl_p50_ms']}/{x['in_process_itl_p95_ms']} |"
                    for x in i["levels"]]
            out += [f"- {x['concurrency']} streams, GPU (--gpu-profile): busy {x['in_process_gpu_busy']} in process, "
                    f"{x['fixed_gpu_busy']} fixed; kernel ms a decode step {x['in_process_kernel_ms_per_step']} in process "
                    f"(prefills a step {x['in_process_prefills_per_step']}), {x['fixed_kernel_ms_per_step']} fixed"
                    for x in i["levels"] if "in_process_gpu_busy" in x]
    if j := r.get("joiner"):
        out += ["", f"**Long joiner** (in process, {j['model']}): ITL of the running streams over {j['window_tokens']} "
                "tokens each, without and with long prompts joining", "",
                "| budget | rows | streams | joiners × len | chunks | ITL p50 / p95 / p99 / max ms | p95 vs without |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| {x['prefill_tokens']} | {x['rows']} | {x['streams']} | {x['joiners']} × {x['joiner_len']} | "
                f"{x['chunks']} | {x['itl_p50_ms']} / {x['itl_p95_ms']} / {x['itl_p99_ms']} / {x['itl_max_ms']} | "
                f"{x.get('itl_p95_over_without', '')} |" for x in j["rows"]]
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
    p.add_argument("--sections", type=common.sections_type(("overhead", "inflight", "joiner")),
                   default="overhead,inflight", help="comma-separated subset of overhead,inflight,joiner")
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
    p.add_argument("--client-procs", type=int, default=8, help="inflight: client processes the served load comes "
                   "from (unary at 64+ streams; streamed: up to one per 4 streams): one Python process's GIL caps its "
                   "gRPC clients")
    p.add_argument("--py-spy", type=float, default=0, metavar="SECONDS",
                   help="inflight: sample the served model's process with py-spy for SECONDS of each level")
    p.add_argument("--py-spy-gil", action="store_true", help="--py-spy: only samples of the thread holding the GIL "
                   "(who keeps the scheduler's thread waiting for it)")
    p.add_argument("--in-process", action="store_true", help="inflight: also the Scheduler in process, the fixed "
                   "batch and streamed TTFT/ITL (requests: at least 8 per client)")
    p.add_argument("--gpu-profile", action="store_true", help="inflight --in-process on CUDA: GPU busy and kernel "
                   "ms per decode step in process and in the fixed batch (torch.profiler over a share of the load)")
    p.add_argument("--joiners", type=int, default=4, help="joiner: long prompts that join")
    p.add_argument("--joiner-streams", type=int, help="joiner: running streams (default 128 on CUDA, 16 on the CPU)")
    p.add_argument("--joiner-window", type=int, default=200, help="joiner: tokens of each stream measured")
    p.add_argument("--joiner-budget", type=int, default=256, help="joiner: the chunking prefill budget compared")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the server (default 1 on the CPU)")
    common.add_output_args(p, "serving", replot="the Markdown and PNG")
    a = p.parse_args(argv)
    if a.client_procs < 1:
        p.error(f"--client-procs: at least 1, got {a.client_procs}")
    if a.py_spy < 0:
        p.error(f"--py-spy: seconds must be >= 0, got {a.py_spy}")
    if a.py_spy:
        from benchmarks import pyspy

        if pyspy.binary() is None:  # before any server starts, not as an error in every level's report
            p.error("--py-spy: py-spy not found (pip install py-spy, or PY_SPY=/path/to/py-spy)")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.replot:
        report, out = common.read_replot(a.replot, "serving"), a.out or a.replot.parent
    else:
        import torch

        a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
        gpu, sections = a.device.startswith("cuda"), a.sections
        for k, g, c in (("layers", 12, 4), ("hidden", 768, 256), ("heads", 12, 4), ("threads", 0, 1),
                        ("joiner_streams", 128, 16)):
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
            models = list(files) + ([probe[0] + "_stream"] if a.in_process and "inflight" in sections else [])
            with common.served(repo, models, device=a.device if gpu else None,
                               threads=a.threads or None) as (url, server):
                if "overhead" in sections:
                    report["overhead"] = overhead(a, url, files)
                if "inflight" in sections:
                    report["inflight"] = inflight(a, url, *probe, server=server)
            if "joiner" in sections:
                report["joiner"] = joiner(a, probe[1])
        out = common.results_dir("serving", a.out, a.device, a.record)
    common.write_report(out, "serving", report, plot, markdown(report), save=not a.replot)
    levels = report.get("inflight", {}).get("levels", [])
    return 0 if all(x["failed"] == x.get("stream_failed", 0) == x.get("in_process_failed", 0) == 0 for x in levels) else 1


def _served_name(hdf5: Path) -> str:
    from lsgpt.format import read_hdf5

    return "gpt2_int8" if read_hdf5(hdf5)[0].quantized else "gpt2"


if __name__ == "__main__":
    sys.exit(main())
