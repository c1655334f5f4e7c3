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
--faults publish,broken,kill-model,sigterm --fault-every S --seed N (issue 28): meanwhile, one fault at a time at
seeded random times into our supervised server (polling the repository every 2 s): a good publish, a broken
version (model.hdf5 cut in half) then a good one, kill -9 of a model's stub, the launcher's SIGTERM path (drain,
stop) and a start on the same ports. A failed request is refused cleanly when it overlaps a fault's window (until
every model answers again, + 2 s) with a server status (during a publish only UNAVAILABLE / NOT_FOUND); one in
flight at a kill that only the client's deadline ended is counted apart; anything else (a wrong result, an error
outside the windows) is lost. Pass: 0 lost, 0 hung, the server serves at the end (no memory limit: restarts).
Writes results/.../soak-faults/soak.{json,md,png}.
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
from lsgpt.serving.launcher import latest_version

GROWTH_LIMIT = 0.05
HANG_S = 180.0  # a request unanswered this long is hung: every request has a 120 s deadline of its own
FAULT_KINDS = ("publish", "broken", "kill-model", "sigterm")
# --faults: a failure inside a fault's window is refused cleanly if the server answered it with a status (not a
# client deadline); during a publish (the old version serves on) only UNAVAILABLE or NOT_FOUND count as clean
CLEAN_ONLY = {"publish": ("UNAVAILABLE", "NOT_FOUND"), "broken": ("UNAVAILABLE", "NOT_FOUND")}
MARGIN_S = 2.0  # a window ends this long after every model answered again (clients reconnecting)
# gRPC's reconnect backoff grows to 120 s by default: a client would stay away long after a restart
CHANNEL_ARGS = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 1000),
                ("grpc.use_local_subchannel_pool", 1)]


class Tally:
    """Request outcomes, shared by the client threads: (time since start, latency) per success, errors; with
    --faults also each failure's (start, end, gRPC status, error) and each model's answer times."""

    def __init__(self):
        self.ok, self.failed, self.errors, self.latencies, self.lock = 0, 0, [], [], threading.Lock()
        self.cancelled = 0
        self.hung = 0  # requests still unanswered HANG_S after they were sent (each counted once)
        self.inflight: dict[int, float] = {}  # client thread -> when its request in flight was sent
        self.failures: list[tuple[float, float, str | None, str]] = []
        self.answered: dict[str, list[float]] = {}  # model -> when its successful answers came (s since start)

    def record(self, t: float, latency: float, error: str | None = None, status: str | None = None,
               model: str = "", cancelled: bool = False) -> None:
        with self.lock:
            if error is None:
                self.answered.setdefault(model, []).append(t + latency)
                if cancelled:
                    self.cancelled += 1
                    return
                self.ok += 1
                self.latencies.append((t, latency))
            else:
                self.failed += 1
                self.errors = (self.errors + [error])[:20]
                self.failures.append((round(t, 2), round(t + latency, 2), status, error[:300]))


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
         model: str = "", pid: Any = None, faults: Faults | None = None) -> tuple[Tally, float]:
    """Run the load for a.minutes: client threads against `url` (and `faults` injected meanwhile)."""
    tally, stop, t0 = Tally(), threading.Event(), time.monotonic()
    injector = threading.Thread(target=faults.run if faults else (lambda: None), daemon=True)
    if faults:
        faults.t0, faults.end = t0, t0 + faults.minutes * 60
        injector.start()
    threading.Thread(target=sample_memory, args=(pid, stop, a.sample_every, t0, samples), daemon=True).start()

    def client(offset: int) -> None:
        import tritonclient.grpc as grpcclient

        rnd = random.Random(offset)
        with grpcclient.InferenceServerClient(url, channel_args=CHANNEL_ARGS if a.faults else None) as c:
            i = offset
            while not stop.is_set():
                r, n, i, start = rows[i % len(rows)], lengths[i % len(lengths)], i + 1, time.monotonic()
                tally.inflight[offset] = start
                twin = rnd.random() < a.cancel_fraction
                try:
                    if twin:
                        cancel_one(url, model, r, n, a.cancel_mode)
                    elif (got := common.infer(c, model, r, n, timeout=120))[:len(r)] != r or len(got) <= len(r):
                        raise RuntimeError(f"wrong result: {len(got)} ids, the prompt's {len(r)} not first")
                    tally.record(start - t0, time.monotonic() - start, model=model + STREAM_SUFFIX * twin,
                                 cancelled=twin)
                except Exception as e:  # noqa: BLE001 - every failure counts, whatever its kind
                    status = e.status() if hasattr(e, "status") and callable(e.status) else None
                    tally.record(start - t0, time.monotonic() - start, f"{'cancelled stream: ' * twin}"
                                 f"{type(e).__name__}: {e}", status)
                    stop.wait(0.2)  # as a client would: no tight loop of refusals while a server restarts
            tally.inflight.pop(offset, None)

    workers = [threading.Thread(target=client, args=(k * 7,), daemon=True) for k in range(a.concurrency)]
    for w in workers:
        w.start()
    watch(a, tally, stop, t0, workers)
    if faults:  # the fault under way ends first
        faults.done.set()
        injector.join(900)
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


