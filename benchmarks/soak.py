#!/usr/bin/env python3
"""Soak test: hold a fixed concurrency for N minutes; count failed requests (must be 0) and watch memory
(growth after warm-up must stay under 5%).

    python -m benchmarks.soak --minutes 3 --concurrency 4                # real tritonserver, gRPC clients
    python -m benchmarks.soak --url localhost:8001 --pid $(pgrep -o tritonserver) --minutes 30

What is served is chosen as in loadtest.py (repository, --hdf5, or a fresh tiny random model);
`concurrency` client threads each send one request after another over gRPC, cycling through real tokenized
prompts with varied max_new_tokens (so the engine sees different batch and cache shapes). Memory = RSS of
tritonserver plus all its descendants (the Python-backend stubs). Failures = client-side errors plus the
server's own fail count. --cancel-fraction F: that share of the requests goes to the model's streaming twin
instead and is cancelled by the client after its first tokens (a closed stream, as a browser tab that goes
away); they count as cancelled, not failed, and the twin must keep answering. Hung = a request still unanswered
180 s after it was sent (each has a 120 s deadline): counted once, the client's stacks printed, the soak fails.
`kill -USR1 <soak pid>` prints the client threads' stacks at any time.
Growth = median of the last 10% of samples vs the median of the first 10% after the warm-up.
Writes results/tmp/<device>/soak/soak.{json,png} (--record: results/<device>/soak/) (memory over time, requests per interval).
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import random
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks import common
from lsgpt.contract import CANCEL_KEY, STREAM_SUFFIX

GROWTH_LIMIT = 0.05
HANG_S = 180.0  # a request unanswered this long is hung: every request has a 120 s deadline of its own


class Tally:
    """Request outcomes, shared by the client threads: (time since start, latency) per success, errors."""

    def __init__(self):
        self.ok, self.failed, self.errors, self.latencies, self.lock = 0, 0, [], [], threading.Lock()
        self.cancelled = 0
        self.hung = 0  # requests still unanswered HANG_S after they were sent (each counted once)
        self.inflight: dict[int, float] = {}  # client thread -> when its request in flight was sent

    def record(self, t: float, latency: float | None, error: str | None = None) -> None:
        with self.lock:
            if error is None:
                self.ok += 1
                self.latencies.append((t, latency))
            else:
                self.failed += 1
                self.errors = (self.errors + [error])[:20]


def gpu_memory(pid: int) -> dict:
    """GPU memory (MiB) that nvidia-smi gives the processes of `pid`'s tree (the server and its model stubs), or,
    where it lists none of them (a container's own PID namespace), the whole GPU's used memory; {} without
    nvidia-smi. Our own client threads hold no GPU memory, so on a GPU of its own both scopes show the server."""
    if shutil.which("nvidia-smi") is None:
        return {}
    import psutil

    def smi(query: str, *extra: str) -> list[list[str]]:
        out = subprocess.run(["nvidia-smi", f"--query-{query}", "--format=csv,noheader,nounits", *extra],
                             capture_output=True, text=True, timeout=20).stdout
        return [[x.strip() for x in line.split(",")] for line in out.splitlines() if line.strip()]

    try:
        tree = {pid} | {c.pid for c in psutil.Process(pid).children(recursive=True)}
        mine = [float(m) for p, m in smi("compute-apps=pid,used_memory") if p.isdigit() and int(p) in tree]
        if mine:
            return {"gpu_mib": sum(mine), "gpu_scope": "server processes"}
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")  # the server's GPUs only (a soak beside other work)
        only = ["-i", visible] if re.fullmatch(r"\d+(,\d+)*", visible) else []
        return {"gpu_mib": sum(float(m) for (m,) in smi("gpu=memory.used", *only)), "gpu_scope": "whole GPU"}
    except (OSError, ValueError, subprocess.SubprocessError, psutil.Error):
        return {}


def sample_memory(pid: Any, stop: threading.Event, every: float, t0: float, samples: list) -> None:
    """Every `every` s: RSS (MiB) of `pid` and its descendants, and the server's GPU memory per nvidia-smi."""
    while True:
        now = pid() if callable(pid) else pid  # a callable: the server's pid now (a supervised restart changes it)
        per = None
        if now or not callable(pid):  # a callable gives None between a restart's stop and start: no sample then
            try:
                per = {k: v / 2**20 for k, v in common.rss(now).items()}
            except Exception:  # noqa: BLE001 - psutil.NoSuchProcess: the server went away mid-sample (a restart)
                pass
        if per is None:
            if stop.wait(every):
                return
            continue
        s = {"t": round(time.monotonic() - t0, 2), "rss_mib": sum(per.values()), "per_process_mib": per}
        if now:
            s |= gpu_memory(now)
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


def cancel_one(url: str, model: str, r: list[int], n: int, mode: str) -> None:
    """Stream from the twin, then close the stream after the first tokens: the server must free the row."""
    import queue

    import tritonclient.grpc as grpcclient

    from lsgpt.client.api import _inputs, close_stream

    got: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(url)
    rid, key, twin = uuid.uuid4().hex, secrets.token_urlsafe(24), model + STREAM_SUFFIX  # key: only we can cancel
    try:
        c.start_stream(callback=lambda result, error: got.put(error))
        c.async_stream_infer(twin, _inputs(grpcclient, r, {"max_new_tokens": max(n, 8), "top_k": 1}), request_id=rid,
                             parameters={CANCEL_KEY: key})
        for _ in range(2):  # two tokens, then the client goes away
            err = got.get(timeout=120)
            if err is not None:
                raise err
    finally:  # also after a timeout: tritonclient's close() alone waits for the stream's last answer forever
        if mode == "abrupt":  # the call cancelled at once, as a client that dies mid-stream
            close_stream(c, wait=0)
        else:
            close_stream(c, cancel=(twin, rid, key))
        c.close()


def soak(a: argparse.Namespace, rows: list[list[int]], lengths: list[int], samples: list, *, url: str | None = None,
         model: str = "", pid: Any = None) -> tuple[Tally, float]:
    """Run the load for a.minutes: client threads against `url`."""
    tally, stop, t0 = Tally(), threading.Event(), time.monotonic()
    threading.Thread(target=sample_memory, args=(pid, stop, a.sample_every, t0, samples), daemon=True).start()

    def client(offset: int) -> None:
        import tritonclient.grpc as grpcclient

        rnd = random.Random(offset)
        with grpcclient.InferenceServerClient(url) as c:
            i = offset
            while not stop.is_set():
                r, n, i, start = rows[i % len(rows)], lengths[i % len(lengths)], i + 1, time.monotonic()
                tally.inflight[offset] = start
                if rnd.random() < a.cancel_fraction:
                    try:
                        cancel_one(url, model, r, n, a.cancel_mode)
                        with tally.lock:
                            tally.cancelled += 1
                    except Exception as e:  # noqa: BLE001
                        tally.record(start - t0, None, f"cancelled stream: {type(e).__name__}: {e}")
                    continue
                try:
                    if len(common.infer(c, model, r, n, timeout=120)) <= len(r):
                        raise RuntimeError("no new tokens in the result")
                    tally.record(start - t0, time.monotonic() - start)
                except Exception as e:  # noqa: BLE001 - every failure counts, whatever its kind
                    tally.record(start - t0, None, f"{type(e).__name__}: {e}")
            tally.inflight.pop(offset, None)

    workers = [threading.Thread(target=client, args=(k * 7,), daemon=True) for k in range(a.concurrency)]
    for w in workers:
        w.start()
    watch(a, tally, stop, t0, workers)
    return tally, time.monotonic() - t0


def watch(a: argparse.Namespace, tally: Tally, stop: threading.Event, t0: float, workers: list) -> None:
    """Report progress every 30 s until a.minutes pass, then stop the workers; count hung requests."""
    end, seen_hung = t0 + a.minutes * 60, set()

    def count_hung() -> None:
        """Requests in flight for over HANG_S count as hung, once each; the first time, every thread's stack."""
        now = time.monotonic()
        new = {(k, s) for k, s in list(tally.inflight.items()) if now - s > HANG_S} - seen_hung
        if new:
            if not seen_hung:
                print(f"soak: {len(new)} request(s) unanswered after {HANG_S:.0f} s; the client's threads:", flush=True)
                faulthandler.dump_traceback(all_threads=True)
            seen_hung.update(new)
            tally.hung += len(new)

    while not stop.wait(min(30.0, max(0.0, end - time.monotonic()))):
        if time.monotonic() >= end:
            break
        count_hung()
        print(f"  {time.monotonic() - t0:6.0f}/{a.minutes * 60:.0f} s: {tally.ok} ok, {tally.cancelled} cancelled, "
              f"{tally.failed} failed, {tally.hung} hung", flush=True)
    stop.set()
    deadline = time.monotonic() + HANG_S
    for w in workers:
        w.join(max(0.0, deadline - time.monotonic()))
    count_hung()


def plot(report: dict, png: Path) -> None:
    samples, iv = report["samples"], report["intervals"]
    with common.figure(png, 2, 1, figsize=(9, 6), sharex=True, gridspec_kw={"height_ratios": [2, 1]}) as (fig, (a1, a2)):
        if fig is None:
            return
        ts = [s["t"] for s in samples]
        a1.plot(ts, [s["rss_mib"] for s in samples], "-", lw=2, label="total RSS")
        names = sorted({n for s in samples for n in s["per_process_mib"]})
        for n in names if len(names) > 1 else []:
            a1.plot(ts, [s["per_process_mib"].get(n, 0) for s in samples], "--", lw=1, label=n)
        if "gpu_mib" in samples[0]:
            a1.plot(ts, [s.get("gpu_mib", 0) for s in samples], ":", lw=2, label=f"GPU ({samples[0]['gpu_scope']})")
        a1.axvspan(0, report["warmup_s"], color="gray", alpha=0.15, label="warm-up")
        g = report["memory"]["growth"]
        a1.set(ylabel="MiB", title=f"{report['details']['model']} on {report['device']}, concurrency "
               f"{report['concurrency']}: memory growth after "
               f"warm-up {'n/a' if g is None else f'{g * 100:+.2f}%'} (limit {report['growth_limit'] * 100:.0f}%)")
        a1.legend(fontsize=8, loc="lower right")
        w = iv[1]["t"] - iv[0]["t"] if len(iv) > 1 else 10
        a2.bar([x["t"] + w / 2 for x in iv], [x["requests"] / w for x in iv], width=w * 0.9)
        a2.set(xlabel="seconds", ylabel="requests / s", title=f"{report['requests_ok']} ok, {report['requests_failed']} failed")
        for ax in (a1, a2):
            ax.grid(alpha=0.3)
        fig.suptitle(report["what"], fontsize=8)


def run_served(a: argparse.Namespace, texts: list[str], lengths: list[int], samples: list, tmp: str,
               warmup: float) -> tuple[Tally, float, dict, str]:
    """Client threads against a tritonserver (ours, supervised, or the one at --url): (tally, seconds, details,
    what was soaked)."""
    if a.url:
        repo, tok, what, vocab, models = a.model_repository, common.find_tokenizer(a.tokenizer, a.model_repository,
                                                                            a.model), f"running server at {a.url}", None, [a.model]
    else:
        repo, tok, what, vocab, models = common.prepare(a.model_repository, Path(tmp), hdf5=a.hdf5, tokenizer=a.tokenizer,
                                                 models=[a.model], tiny_shape=a.tiny_shape)
    rows, model = common.encode_prompts(tok, texts, vocab), models[0]
    print(f"soak: {what}; model {model}, concurrency {a.concurrency}, {a.minutes:g} min, warm-up {warmup:.0f} s, "
          f"{len(rows)} prompts, max_new_tokens {lengths}", flush=True)
    served_models = models + ([model + STREAM_SUFFIX] if a.cancel_fraction > 0 else [])
    with common.served(repo, served_models, a.url, threads=a.server_threads or None) as (url, server):
        stop_sup = threading.Event()
        if server is not None and not a.no_supervise:  # as `make serve` runs it: restarted if it fails
            threading.Thread(target=server.supervise, kwargs=dict(stop=stop_sup), daemon=True).start()
        ok0, fail0 = common.failure_counts(url, model)
        tally, elapsed = soak(a, rows, lengths, samples, url=url, model=model,
                              pid=a.pid if a.url else lambda: server.proc and server.proc.pid)
        stop_sup.set()
        restarts = [] if server is None else [why for _, why in server.restarts]
        ok1, fail1 = (0, 0) if restarts else common.failure_counts(url, model)  # a restart zeroes them
        log = server.log_path.read_text(errors="replace") if server and server.log_path else None
    details = {"model": model, "url": url, "server_ok": None if restarts else ok1 - ok0,
               "server_failed": 0 if restarts else fail1 - fail0, "server_restarts": restarts,
               "cancel_mode": a.cancel_mode,
               "model_loads_in_log": None if log is None else log.count(f"loading: {model}:")}
    return tally, elapsed, details, what


def say_result(report: dict, tally: Tally, mem: dict, gpu: dict | None, samples: list) -> None:
    failed, details, passed = report["requests_failed"], report["details"], report["passed"]
    g = mem["growth"]
    print(f"soak: {tally.ok} ok, {tally.cancelled} cancelled, {failed} failed, {tally.hung} hung, {report['throughput_rps']} req/s, p50 {report['latency_ms']['p50']} ms "
          f"p95 {report['latency_ms']['p95']} ms; memory {mem['baseline_mib']} -> {mem['final_mib']} MiB after warm-up "
          f"({'n/a' if g is None else f'{g * 100:+.2f}%'}, limit {GROWTH_LIMIT * 100:.0f}%): {'PASS' if passed else 'FAIL'}")
    if gpu is not None:
        gg = "n/a" if gpu["growth"] is None else f"{gpu['growth'] * 100:+.2f}%"
        print(f"  GPU memory ({samples[0]['gpu_scope']}, nvidia-smi): {gpu['baseline_mib']} -> {gpu['final_mib']} MiB ({gg})")
    if tally.errors:
        print("  first errors: " + " | ".join(tally.errors[:3]))
    if details.get("server_restarts"):
        print(f"  the launcher restarted the server {len(details['server_restarts'])}x: {details['server_restarts'][:3]}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--concurrency", type=int, default=4, help="client threads")
    p.add_argument("--warmup", type=float, default=None, help="seconds excluded from the growth (default 20%%, >= 10 s)")
    p.add_argument("--sample-every", type=float, default=2.0, help="seconds between memory samples")
    p.add_argument("--model-repository", type=Path, default=common.ROOT / "model_repository")
    p.add_argument("--hdf5", type=Path, help="serve this exported file")
    p.add_argument("--model", default="gpt2", help="served model to soak (gpt2, gpt2_int8)")
    p.add_argument("--url", help="gRPC url of a running server (then --pid says which process to watch)")
    p.add_argument("--pid", type=int, help="tritonserver pid (with --url)")
    p.add_argument("--server-threads", type=int, default=1,
                   help="OMP_NUM_THREADS of the served models; 0 = default")
    p.add_argument("--tokenizer")
    p.add_argument("--prompts", default=None, help="text file, one prompt a line (default data/train.txt)")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--max-new-tokens", default="8,16,32", help="cycled per request")
    p.add_argument("--cancel-fraction", type=float, default=0.0,
                   help="this share of requests streams from the twin and is cancelled after 2 tokens")
    p.add_argument("--cancel-mode", choices=("in-band", "abrupt"), default="in-band",
                   help="how a cancelling client stops: in-band (the client library's way: ask the model on the "
                        "stream, then half-close) or abrupt (cancel the gRPC call, as a client that dies does)")
    p.add_argument("--no-supervise", action="store_true",
                   help="no launcher supervision of the server it starts (by default restarted as `make serve` does)")
    p.add_argument("--tiny-shape", default="2,128,4,128", help="layers,hidden,heads,max_step of a random model")
    common.add_output_args(p, "soak")
    p.add_argument("--replot", type=Path, help="only re-make the PNG from a soak.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.replot:
        report = common.read_replot(a.replot, "soak")
        if a.out:
            a.out.mkdir(parents=True, exist_ok=True)
        plot(report, a.out / "soak.png" if a.out else a.replot.with_suffix(".png"))
        return 0
    faulthandler.register(__import__("signal").SIGUSR1, all_threads=True)  # kill -USR1: the clients' stacks
    if a.url and a.pid is None:
        raise SystemExit("soak: with --url, pass --pid of the tritonserver to watch its memory")
    out = common.results_dir("soak", a.out, None, a.record)
    lengths = [int(x) for x in a.max_new_tokens.split(",")]
    warmup = a.warmup if a.warmup is not None else max(10.0, a.minutes * 60 * 0.2)
    texts = common.load_prompts(a.prompts or common.default_prompt_source(), a.num_prompts)
    samples: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="lsgpt-soak-") as tmp:
        tally, elapsed, details, what = run_served(a, texts, lengths, samples, tmp, warmup)
    mem = growth(samples, warmup)
    gpu = growth(samples, warmup, "gpu_mib") if "gpu_mib" in (samples or [{}])[0] else None
    failed = tally.failed + (details["server_failed"] or 0)
    passed = (failed == 0 and tally.hung == 0 and tally.ok > 0 and not details.get("server_restarts")
              and mem["growth"] is not None and mem["growth"] < GROWTH_LIMIT
              and (gpu is None or (gpu["growth"] is not None and gpu["growth"] < GROWTH_LIMIT)))
    lat = sorted(x for _, x in tally.latencies)
    width = max(5.0, a.minutes * 60 / 30)
    report = {
        "task": "soak", "what": what, "device": common.device_slug(), "mode": "server",
        "concurrency": a.concurrency, "minutes": a.minutes, "warmup_s": warmup,
        "max_new_tokens": lengths, "requests_ok": tally.ok, "requests_failed": failed,
        "requests_cancelled": tally.cancelled, "requests_hung": tally.hung, "cancel_fraction": a.cancel_fraction,
        "throughput_rps": round(tally.ok / elapsed, 2) if elapsed else 0,
        "latency_ms": {f"p{q}": common.percentile(lat, q, scale=1000) for q in (50, 95, 99)},
        "memory": mem, "growth_limit": GROWTH_LIMIT, "passed": passed,
        "details": {**details, "elapsed_s": round(elapsed, 1), "client_ok": tally.ok, "client_failed": tally.failed,
                    "errors": tally.errors},
        "intervals": [{"t": round(t, 1), "requests": len(xs), "p50_ms": common.percentile(xs, 50, scale=1000),
                       "p95_ms": common.percentile(xs, 95, scale=1000)}
                      for t in (i * width for i in range(int(elapsed // width) + 1))
                      for xs in [sorted(x for s, x in tally.latencies if t <= s < t + width)]],
        "samples": samples, "command": common.command_line(argv),
    }
    if gpu is not None:
        report["gpu_memory"] = gpu | {"scope": samples[0]["gpu_scope"]}
    common.write_report(out, "soak", report, plot)
    say_result(report, tally, mem, gpu, samples)
    print(f"wrote {out / 'soak.json'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
