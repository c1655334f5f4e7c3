#!/usr/bin/env python3
"""Load-test the served GPT-2 models with Triton's perf_analyzer over gRPC: a concurrency sweep and a
request-rate mode, on real tokenized prompts; perf_analyzer's CSVs, a summary (JSON + table) and plots.

    python -m benchmarks.loadtest                              # model_repository, models gpt2 + gpt2_int8
    python -m benchmarks.loadtest --quick --out /tmp/lt        # seconds: CI / the main job
    python -m benchmarks.loadtest --url localhost:8001 --models gpt2 --concurrency 1,4,16
    python -m benchmarks.loadtest --hdf5 model/int8/pytorch_model.hdf5 --tokenizer data/tokenizer

What is served (see common.prepare): --url uses a running server as is; otherwise a real
tritonserver (lsgpt.serving.launcher.TritonServer, free ports) serves --hdf5 if given, else the repository when its
models are exported, else a fresh tiny random GPT-2 over the real 21128-entry vocabulary (the load test
then measures the serving path — gRPC, dynamic batching, the Python backend, the engine loop — not a
trained model's weights; the summary records which).

Requests: each prompt (lines of data/train.txt, or the built-in Chinese prompts incl. 我好难受) becomes
`[CLS] text` token ids (lsgpt.text.encode_prompt) plus fixed max_new_tokens and top_k=1 inputs in
perf_analyzer's --input-data JSON; greedy decoding makes each prompt's output length fixed, so generated
tokens/s = requests/s x the mean new tokens measured in the warm-up.
Failed requests: the server's own statistics (fail count) before and after every perf_analyzer run.

--llm: the LLM view of the same server, on the streaming twins (gpt2_stream, ...): a mixed load (prompts of
4..64 tokens, max_new_tokens spread over 16..256, seeded), perf_analyzer --streaming at each concurrency with
--profile-export-file, and our summary of its per-response timestamps: time to first token, inter-token
latency and request latency percentiles, output tokens/s (llm.json, llm.csv, llm.png). perf_analyzer cannot
cancel requests; cancellation is covered by tests/test_resilience.py and the scheduler tests.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks import common
from lsgpt.contract import STREAM_SUFFIX
from lsgpt.text import cached_tokenizer


@dataclass
class Point:
    """One perf_analyzer measurement (one concurrency or one request rate) of one model."""

    model: str
    mode: str  # "concurrency" | "request_rate"
    value: float  # concurrency, or offered requests/s
    throughput: float = 0.0  # inferences (= requests, batch 1) per second
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    avg_ms: float = 0.0
    tokens_per_s: float = 0.0
    ok: int = 0  # server-side successful requests during the run
    failed: int = 0  # server-side failed requests during the run
    returncode: int = 0
    error: str = ""
    csv: str = ""


@dataclass
class Settings:
    concurrency: list[int]
    request_rates: list[float] | None  # None: derived from the measured peak
    max_new_tokens: int
    interval_ms: int
    count_windows: int  # 0: time windows of interval_ms
    stability: float
    max_trials: int
    timeout_s: float
    extra: list[str] = field(default_factory=list)


def measure(pa: tuple[Path, dict], url: str, model: str, data: Path, out: Path, mode: str, value: float,
            s: Settings, new_tokens: float) -> Point:
    """One perf_analyzer run; its CSV's measurement row (latencies in µs) and the server's request counts."""
    tag = f"{model}_{mode}_{value:g}"
    csv_path = out / "csv" / f"{tag}.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    pt = Point(model, mode, value, csv=str(csv_path.relative_to(out)))
    cmd = [str(pa[0]), "-m", model, "-i", "grpc", "-u", url, "--input-data", str(data), "-f", str(csv_path),
           "--stability-percentage", str(s.stability), "--max-trials", str(s.max_trials)]
    cmd += (["--measurement-mode", "count_windows", "--measurement-request-count", str(s.count_windows)]
            if s.count_windows else ["--measurement-interval", str(s.interval_ms)])
    cmd += (["--concurrency-range", str(int(value))] if mode == "concurrency"
            else ["--request-rate-range", f"{value:g}", "--max-threads", "16"]) + s.extra
    ok0, fail0 = common.failure_counts(url, model)
    try:
        proc = subprocess.run(cmd, env=pa[1], capture_output=True, text=True, timeout=s.timeout_s)
        pt.returncode = proc.returncode
        (out / "csv" / f"{tag}.log").write_text(" ".join(cmd) + "\n\n" + proc.stdout + proc.stderr)
        if proc.returncode != 0:
            pt.error = " | ".join([ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()][-3:])
    except subprocess.TimeoutExpired:
        pt.returncode, pt.error = -1, f"perf_analyzer ran past {s.timeout_s:.0f}s"
    ok1, fail1 = common.failure_counts(url, model)
    if ok1 < ok0 or fail1 < fail0:  # the statistics restarted: the model was reloaded during the run
        pt.error = (pt.error + " | " if pt.error else "") + "server statistics went backwards: model reloaded?"
        ok0 = fail0 = 0
    pt.ok, pt.failed = ok1 - ok0, fail1 - fail0
    rows = list(csv.DictReader(open(csv_path, newline=""))) if csv_path.is_file() else []
    if rows:
        row = rows[-1]
        pt.throughput = float(row["Inferences/Second"])
        for q in (50, 90, 95, 99):
            setattr(pt, f"p{q}_ms", float(row[f"p{q} latency"]) / 1000)
        pt.avg_ms = float(row.get("Avg latency", 0) or 0) / 1000
        pt.tokens_per_s = pt.throughput * new_tokens
    elif not pt.error:
        pt.error = "perf_analyzer wrote no measurement"
    print(f"  {model:10s} {mode:12s} {value:6g}: {pt.throughput:8.2f} req/s  {pt.tokens_per_s:8.1f} tok/s  "
          f"p50 {pt.p50_ms:7.1f} ms  p95 {pt.p95_ms:7.1f} ms  p99 {pt.p99_ms:7.1f} ms  failed {pt.failed}"
          + (f"  ERROR {pt.error}" if pt.error else ""), flush=True)
    return pt


def warm_up(url: str, model: str, rows: list[list[int]], max_new_tokens: int, eos_id: int) -> float:
    """One request per prompt (loads lazy state, checks the model answers); the mean number of new tokens
    (a row is prompt + continuation, ended by EOS)."""
    import tritonclient.grpc as grpcclient

    new = []
    with grpcclient.InferenceServerClient(url) as c:
        for r in rows:
            cont = common.infer(c, model, r, max_new_tokens)[len(r):]
            new.append(cont.index(eos_id) + 1 if eos_id in cont else len(cont))
    return sum(new) / len(new)


def llm_data(rows: list[list[int]], lengths: tuple[int, int], new_tokens: tuple[int, int], max_step: int,
             n: int = 64, seed: int = 0) -> list[dict]:
    """The mixed load (common.llm_requests) as perf_analyzer --input-data entries, greedy."""
    return [{"token_ids": {"content": ids, "shape": [len(ids)]}, "max_new_tokens": [new], "top_k": [1]}
            for ids, new in common.llm_requests(rows, lengths, new_tokens, max_step, n, seed)]


def llm_summary(profile: Path) -> list[dict]:
    """perf_analyzer's profile export (one experiment per concurrency) -> TTFT, ITL, latency percentiles (ms)
    and output tokens/s. Each streamed request has one response per token and a last, empty one."""
    rows = []
    for e in json.loads(profile.read_text())["experiments"]:
        reqs = [r for r in e["requests"] if len(r.get("response_timestamps", [])) >= 2]
        ttft = [(r["response_timestamps"][0] - r["timestamp"]) / 1e6 for r in reqs]
        itl = [(b - a) / 1e6 for r in reqs for a, b in zip(r["response_timestamps"][:-2], r["response_timestamps"][1:-1])]
        lat = [(r["response_timestamps"][-1] - r["timestamp"]) / 1e6 for r in reqs]
        tokens = sum(len(r["response_timestamps"]) - 1 for r in reqs)
        span = (max(r["response_timestamps"][-1] for r in reqs) - min(r["timestamp"] for r in reqs)) / 1e9 if reqs else 0
        row = {"concurrency": e["experiment"]["value"], "requests": len(reqs), "output_tokens": tokens,
               "output_tokens_per_s": round(tokens / span, 1) if span else 0.0,
               "requests_per_s": round(len(reqs) / span, 2) if span else 0.0}
        for name, xs in (("ttft", ttft), ("itl", itl), ("latency", lat)):
            for q in (50, 95, 99):
                row[f"{name}_p{q}_ms"] = common.percentile(xs, q, digits=2) or 0.0
        rows.append(row)
    return rows


def llm_run(pa: tuple[Path, dict], url: str, model: str, data: Path, out: Path, s: Settings) -> list[dict]:
    """perf_analyzer --streaming at each concurrency, with a profile export each; our summary of them."""
    rows = []
    for c in s.concurrency:
        tag = out / f"{model}_c{c}"
        cmd = [str(pa[0]), "-m", model, "-i", "grpc", "-u", url, "--streaming", "--input-data", str(data),
               "--concurrency-range", str(c), "--profile-export-file", f"{tag}_profile.json",
               "--stability-percentage", str(s.stability), "--max-trials", str(s.max_trials), "-f", f"{tag}.csv"]
        cmd += (["--measurement-mode", "count_windows", "--measurement-request-count", str(s.count_windows)]
                if s.count_windows else ["--measurement-interval", str(s.interval_ms)])
        proc = subprocess.run(cmd + s.extra, env=pa[1], capture_output=True, text=True, timeout=s.timeout_s)
        Path(f"{tag}.log").write_text(" ".join(cmd) + "\n\n" + proc.stdout + proc.stderr)
        if proc.returncode != 0 or not Path(f"{tag}_profile.json").is_file():
            raise common.BenchError(f"perf_analyzer --streaming failed for {model} at concurrency {c}: "
                                    + " | ".join([ln for ln in (proc.stdout + proc.stderr).splitlines() if ln][-3:]))
        r = dict(model=model, **llm_summary(Path(f"{tag}_profile.json"))[-1])
        print(f"  {model:16s} c={c:<3} {r['output_tokens_per_s']:9.1f} tok/s  TTFT p50/p95 "
              f"{r['ttft_p50_ms']:.1f}/{r['ttft_p95_ms']:.1f} ms  ITL p50/p95 {r['itl_p50_ms']:.2f}/"
              f"{r['itl_p95_ms']:.2f} ms  latency p95 {r['latency_p95_ms']:.0f} ms", flush=True)
        rows.append(r)
    return rows


def llm_plot(rows: list[dict], out: Path, title: str) -> None:
    with common.figure(out / "llm.png", 1, 3, figsize=(14, 4)) as (fig, axes):
        if fig is None:
            return
        for m in dict.fromkeys(r["model"] for r in rows):
            mine = [r for r in rows if r["model"] == m]
            c = [r["concurrency"] for r in mine]
            axes[0].plot(c, [r["output_tokens_per_s"] for r in mine], "o-", label=m)
            for q, style in ((50, "o-"), (95, "s--")):
                axes[1].plot(c, [r[f"ttft_p{q}_ms"] for r in mine], style, label=f"{m} p{q}")
                axes[2].plot(c, [r[f"itl_p{q}_ms"] for r in mine], style, label=f"{m} p{q}")
        for ax, t, y in zip(axes, ("output tokens/s", "time to first token", "inter-token latency"),
                            ("tokens / s", "ms", "ms")):
            ax.set(title=t, xlabel="concurrency", ylabel=y)
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(title, fontsize=9)


def summarize(points: list[Point]) -> str:
    return "\n".join(["| model | mode | value | req/s | tokens/s | p50 ms | p95 ms | p99 ms | failed |",
                      "|---|---|---|---|---|---|---|---|---|"] + [
        f"| {p.model} | {p.mode} | {p.value:g} | {p.throughput:.2f} | {p.tokens_per_s:.1f} | {p.p50_ms:.1f} | "
        f"{p.p95_ms:.1f} | {p.p99_ms:.1f} | {p.failed}{' (error)' if p.error else ''} |" for p in points])


def plot(report: dict, out: Path) -> None:
    pts = [Point(**p) for p in report["points"] if not p["error"]]
    sub = (f"{report['device']} | {report['served']} | max_new_tokens {report['max_new_tokens']}, "
           f"{report['prompts']} prompts")
    for mode, lat, x in (("concurrency", ("p50", "p95", "p99"), "concurrency"),
                         ("request_rate", ("p50", "p95"), "offered requests / s")):
        ps = sorted((p for p in pts if p.mode == mode), key=lambda p: p.value)
        if not ps:
            continue
        with common.figure(out / f"loadtest_{mode}.png", 1, 2, figsize=(11, 4)) as (fig, (a1, a2)):
            if fig is None:
                return
            for m in dict.fromkeys(p.model for p in ps):
                mine = [p for p in ps if p.model == m]
                a1.plot([p.value for p in mine], [p.throughput for p in mine], "o-", label=m)
                for q, style in zip(lat, ("o-", "s--", "^:")):
                    a2.plot([p.value for p in mine], [getattr(p, f"{q}_ms") for p in mine], style, label=f"{m} {q}")
            if mode == "concurrency":
                a1.set(ylabel="requests / s", title="throughput vs concurrency")
                a2.set(title="latency percentiles")
                a1.set_xscale("log", base=2), a2.set_xscale("log", base=2)
            else:
                a1.plot([0, ps[-1].value], [0, ps[-1].value], color="gray", lw=0.8, label="offered = served")
                a1.set(ylabel="served requests / s", title="request-rate mode")
                a2.set(title="latency under offered load")
            for ax in (a1, a2):
                ax.set(xlabel=x)
                ax.grid(alpha=0.3)
                ax.legend(fontsize=8)
            a2.set(ylabel="latency (ms)")
            fig.suptitle(sub, fontsize=9)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", type=Path, default=common.ROOT / "model_repository")
    p.add_argument("--hdf5", type=Path, help="serve this exported file instead (fp -> gpt2, int8 -> gpt2_int8)")
    p.add_argument("--url", help="gRPC url of a running server (default: start one on free ports)")
    p.add_argument("--models", default=",".join(common.PORTABLE_MODELS), help="comma-separated (default gpt2,gpt2_int8)")
    p.add_argument("--tokenizer", help="folder with vocab.txt / a vocab.txt (default: data/tokenizer, the model's "
                                       "version folder, or the bundled Chinese BERT vocab)")
    p.add_argument("--prompts", default=None, help="text file, one prompt a line (default data/train.txt, else builtin)")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--prompt-chars", type=int, default=24, help="characters kept of each line")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--concurrency", default="1,2,4,8", help="comma-separated concurrency sweep ('' = none)")
    p.add_argument("--request-rates", default="auto",
                   help="comma-separated offered requests/s, 'auto' (0.5x, 1x, 1.5x the sweep's peak), or ''")
    p.add_argument("--measurement-interval", type=int, default=5000, help="ms per time window")
    p.add_argument("--count-windows", type=int, default=0,
                   help="use count_windows with this many requests per window instead of time windows")
    p.add_argument("--stability", type=float, default=50.0, help="perf_analyzer --stability-percentage")
    p.add_argument("--max-trials", type=int, default=10)
    p.add_argument("--quick", action="store_true",
                   help="seconds, for CI: 4 prompts, 8 new tokens, concurrency 1,2, one request rate, "
                        "count windows of 8 requests, any stability")
    p.add_argument("--server-threads", type=int, default=1,
                   help="OMP_NUM_THREADS of the served models (torch CPU threads; 0 = torch's default). One "
                        "thread per model instance leaves a core to perf_analyzer on these 2-core machines")
    p.add_argument("--tiny-shape", default="2,128,4,128", help="layers,hidden,heads,max_step of the random model")
    common.add_output_args(p, "loadtest")
    p.add_argument("--perf-arg", action="append", default=[], help="extra perf_analyzer argument (repeatable)")
    p.add_argument("--llm", action="store_true", help="LLM metrics on the streaming twins under a mixed load "
                   "(TTFT, inter-token latency, tokens/s); concurrency default 1,4,16,64 (--quick: 1,2)")
    p.add_argument("--llm-prompt-tokens", default="4,64", help="--llm: prompt length range (tokens)")
    p.add_argument("--llm-new-tokens", default="16,256", help="--llm: max_new_tokens range")
    p.add_argument("--aiperf", action="store_true", help="the LLM load test by NVIDIA's aiperf through our OpenAI API "
                   "instead (benchmarks/llm_aiperf.py: 10%% of requests cancelled; takes --models, --concurrency, "
                   "--llm-prompt-tokens, --llm-new-tokens, --hdf5, --tokenizer, --quick, --out)")
    a = p.parse_args(argv)
    if a.llm and a.concurrency == "1,2,4,8":
        a.concurrency = "1,2" if a.quick else "1,4,16,64"
    if a.quick:
        a.num_prompts, a.max_new_tokens = min(a.num_prompts, 4), min(a.max_new_tokens, 8)
        if a.concurrency == "1,2,4,8":
            a.concurrency = "1,2"
        a.count_windows = a.count_windows or 8
        a.stability, a.max_trials = 999.0, 4
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.aiperf:
        return aiperf_main(a)
    models = [m for m in a.models.split(",") if m]
    name = ("llm" if a.llm else "loadtest") + ("-quick" if a.quick else "")
    out: Path = a.out or common.results_dir(name, record=a.record)
    try:  # user mistakes first, before any work: one line each, exit 2
        pa = common.find_perf_analyzer()
        if a.prompts and a.prompts != "builtin":
            common.load_prompts(a.prompts, a.num_prompts, a.prompt_chars)
        if a.url:
            common.check_server(a.url)
    except common.BenchError as e:
        print(f"loadtest: error: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    s = Settings(
        concurrency=[int(x) for x in a.concurrency.split(",") if x],
        request_rates=None if a.request_rates == "auto" else [float(x) for x in a.request_rates.split(",") if x],
        max_new_tokens=a.max_new_tokens, interval_ms=a.measurement_interval, count_windows=a.count_windows,
        stability=a.stability, max_trials=a.max_trials, timeout_s=120 if a.quick else 900, extra=a.perf_arg,
    )
    if a.llm:  # the streaming twins serve the LLM view
        models = [m if m.endswith(STREAM_SUFFIX) else m + STREAM_SUFFIX for m in models]
    t0 = time.time()
    points: list[Point] = []
    new_tokens: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="lsgpt-loadtest-") as tmp:
        if a.url:
            repo, tok, served_desc, vocab = a.model_repository, common.find_tokenizer(a.tokenizer, a.model_repository, models[0]), \
                f"running server at {a.url}", None
        else:
            repo, tok, served_desc, vocab, models = common.prepare(a.model_repository, Path(tmp), hdf5=a.hdf5,
                                                            tokenizer=a.tokenizer, models=models, tiny_shape=a.tiny_shape)
        src = a.prompts or common.default_prompt_source()
        texts = common.load_prompts(src, a.num_prompts, a.prompt_chars)
        rows = common.encode_prompts(tok, texts, vocab)
        if a.llm:
            return llm_main(a, argv, s, pa, repo, tok, served_desc, models, rows, out)
        data = out / "input_data.json"  # perf_analyzer --input-data: one entry per prompt, shapes without the batch
        data.write_text(json.dumps({"data": [{"token_ids": {"content": r, "shape": [len(r)]}, "top_k": [1],
                                              "max_new_tokens": [s.max_new_tokens]} for r in rows]}, ensure_ascii=False))
        print(f"loadtest: {served_desc}\n  models {models}, {len(rows)} prompts from {src} "
              f"(e.g. {texts[0]!r} -> {rows[0]}), max_new_tokens {s.max_new_tokens}, tokenizer {tok}", flush=True)
        with common.served(repo, models, a.url, threads=a.server_threads or None) as (url, server):
            for m in models:
                new_tokens[m] = warm_up(url, m, rows, s.max_new_tokens, cached_tokenizer(tok).sep_token_id)
                for c in s.concurrency:
                    points.append(measure(pa, url, m, data, out, "concurrency", c, s, new_tokens[m]))
                rates = s.request_rates
                if rates is None:
                    peak = max((p.throughput for p in points if p.model == m and not p.error), default=0.0)
                    rates = sorted({round(peak * f, 1) for f in ((1.0,) if a.quick else (0.5, 1.0, 1.5))} - {0.0})
                for r in rates:
                    points.append(measure(pa, url, m, data, out, "request_rate", r, s, new_tokens[m]))
            if server is not None and server.log_path and server.log_path.is_file():
                shutil.copyfile(server.log_path, out / "server.log")
    report = {
        "task": "loadtest", "device": common.device_slug(), "served": served_desc, "models": models, "prompts": len(rows),
        "prompt_source": src, "tokenizer": tok, "max_new_tokens": s.max_new_tokens, "mean_new_tokens": new_tokens,
        "settings": asdict(s), "server_threads": a.server_threads or "torch default", "perf_analyzer": str(pa[0]),
        "seconds": round(time.time() - t0, 1), "failed_requests": sum(p.failed for p in points),
        "errors": [f"{p.model} {p.mode} {p.value:g}: {p.error}" for p in points if p.error],
        "points": [asdict(p) for p in points], "command": common.command_line(argv),
    }
    common.write_report(out, "loadtest", report, md=f"{report['device']} | {served_desc} | max_new_tokens "
                        f"{s.max_new_tokens}, {len(rows)} prompts\n\n{summarize(points)}")
    plot(report, out)
    print(f"wrote {out / 'loadtest.json'}, {out / 'loadtest.md'}, perf_analyzer CSVs in {out / 'csv'}")
    if report["failed_requests"] or report["errors"]:
        print(f"loadtest: {report['failed_requests']} failed requests, {len(report['errors'])} perf_analyzer errors",
              file=sys.stderr)
        return 1
    return 0


def llm_main(a, argv, s: Settings, pa, repo: Path, tok: str, served_desc: str, models: list[str],
             rows: list[list[int]], out: Path) -> int:
    from lsgpt.format import read_hdf5

    twins = [m if m.endswith(STREAM_SUFFIX) else m + STREAM_SUFFIX for m in models]
    version = common.latest_version(repo / models[0].removesuffix(STREAM_SUFFIX))
    max_step = read_hdf5(version / common.MODEL_FILE)[0].max_step if version else 128
    span = lambda txt: tuple(int(x) for x in txt.split(","))  # noqa: E731
    data = out / "llm_input_data.json"
    entries = llm_data(rows, span(a.llm_prompt_tokens), span(a.llm_new_tokens), max_step, n=16 if a.quick else 64)
    data.write_text(json.dumps({"data": entries}))
    print(f"loadtest --llm: {served_desc}\n  models {twins}, {len(entries)} mixed requests (prompts "
          f"{a.llm_prompt_tokens} tokens, max_new_tokens {a.llm_new_tokens}, max_step {max_step})", flush=True)
    results: list[dict] = []
    with common.served(repo, twins, a.url, threads=a.server_threads or None) as (url, _):
        for m in twins:
            results += llm_run(pa, url, m, data, out, s)
    keys = list(results[0]) if results else []
    with open(out / "llm.csv", "w", newline="") as f:
        w = csv.DictWriter(f, keys)
        w.writeheader()
        w.writerows(results)
    report = {"task": "loadtest-llm", "device": common.device_slug(), "served": served_desc, "models": twins,
              "max_step": max_step, "requests": entries, "points": results, "command": common.command_line(argv)}
    common.write_json(out / "llm.json", report)
    llm_plot(results, out, f"{report['device']} | {served_desc}")
    print(f"wrote {out / 'llm.json'}, {out / 'llm.csv'}")
    return 0


def aiperf_main(a: argparse.Namespace) -> int:
    """--aiperf: the same served models under aiperf (benchmarks/llm_aiperf.py), with the options they share."""
    from benchmarks import llm_aiperf

    args = ["--models", a.models, "--prompt-tokens", a.llm_prompt_tokens, "--new-tokens", a.llm_new_tokens,
            "--model-repository", str(a.model_repository)]
    if a.concurrency != "1,2,4,8":  # loadtest's own default; aiperf's is 1,4,16,64
        args += ["--concurrency", a.concurrency]
    for flag, value in (("--hdf5", a.hdf5), ("--tokenizer", a.tokenizer), ("--out", a.out)):
        if value is not None:
            args += [flag, str(value)]
    if a.url:
        print("loadtest: --aiperf talks to the OpenAI API: use python -m benchmarks.llm_aiperf --openai-url for a "
              "running `make openai`", file=sys.stderr)
        return 2
    return llm_aiperf.main(args + (["--quick"] if a.quick else []) + (["--record"] if a.record else []),
                           command=common.command_line(None))


if __name__ == "__main__":
    sys.exit(main())
