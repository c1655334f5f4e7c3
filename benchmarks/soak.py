#!/usr/bin/env python3
"""Soak test: hold a fixed concurrency for N minutes; count failed requests (must be 0) and watch memory
(growth after warm-up must stay under 5%).

    python benchmarks/soak.py --minutes 3 --concurrency 4                # real tritonserver, gRPC clients
    python benchmarks/soak.py --url localhost:8001 --pid $(pgrep -o tritonserver) --minutes 30
    python benchmarks/soak.py --in-process --device cuda --minutes 2      # the engine alone (GPU machine)

Server mode: what is served is chosen as in loadtest.py (repository, --hdf5, or a fresh tiny random model);
`concurrency` client threads each send one request after another over gRPC (tritonclient.grpc), cycling
through real tokenized prompts with varied max_new_tokens (so the engine sees different batch and cache
shapes). Memory = RSS of tritonserver plus all its descendants (the Python-backend stub processes),
sampled every few seconds with psutil. Failures = client-side errors plus the server's own fail count.
In-process mode: one loop calls Engine.generate on batches of 1..max_batch prompts; memory = this
process's RSS, and on CUDA also torch's allocated/reserved device memory.

Growth = median of the last 10% of samples vs the median of the first 10% after the warm-up.
Writes soak.json and soak.png (memory over time, requests per interval).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import (  # noqa: E402
    ROOT,
    BUILTIN_PROMPTS,
    default_prompt_source,
    device_slug,
    encode_prompts,
    failure_counts,
    find_tokenizer,
    BenchError,
    load_prompts,
    own_rss,
    prepare_repository,
    process_tree_rss,
    pyplot,
    served,
    temp_workdir,
)

GROWTH_LIMIT = 0.05


@dataclass
class Tally:
    """Request outcomes, shared by the client threads."""

    ok: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (time since start, seconds)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, t: float, latency: float | None, error: str | None = None) -> None:
        with self.lock:
            if error is None:
                self.ok += 1
                self.latencies.append((t, latency or 0.0))
            else:
                self.failed += 1
                if len(self.errors) < 20:
                    self.errors.append(error)


def client_loop(url: str, model: str, rows: list[list[int]], lengths: list[int], stop: threading.Event,
                tally: Tally, t0: float, offset: int) -> None:
    import numpy as np
    import tritonclient.grpc as grpcclient

    with contextlib.closing(grpcclient.InferenceServerClient(url)) as c:
        i = offset
        while not stop.is_set():
            r, n = rows[i % len(rows)], lengths[i % len(lengths)]
            i += 1
            inputs = []
            for name, arr in (("token_ids", np.array([r], np.int32)), ("max_new_tokens", np.array([[n]], np.int32)),
                              ("top_k", np.array([[1]], np.int32))):
                t = grpcclient.InferInput(name, list(arr.shape), "INT32")
                t.set_data_from_numpy(arr)
                inputs.append(t)
            start = time.monotonic()
            try:
                res = c.infer(model, inputs, client_timeout=120)
                out = res.as_numpy("result")
                if out is None or out.shape[-1] <= len(r):
                    raise RuntimeError(f"bad result shape {None if out is None else out.shape}")
                tally.record(start - t0, time.monotonic() - start)
            except Exception as e:  # noqa: BLE001 - every failure counts, whatever its kind
                tally.record(start - t0, None, f"{type(e).__name__}: {e}")


def sample_memory(pid: int | None, stop: threading.Event, every: float, t0: float, samples: list[dict],
                  cuda: bool = False) -> None:
    """Every `every` s: RSS of `pid` and its descendants (pid None: this process), MiB."""
    while True:
        total, per = process_tree_rss(pid) if pid is not None else (0, {})
        if pid is None:  # in process: only this process (children would be compile workers)
            total = own_rss()
            per = {"python": total}
        s = {"t": round(time.monotonic() - t0, 2), "rss_mib": total / 2**20,
             "per_process_mib": {k: v / 2**20 for k, v in per.items()}}
        if cuda:
            import torch

            s["cuda_allocated_mib"] = torch.cuda.memory_allocated() / 2**20
            s["cuda_reserved_mib"] = torch.cuda.memory_reserved() / 2**20
        samples.append(s)
        if stop.wait(every):
            return


def growth(samples: list[dict], warmup_s: float, key: str = "rss_mib") -> dict:
    """Median of the first 10% after warm-up vs the median of the last 10% (at least 3 samples each)."""
    after = [s[key] for s in samples if s["t"] >= warmup_s and key in s]
    if len(after) < 2:
        return {"baseline_mib": None, "final_mib": None, "growth": None, "samples_after_warmup": len(after)}
    k = max(3, len(after) // 10) if len(after) >= 6 else 1
    base, final = statistics.median(after[:k]), statistics.median(after[-k:])
    return {"baseline_mib": round(base, 1), "final_mib": round(final, 1), "peak_mib": round(max(after), 1),
            "growth": round((final - base) / base, 4) if base else None, "samples_after_warmup": len(after)}


def per_interval(latencies: list[tuple[float, float]], duration: float, width: float) -> list[dict]:
    out = []
    t = 0.0
    while t < duration:
        xs = sorted(lat for s, lat in latencies if t <= s < t + width)
        out.append({"t": round(t, 1), "requests": len(xs),
                    "p50_ms": round(xs[len(xs) // 2] * 1000, 1) if xs else None,
                    "p95_ms": round(xs[min(len(xs) - 1, int(len(xs) * 0.95))] * 1000, 1) if xs else None})
        t += width
    return out


# ---------------------------------------------------------------------------------------------


def soak_server(a: argparse.Namespace, rows: list[list[int]], lengths: list[int], repo: Path, models: list[str],
                samples: list[dict]) -> dict:
    model = models[0]
    tally = Tally()
    with served(repo, models, a.url, threads=a.server_threads or None) as (url, server):
        pid = a.pid if a.url else (server.proc.pid if server and server.proc else None)
        if pid is None:
            raise SystemExit("soak: with --url, pass --pid of the tritonserver to watch its memory")
        ok0, fail0 = failure_counts(url, model)
        stop = threading.Event()
        t0 = time.monotonic()
        mem = threading.Thread(target=sample_memory, args=(pid, stop, a.sample_every, t0, samples), daemon=True)
        mem.start()
        clients = [threading.Thread(target=client_loop, args=(url, model, rows, lengths, stop, tally, t0, k * 7),
                                    daemon=True) for k in range(a.concurrency)]
        for c in clients:
            c.start()
        _wait(stop, a.minutes * 60, tally)
        for c in clients:
            c.join(150)
        elapsed = time.monotonic() - t0
        mem.join(10)
        ok1, fail1 = failure_counts(url, model)
        if server is not None and server.log_path and server.log_path.is_file():
            reloads = server.log_path.read_text(errors="replace").count(f"loading: {model}:")
        else:
            reloads = None
    return {"model": model, "url": url, "elapsed_s": round(elapsed, 1), "client_ok": tally.ok,
            "client_failed": tally.failed, "server_ok": ok1 - ok0, "server_failed": fail1 - fail0,
            "model_loads_in_log": reloads, "errors": tally.errors, "latencies": tally.latencies}


def soak_in_process(a: argparse.Namespace, rows: list[list[int]], lengths: list[int], hdf5: Path,
                    samples: list[dict]) -> dict:
    import torch

    from lsgpt.engine import Engine, SamplingParams

    dev = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev == "cpu" and a.server_threads:
        torch.set_num_threads(a.server_threads)
    engine = Engine.load(hdf5, dev)
    tally = Tally()
    stop = threading.Event()
    t0 = time.monotonic()
    mem = threading.Thread(target=sample_memory, args=(None, stop, a.sample_every, t0, samples, dev.startswith("cuda")),
                           daemon=True)
    mem.start()
    deadline = t0 + a.minutes * 60
    i = 0
    while time.monotonic() < deadline:
        b = 1 + i % a.max_batch
        batch = [rows[(i + j) % len(rows)] for j in range(b)]
        sp = SamplingParams(max_new_tokens=lengths[i % len(lengths)], top_k=1)
        start = time.monotonic()
        try:
            res = engine.generate(batch, sp)
            if dev.startswith("cuda"):
                torch.cuda.synchronize()
            if len(res) != b:
                raise RuntimeError(f"{len(res)} rows for a batch of {b}")
            for _ in range(b):
                tally.record(start - t0, time.monotonic() - start)
        except Exception as e:  # noqa: BLE001
            tally.record(start - t0, None, f"{type(e).__name__}: {e}")
        i += 1
    stop.set()
    mem.join(10)
    return {"model": str(hdf5.name), "device": dev, "elapsed_s": round(time.monotonic() - t0, 1),
            "client_ok": tally.ok, "client_failed": tally.failed, "server_ok": None, "server_failed": 0,
            "errors": tally.errors, "latencies": tally.latencies}


def random_export(work: Path, layers: int, hidden: int, heads: int, max_step: int, vocab: int) -> tuple[Path, int]:
    """A random-weight GPT-2 exported to an fp HDF5 file (no tokenizer needed)."""
    import bench_generate
    from lsgpt.convert import export_model

    model = bench_generate.random_model(layers, hidden, heads, vocab, max(max_step, 64))
    return export_model(model, work / "fp.hdf5", max_step=max_step, eos_id=102), vocab


def _wait(stop: threading.Event, seconds: float, tally: Tally) -> None:
    end = time.monotonic() + seconds
    last = time.monotonic()
    while not stop.wait(min(5.0, max(0.0, end - time.monotonic()))):
        now = time.monotonic()
        if now >= end:
            break
        if now - last >= 30:
            last = now
            print(f"  {seconds - (end - now):6.0f}/{seconds:.0f} s: {tally.ok} ok, {tally.failed} failed", flush=True)
    stop.set()


# ---------------------------------------------------------------------------------------------


def plot(report: dict, png: Path) -> bool:
    plt = pyplot()
    if plt is None:
        print("matplotlib not installed: no PNG (re-plot later with --replot soak.json)")
        return False
    samples = report["samples"]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    ts = [s["t"] for s in samples]
    a1.plot(ts, [s["rss_mib"] for s in samples], "-", lw=2, label="total RSS")
    names = sorted({n for s in samples for n in s["per_process_mib"]})
    if len(names) > 1:
        for n in names:
            a1.plot(ts, [s["per_process_mib"].get(n, 0) for s in samples], "--", lw=1, label=n)
    if any("cuda_allocated_mib" in s for s in samples):
        a1.plot(ts, [s.get("cuda_reserved_mib", 0) for s in samples], ":", label="CUDA reserved")
        a1.plot(ts, [s.get("cuda_allocated_mib", 0) for s in samples], ":", label="CUDA allocated")
    a1.axvspan(0, report["warmup_s"], color="gray", alpha=0.15, label="warm-up")
    g = report["memory"]["growth"]
    g = report["memory"]["growth"]
    grown = "n/a" if g is None else f"{g * 100:+.2f}%"
    a1.set(ylabel="MiB", title=f"{report['details']['model']} on {report['device']}, "
           f"{'in process' if report['mode'] == 'in_process' else 'concurrency ' + str(report['concurrency'])}: "
           f"memory growth after warm-up {grown} (limit {report['growth_limit'] * 100:.0f}%)")
    fig.suptitle(report["what"], fontsize=8)
    a1.legend(fontsize=8, loc="lower right")
    a1.grid(alpha=0.3)
    iv = report["intervals"]
    w = iv[1]["t"] - iv[0]["t"] if len(iv) > 1 else 10
    a2.bar([x["t"] + w / 2 for x in iv], [x["requests"] / w for x in iv], width=w * 0.9, label="requests/s")
    a2.set(xlabel="seconds", ylabel="requests / s",
           title=f"{report['requests_ok']} ok, {report['requests_failed']} failed", )
    a2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--concurrency", type=int, default=4, help="client threads (server mode)")
    p.add_argument("--warmup", type=float, default=None, help="seconds excluded from the growth (default 20%%, >= 10 s)")
    p.add_argument("--sample-every", type=float, default=2.0, help="seconds between memory samples")
    p.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    p.add_argument("--hdf5", type=Path, help="serve (or, in process, load) this exported file")
    p.add_argument("--model", default="gpt2", help="served model to soak (gpt2, gpt2_int8)")
    p.add_argument("--url", help="gRPC url of a running server (then --pid says which process to watch)")
    p.add_argument("--pid", type=int, help="tritonserver pid (with --url)")
    p.add_argument("--server-threads", type=int, default=1, help="OMP_NUM_THREADS of the served models (in process on CPU: torch threads); 0 = default")
    p.add_argument("--tokenizer")
    p.add_argument("--prompts", default=None, help="text file, one prompt a line (default data/train.txt)")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--max-new-tokens", default="8,16,32", help="cycled per request")
    p.add_argument("--in-process", action="store_true", help="soak the engine in this process (no server)")
    p.add_argument("--device", help="in process: cpu / cuda")
    p.add_argument("--max-batch", type=int, default=8, help="in process: batches of 1..max-batch prompts")
    p.add_argument("--tiny-shape", default="2,128,4,128", help="layers,hidden,heads,max_step of a random model")
    p.add_argument("--vocab", type=int, default=21128, help="in process: vocabulary of the random model")
    p.add_argument("--out", type=Path, default=None, help="output folder (default results/<device>/soak)")
    p.add_argument("--replot", type=Path, help="only re-make the PNG from a soak.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.replot:
        report = json.loads(a.replot.read_text())
        png = a.replot.with_suffix(".png")
        if plot(report, png):
            print(f"wrote {png}")
        return 0
    out: Path = a.out or ROOT / "results" / device_slug(a.device if a.in_process else None) / "soak"
    out.mkdir(parents=True, exist_ok=True)
    layers, hidden, heads, max_step = (int(x) for x in a.tiny_shape.split(","))
    lengths = [int(x) for x in a.max_new_tokens.split(",")]
    warmup = a.warmup if a.warmup is not None else max(10.0, a.minutes * 60 * 0.2)
    samples: list[dict] = []
    with temp_workdir("lsgpt-soak-") as tmp:
        work = Path(tmp)
        src = a.prompts or default_prompt_source()
        texts = load_prompts(src, a.num_prompts) if src != "builtin" else BUILTIN_PROMPTS
        if a.in_process:
            hdf5, what, vocab = a.hdf5, f"{a.hdf5}", None
            if hdf5 is None:
                hdf5, vocab = random_export(work, layers, hidden, heads, max_step, a.vocab)
                what = f"random GPT-2 {layers}L/{hidden}H/vocab {vocab}, max_step {max_step}"
            try:
                tok = find_tokenizer(a.tokenizer, a.model_repository, a.model)
                rows = encode_prompts(tok, texts, vocab)
            except BenchError as e:  # a bare GPU machine: no tokenizer files; random ids instead
                print(f"soak: {e}; random token ids as prompts")
                import random

                rnd = random.Random(0)
                rows = [[101] + [rnd.randrange(1000, vocab or 21128) for _ in range(rnd.randrange(4, 24))]
                        for _ in range(a.num_prompts)]
        else:
            if a.url:
                tok, what, vocab, repo, models = find_tokenizer(a.tokenizer, a.model_repository, a.model), \
                    f"running server at {a.url}", None, a.model_repository, [a.model]
            else:
                prep = prepare_repository(a.model_repository, work, hdf5=a.hdf5, tokenizer=a.tokenizer,
                                          models=[a.model], layers=layers, hidden=hidden, heads=heads, max_step=max_step)
                tok, what, vocab, repo = prep.tokenizer, prep.source, prep.vocab, prep.repository
                models = prep.models if a.hdf5 else [a.model]
            rows = encode_prompts(tok, texts, vocab)
        print(f"soak: {what}; {'in process' if a.in_process else f'model {models[0]}, concurrency {a.concurrency}'}, "
              f"{a.minutes:g} min, warm-up {warmup:.0f} s, {len(rows)} prompts, max_new_tokens {lengths}", flush=True)
        if a.in_process:
            res = soak_in_process(a, rows, lengths, hdf5, samples)
        else:
            res = soak_server(a, rows, lengths, repo, models, samples)
    mem = growth(samples, warmup)
    failed = res["client_failed"] + (res["server_failed"] or 0)
    passed = failed == 0 and res["client_ok"] > 0 and mem["growth"] is not None and mem["growth"] < GROWTH_LIMIT
    report = {
        "task": "soak",
        "what": what + (" (in process)" if a.in_process else ""),
        "device": device_slug(a.device if a.in_process else None),
        "mode": "in_process" if a.in_process else "server",
        "concurrency": 1 if a.in_process else a.concurrency,
        "minutes": a.minutes,
        "warmup_s": warmup,
        "max_new_tokens": lengths,
        "requests_ok": res["client_ok"],
        "requests_failed": failed,
        "throughput_rps": round(res["client_ok"] / res["elapsed_s"], 2) if res["elapsed_s"] else 0,
        "latency_ms": _pcts([lat for _, lat in res["latencies"]]),
        "memory": mem,
        "growth_limit": GROWTH_LIMIT,
        "passed": passed,
        "details": {k: v for k, v in res.items() if k != "latencies"},
        "intervals": per_interval(res["latencies"], res["elapsed_s"], max(5.0, a.minutes * 60 / 30)),
        "samples": samples,
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(sys.argv[1:] if argv is None else argv)]),
    }
    if a.in_process and samples and "cuda_reserved_mib" in samples[0]:
        report["cuda_memory"] = growth(samples, warmup, "cuda_reserved_mib")
    (out / "soak.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    plotted = plot(report, out / "soak.png")
    g = mem["growth"]
    print(f"soak: {report['requests_ok']} ok, {failed} failed, {report['throughput_rps']} req/s, "
          f"p50 {report['latency_ms']['p50']} ms p95 {report['latency_ms']['p95']} ms; memory "
          f"{mem['baseline_mib']} -> {mem['final_mib']} MiB after warm-up "
          f"({'n/a' if g is None else f'{g * 100:+.2f}%'}, limit {GROWTH_LIMIT * 100:.0f}%): "
          f"{'PASS' if passed else 'FAIL'}")
    if res["errors"]:
        print("  first errors: " + " | ".join(res["errors"][:3]))
    print(f"wrote {out / 'soak.json'}" + (f", {out / 'soak.png'}" if plotted else ""))
    return 0 if passed else 1


def _pcts(xs: list[float]) -> dict:
    if not xs:
        return {"p50": None, "p95": None, "p99": None}
    s = sorted(xs)
    return {f"p{q}": round(s[min(len(s) - 1, int(len(s) * q / 100))] * 1000, 1) for q in (50, 95, 99)}


if __name__ == "__main__":
    sys.exit(main())