class Faults:
    """--faults: one fault at a time at seeded random times (fault_every x 0.5..1.5 apart, the kinds in shuffled
    rounds) into our server under the launcher's supervision. A fault's window runs from its injection until every
    served model answers a probe again; `log` has one entry per fault."""

    def __init__(self, a: argparse.Namespace, server, models: list[str], src: Path, t0: float):
        self.kinds, self.every, self.rnd = a.faults, a.fault_every, random.Random(a.seed)
        self.minutes, self.end = a.minutes, 0.0
        self.server, self.models, self.src, self.t0 = server, models, src, t0
        self.log: list[dict] = []
        self.done, self.sup = threading.Event(), None

    def supervise(self, on: bool) -> None:
        """The launcher's supervise() in a thread (as `make serve` runs it), or stopped for our own restart."""
        if on:
            stop = threading.Event()
            self.sup = (threading.Thread(target=self.server.supervise, kwargs=dict(stop=stop), daemon=True), stop)
            self.sup[0].start()
        elif self.sup is not None:
            self.sup[1].set()
            self.sup[0].join(700)
            self.sup = None

    def run(self) -> None:
        order: list[str] = []
        while not self.done.wait(self.rnd.uniform(0.5, 1.5) * self.every) and time.monotonic() < self.end:
            order = order or self.rnd.sample(self.kinds, len(self.kinds))
            kind, t = order.pop(0), time.monotonic()
            ev = {"kind": kind, "t0": round(t - self.t0, 2)}
            self.log.append(ev)
            try:
                ev["detail"] = getattr(self, kind.replace("-", "_"))()
                ev["recovered"] = all(self.probe(m) for m in self.models)
            except Exception as e:  # noqa: BLE001 - reported; the run fails
                ev["error"] = f"{type(e).__name__}: {e}"[:500]
            ev["t1"], ev["outage_s"] = round(time.monotonic() - self.t0, 2), round(time.monotonic() - t, 2)
            print(f"  fault {kind} at {ev['t0']:.0f} s: {ev.get('detail', ev.get('error'))}; every model answered "
                  f"again after {ev['outage_s']:.1f} s", flush=True)

    def probe(self, model: str, timeout: float = 300.0) -> bool:
        import tritonclient.grpc as grpcclient

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with grpcclient.InferenceServerClient(self.server.grpc_url, channel_args=CHANNEL_ARGS) as c:
                    if model.endswith(STREAM_SUFFIX):
                        cancel_one(self.server.grpc_url, model[:-len(STREAM_SUFFIX)], [2, 5, 6], 2, "in-band")
                    else:
                        common.infer(c, model, [2, 5, 6], 2, timeout=20)
                return True
            except Exception:  # noqa: BLE001 - not back yet
                time.sleep(0.2)
        return False

    def wait(self, cond, timeout: float = 300.0) -> bool:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        return True

    def publish(self) -> str:
        """A new good version of the same file (and of the streaming twin); live once Triton calls it ready."""
        from lsgpt.repository import publish

        got = publish(self.src, self.server.repo, self.models[0], tokenizer=self.src.with_name("vocab.txt"),
                      lightseq=False).versions
        live = self.wait(lambda: all(self.server.is_model_ready(m, got[m].name) for m in self.models if m in got))
        return f"version {got[self.models[0]].name} published, {'live' if live else 'NOT live after 300 s'}"

    def broken(self) -> str:
        """A version folder whose model.hdf5 is cut in half (renamed into place as publish does), then a good one."""
        from lsgpt.repository import versions

        d = self.server.repo / self.models[0]
        new, staging = d / str(max(versions(d)) + 1), d / ".staging-broken"
        shutil.copytree(d / str(max(versions(d))), staging)
        os.truncate(staging / "model.hdf5", (staging / "model.hdf5").stat().st_size // 2)
        os.rename(staging, new)
        seen = self.wait(lambda: str(new) in self.server.broken, 30 + 3 * self.server.poll_secs)
        return f"broken version {new.name} {'reported' if seen else 'NOT reported'}; then {self.publish()}"

    def kill_model(self) -> str:
        """kill -9 of one model instance's stub; the supervisor reloads that model."""
        name, pid = self.rnd.choice(sorted(self.server.stub_processes().items()))
        os.kill(pid, 9)
        back = self.wait(lambda: self.server.stub_processes().get(name) not in (None, pid))
        return f"killed {name} (pid {pid}); {'a new stub' if back else 'NO new stub after 300 s'}"

    def sigterm(self) -> str:
        """What the launcher does on SIGTERM (drain, stop), then a start on the same ports, as a supervisor
        (systemd, k8s) would."""
        self.supervise(False)
        drained = self.server.drain()
        self.server.stop(timeout=5 if drained else 30)
        self.server.start()
        self.server.wait_ready(600)
        self.supervise(True)
        return f"{'drained' if drained else 'NOT drained'}, stopped, started again"


def classify(failures: list, log: list[dict], kinds: list[str]) -> dict:
    """Each failure: refused cleanly (counted against the fault whose window it overlaps), timed out while in
    flight at a kill or stop (Triton 2.51 never answers a request whose model process died: only the client's
    deadline ends it; counted apart, per kind), or lost."""
    refused, timed_out, lost = {k: 0 for k in kinds}, {k: 0 for k in kinds}, []
    for start, end, status, error in failures:
        code = (status or "").rsplit(".", 1)[-1]
        near = [f["kind"] for f in log if start <= f.get("t1", 1e9) + MARGIN_S and end >= f["t0"]]
        if code == "DEADLINE_EXCEEDED" and (hit := [k for k in near if k in ("kill-model", "sigterm")]):
            timed_out[hit[0]] += 1
        elif code and code != "DEADLINE_EXCEEDED" and (hit := [k for k in near if code in CLEAN_ONLY.get(k, (code,))]):
            refused[hit[0]] += 1
        else:
            lost.append({"start": start, "end": end, "status": status, "error": error})
    return {"refused": refused, "timed_out": timed_out, "lost": len(lost), "lost_requests": lost[:20]}

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
        colors = dict(zip(FAULT_KINDS, ("tab:green", "tab:orange", "tab:red", "tab:purple")))
        for ev in report["details"].get("faults", {}).get("events", []):
            a2.axvspan(ev["t0"], ev.get("t1", ev["t0"]), color=colors[ev["kind"]], alpha=0.3, lw=0)
            a2.text(ev["t0"], 0, ev["kind"], fontsize=6, rotation=90, va="bottom")
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
    with common.served(repo, served_models, a.url, threads=a.server_threads or None,
                       poll_secs=2 if a.faults else 3600) as (url, server):
        stop_sup, faults = threading.Event(), None
        if a.faults:  # the file to publish again: the served version's (a prune may remove that folder)
            src = Path(tmp) / "faults" / "model.hdf5"
            shutil.copytree(latest_version(server.repo / model), src.parent)
            faults = Faults(a, server, served_models, src, 0.0)
            faults.supervise(True)
        elif server is not None and not a.no_supervise:  # as `make serve` runs it: restarted if it fails
            threading.Thread(target=server.supervise, kwargs=dict(stop=stop_sup), daemon=True).start()
        ok0, fail0 = common.failure_counts(url, model)
        tally, elapsed = soak(a, rows, lengths, samples, url=url, model=model,
                              pid=a.pid if a.url else lambda: server.proc and server.proc.pid, faults=faults)
        stop_sup.set()
        restarts = [] if server is None else [why for _, why in server.restarts]
        if faults:
            faults.supervise(False)
            at_end = all(faults.probe(m, 120) for m in served_models)
        ok1, fail1 = (0, 0) if restarts or faults else common.failure_counts(url, model)  # a restart zeroes them
        log = server.log_path.read_text(errors="replace") if server and server.log_path else None
    details = {"model": model, "url": url, "server_ok": None if restarts or faults else ok1 - ok0,
               "server_failed": 0 if restarts or faults else fail1 - fail0, "server_restarts": restarts,
               "cancel_mode": a.cancel_mode,
               "model_loads_in_log": None if log is None else log.count(f"loading: {model}:")}
    if faults:
        details["faults"] = fault_report(a, faults, tally, at_end, [why for _, why in server.reloads])
    return tally, elapsed, details, what


def fault_report(a: argparse.Namespace, faults: Faults, tally: Tally, at_end: bool, reloads: list[str]) -> dict:
    """Per fault kind: faults, requests refused cleanly, the longest recovery; lost requests; per model the longest
    time without an answer (between two successful answers, as the clients saw it)."""
    got = classify(tally.failures, faults.log, a.faults)
    gaps = {m: round(max((y - x for x, y in zip(ts, ts[1:])), default=0.0), 2)
            for m, ts in ((m, sorted(ts)) for m, ts in tally.answered.items())}
    per = {k: {"faults": sum(f["kind"] == k for f in faults.log), "refused": got["refused"][k],
               "timed_out_in_flight": got["timed_out"][k],
               "longest_recovery_s": max((f["outage_s"] for f in faults.log if f["kind"] == k), default=None)}
           for k in a.faults}
    ok = all(f.get("recovered") and "error" not in f for f in faults.log)
    return {"kinds": a.faults, "every_s": a.fault_every, "seed": a.seed, "margin_s": MARGIN_S, "per_kind": per,
            "refused": sum(got["refused"].values()), "timed_out": sum(got["timed_out"].values()), "lost": got["lost"], "lost_requests": got["lost_requests"],
            "longest_outage_s": gaps, "all_recovered": ok, "serves_at_end": at_end, "supervisor_reloads": reloads,
            "events": faults.log}


def fault_md(r: dict) -> str:
    f = r["details"]["faults"]
    rows = [f"| {k} | {v['faults']} | {v['refused']} | {v['timed_out_in_flight']} | {v['longest_recovery_s']} |"
            for k, v in f["per_kind"].items()]
    return "\n".join([
        f"# Fault-injection soak: {r['details']['model']} on {r['device']}, {r['minutes']:g} min, concurrency "
        f"{r['concurrency']}", "", f"`{r['command']}`", "",
        f"**{r['requests_ok']} ok, {f['refused']} refused cleanly, {f['timed_out']} in flight at a kill and ended by "
        f"the client's 120 s deadline, {f['lost']} lost, {r['requests_hung']} hung**; "
        f"serves at the end: {f['serves_at_end']}; {'PASS' if r['passed'] else 'FAIL'}", "",
        "| fault | injected | refused cleanly | in flight, timed out | longest recovery (s) |", "| --- " * 5 + "|",
        *rows, "",
        "Longest time without an answer, per model (s): "
        + ", ".join(f"{m} {g}" for m, g in f["longest_outage_s"].items()),
        *(["", "Lost requests (first 20):", *(f"- {x}" for x in f["lost_requests"])] if f["lost"] else [])])


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
    if "faults" in details:
        f = details["faults"]
        print(f"  faults {f['per_kind']}: {f['refused']} refused cleanly, {f['timed_out']} timed out in flight at a kill, {f['lost']} lost, longest time without an "
              f"answer {f['longest_outage_s']} s, serves at the end: {f['serves_at_end']}")
        for x in f["lost_requests"][:5]:
            print(f"  lost: {x}")
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
    p.add_argument("--faults", type=common.sections_type(FAULT_KINDS), default=[],
                   help=f"inject these faults (comma-separated: {','.join(FAULT_KINDS)}) into our supervised server; "
                        "pass = no lost request (see Faults, classify)")
    p.add_argument("--fault-every", type=float, default=60.0, help="mean seconds between two faults")
    p.add_argument("--seed", type=int, default=0, help="of the fault times and choices")
    p.add_argument("--tiny-shape", default="2,128,4,128", help="layers,hidden,heads,max_step of a random model")
    common.add_output_args(p, "soak", replot="the PNG")
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
    if a.faults and (a.url or a.no_supervise):
        raise SystemExit("soak: --faults needs our own server under supervision (no --url, no --no-supervise)")
    out = common.results_dir("soak-faults" if a.faults else "soak", a.out, None, a.record)
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
    if a.faults:  # restarts reset the memory: no growth limit; failures inside fault windows are refusals
        f = details["faults"]
        passed = f["lost"] == 0 and tally.hung == 0 and tally.ok > 0 and f["serves_at_end"] and f["all_recovered"]
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
    common.write_report(out, "soak", report, plot, md=fault_md(report) if a.faults else None)
    say_result(report, tally, mem, gpu, samples)
    print(f"wrote {out / 'soak.json'}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
