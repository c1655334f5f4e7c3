#!/usr/bin/env python3
"""Load-test the served GPT-2 models with Triton's perf_analyzer over gRPC: a concurrency sweep and a
request-rate mode, on real tokenized prompts; perf_analyzer's CSVs, a summary (JSON + table) and plots.

    python benchmarks/loadtest.py                              # model_repository, models gpt2 + gpt2_int8
    python benchmarks/loadtest.py --quick --out /tmp/lt        # seconds: CI / the main job
    python benchmarks/loadtest.py --url localhost:8001 --models gpt2 --concurrency 1,4,16
    python benchmarks/loadtest.py --hdf5 model/int8/model.hdf5 --tokenizer model/int8

What is served (see common.prepare_repository): --url uses a running server as is; otherwise a real
tritonserver (lsgpt.launcher.TritonServer, free ports) serves --hdf5 if given, else the repository when its
models are exported, else a fresh tiny random GPT-2 over the real 21128-entry vocabulary (the load test
then measures the serving path — gRPC, dynamic batching, the Python backend, the engine loop — not a
trained model's weights; the summary records which).

Requests: each prompt (lines of data/train.txt, or the built-in Chinese prompts incl. 我好难受) becomes
`[CLS] text` token ids (lsgpt.text.encode_prompt) plus fixed max_new_tokens and top_k=1 inputs in
perf_analyzer's --input-data JSON; greedy decoding makes each prompt's output length fixed, so generated
tokens/s = requests/s x the mean new tokens measured in the warm-up.
Failed requests: the server's own statistics (fail count) before and after every perf_analyzer run.
The machines here are shared 2-core boxes: numbers are noisy; the stability rule is relaxed on purpose.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lsgpt.text import cached_tokenizer  # noqa: E402

from common import (  # noqa: E402
    PORTABLE_MODELS,
    ROOT,
    BenchError,
    PerfAnalyzer,
    check_server,
    default_prompt_source,
    device_slug,
    encode_prompts,
    failure_counts,
    find_perf_analyzer,
    find_tokenizer,
    load_prompts,
    prepare_repository,
    pyplot,
    served,
    temp_workdir,
)


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


# ---------------------------------------------------------------------------------------------
# perf_analyzer


def input_data(rows: list[list[int]], max_new_tokens: int) -> dict:
    """perf_analyzer --input-data JSON: one entry per prompt (shapes without the batch dimension)."""
    return {
        "data": [
            {
                "token_ids": {"content": r, "shape": [len(r)]},
                "max_new_tokens": [max_new_tokens],
                "top_k": [1],
            }
            for r in rows
        ]
    }


def perf_command(pa: PerfAnalyzer, url: str, model: str, data: Path, csv_path: Path, mode: str, value: float,
                 s: Settings) -> list[str]:
    cmd = [str(pa.binary), "-m", model, "-i", "grpc", "-u", url, "--input-data", str(data), "-f", str(csv_path),
           "--stability-percentage", str(s.stability), "--max-trials", str(s.max_trials)]
    if s.count_windows:
        cmd += ["--measurement-mode", "count_windows", "--measurement-request-count", str(s.count_windows)]
    else:
        cmd += ["--measurement-interval", str(s.interval_ms)]
    if mode == "concurrency":
        cmd += ["--concurrency-range", str(int(value))]
    else:
        cmd += ["--request-rate-range", f"{value:g}", "--max-threads", "16"]
    return cmd + s.extra


def read_csv(path: Path) -> dict[str, str]:
    """The measurement row of perf_analyzer's -f CSV (latencies in microseconds)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise BenchError(f"{path}: perf_analyzer wrote no measurement row")
    return rows[-1]


def measure(pa: PerfAnalyzer, url: str, model: str, data: Path, out: Path, mode: str, value: float, s: Settings,
            new_tokens: float) -> Point:
    tag = f"{model}_{mode}_{value:g}"
    csv_path = out / "csv" / f"{tag}.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    pt = Point(model, mode, value, csv=str(csv_path.relative_to(out)))
    ok0, fail0 = failure_counts(url, model)
    cmd = perf_command(pa, url, model, data, csv_path, mode, value, s)
    try:
        proc = subprocess.run(cmd, env=pa.env, capture_output=True, text=True, timeout=s.timeout_s)
        pt.returncode = proc.returncode
        (out / "csv" / f"{tag}.log").write_text(" ".join(cmd) + "\n\n" + proc.stdout + proc.stderr)
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
            pt.error = " | ".join(lines[-3:])
    except subprocess.TimeoutExpired:
        pt.returncode, pt.error = -1, f"perf_analyzer ran past {s.timeout_s:.0f}s"
    ok1, fail1 = failure_counts(url, model)
    if ok1 < ok0 or fail1 < fail0:  # the statistics restarted: the model was reloaded during the run
        pt.error = (pt.error + " | " if pt.error else "") + "server statistics went backwards: model reloaded?"
        ok0 = fail0 = 0
    pt.ok, pt.failed = ok1 - ok0, fail1 - fail0
    if csv_path.is_file():
        row = read_csv(csv_path)
        pt.throughput = float(row["Inferences/Second"])
        for p in (50, 90, 95, 99):
            setattr(pt, f"p{p}_ms", float(row[f"p{p} latency"]) / 1000)
        pt.avg_ms = float(row.get("Avg latency", 0) or 0) / 1000
        pt.tokens_per_s = pt.throughput * new_tokens
    elif not pt.error:
        pt.error = "perf_analyzer wrote no CSV"
    print(f"  {model:10s} {mode:12s} {value:6g}: {pt.throughput:8.2f} req/s  {pt.tokens_per_s:8.1f} tok/s  "
          f"p50 {pt.p50_ms:7.1f} ms  p95 {pt.p95_ms:7.1f} ms  p99 {pt.p99_ms:7.1f} ms  failed {pt.failed}"
          + (f"  ERROR {pt.error}" if pt.error else ""), flush=True)
    return pt


def warm_up(url: str, model: str, rows: list[list[int]], max_new_tokens: int, eos_id: int) -> float:
    """One request per prompt (loads lazy state, checks the model answers); the mean number of new tokens."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    new = []
    with contextlib.closing(grpcclient.InferenceServerClient(url)) as c:
        for r in rows:
            inputs = []
            for name, arr, dt in (("token_ids", np.array([r], np.int32), "INT32"),
                                  ("max_new_tokens", np.array([[max_new_tokens]], np.int32), "INT32"),
                                  ("top_k", np.array([[1]], np.int32), "INT32")):
                t = grpcclient.InferInput(name, list(arr.shape), dt)
                t.set_data_from_numpy(arr)
                inputs.append(t)
            res = c.infer(model, inputs, outputs=[grpcclient.InferRequestedOutput("result")])
            out = res.as_numpy("result")[0]
            new.append(_new_tokens(out.tolist(), len(r), eos_id))
    return statistics.mean(new)


def _new_tokens(result: list[int], prompt_len: int, eos_id: int) -> int:
    """Generated tokens in a result row (prompt + continuation; rows of a batch are padded with EOS)."""
    cont = result[prompt_len:]
    return cont.index(eos_id) + 1 if eos_id in cont else len(cont)


# ---------------------------------------------------------------------------------------------
# Report


def summarize(points: list[Point]) -> str:
    head = "| model | mode | value | req/s | tokens/s | p50 ms | p95 ms | p99 ms | failed |\n|---|---|---|---|---|---|---|---|---|"
    lines = [head]
    for p in points:
        lines.append(f"| {p.model} | {p.mode} | {p.value:g} | {p.throughput:.2f} | {p.tokens_per_s:.1f} | "
                     f"{p.p50_ms:.1f} | {p.p95_ms:.1f} | {p.p99_ms:.1f} | {p.failed}{' (error)' if p.error else ''} |")
    return "\n".join(lines)


def plot(report: dict, out: Path) -> list[Path]:
    plt = pyplot()
    if plt is None:
        print("matplotlib not installed: no PNG (pip install matplotlib)")
        return []
    pts = [Point(**p) for p in report["points"]]
    models = list(dict.fromkeys(p.model for p in pts))
    made = []
    conc = [p for p in pts if p.mode == "concurrency" and not p.error]
    if conc:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        for m in models:
            ps = sorted((p for p in conc if p.model == m), key=lambda p: p.value)
            xs = [p.value for p in ps]
            a1.plot(xs, [p.throughput for p in ps], "o-", label=m)
            for pct, style in (("p50", "o-"), ("p95", "s--"), ("p99", "^:")):
                a2.plot(xs, [getattr(p, f"{pct}_ms") for p in ps], style, label=f"{m} {pct}")
        a1.set(xlabel="concurrency", ylabel="requests / s", title="throughput vs concurrency")
        a2.set(xlabel="concurrency", ylabel="latency (ms)", title="latency percentiles")
        for a in (a1, a2):
            a.set_xscale("log", base=2)
            a.grid(alpha=0.3)
            a.legend(fontsize=8)
        fig.suptitle(_subtitle(report), fontsize=9)
        fig.tight_layout()
        made.append(out / "loadtest_concurrency.png")
        fig.savefig(made[-1], dpi=110)
        plt.close(fig)
    rate = [p for p in pts if p.mode == "request_rate" and not p.error]
    if rate:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        for m in models:
            ps = sorted((p for p in rate if p.model == m), key=lambda p: p.value)
            xs = [p.value for p in ps]
            a1.plot(xs, [p.throughput for p in ps], "o-", label=m)
            a2.plot(xs, [p.p50_ms for p in ps], "o-", label=f"{m} p50")
            a2.plot(xs, [p.p95_ms for p in ps], "s--", label=f"{m} p95")
        lim = max(p.value for p in rate)
        a1.plot([0, lim], [0, lim], color="gray", lw=0.8, label="offered = served")
        a1.set(xlabel="offered requests / s", ylabel="served requests / s", title="request-rate mode")
        a2.set(xlabel="offered requests / s", ylabel="latency (ms)", title="latency under offered load")
        for a in (a1, a2):
            a.grid(alpha=0.3)
            a.legend(fontsize=8)
        fig.suptitle(_subtitle(report), fontsize=9)
        fig.tight_layout()
        made.append(out / "loadtest_request_rate.png")
        fig.savefig(made[-1], dpi=110)
        plt.close(fig)
    return made


def _subtitle(report: dict) -> str:
    return (f"{report['device']} | {report['served']} | max_new_tokens {report['max_new_tokens']}, "
            f"{report['prompts']} prompts")


# ---------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", type=Path, default=ROOT / "model_repository")
    p.add_argument("--hdf5", type=Path, help="serve this exported file instead (fp -> gpt2, int8 -> gpt2_int8)")
    p.add_argument("--url", help="gRPC url of a running server (default: start one on free ports)")
    p.add_argument("--models", default=",".join(PORTABLE_MODELS), help="comma-separated (default gpt2,gpt2_int8)")
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
    p.add_argument("--out", type=Path, default=None, help="output folder (default results/<device>/loadtest, or loadtest-quick with --quick)")
    p.add_argument("--perf-arg", action="append", default=[], help="extra perf_analyzer argument (repeatable)")
    a = p.parse_args(argv)
    if a.quick:
        a.num_prompts, a.max_new_tokens = min(a.num_prompts, 4), min(a.max_new_tokens, 8)
        if a.concurrency == "1,2,4,8":
            a.concurrency = "1,2"
        a.count_windows = a.count_windows or 8
        a.stability, a.max_trials = 999.0, 4
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    models = [m for m in a.models.split(",") if m]
    out: Path = a.out or ROOT / "results" / device_slug() / ("loadtest-quick" if a.quick else "loadtest")
    try:  # user mistakes first, before any work: one line each, exit 2
        pa = find_perf_analyzer()
        if a.prompts and a.prompts != "builtin":
            load_prompts(a.prompts, a.num_prompts, a.prompt_chars)
        if a.url:
            check_server(a.url)
    except BenchError as e:
        print(f"loadtest: error: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    s = Settings(
        concurrency=[int(x) for x in a.concurrency.split(",") if x],
        request_rates=None if a.request_rates == "auto" else [float(x) for x in a.request_rates.split(",") if x],
        max_new_tokens=a.max_new_tokens, interval_ms=a.measurement_interval, count_windows=a.count_windows,
        stability=a.stability, max_trials=a.max_trials, timeout_s=120 if a.quick else 900, extra=a.perf_arg,
    )
    layers, hidden, heads, max_step = (int(x) for x in a.tiny_shape.split(","))
    t0 = time.time()
    with temp_workdir("lsgpt-loadtest-") as tmp:
        work = Path(tmp)
        if a.url:
            tok = find_tokenizer(a.tokenizer, a.model_repository, models[0])
            served_desc, vocab = f"running server at {a.url}", None
            repo = a.model_repository
        else:
            prep = prepare_repository(a.model_repository, work, hdf5=a.hdf5, tokenizer=a.tokenizer, models=models,
                                      layers=layers, hidden=hidden, heads=heads, max_step=max_step)
            tok, served_desc, vocab, repo, models = prep.tokenizer, prep.source, prep.vocab, prep.repository, prep.models
        src = a.prompts or default_prompt_source()
        texts = load_prompts(src, a.num_prompts, a.prompt_chars)
        rows = encode_prompts(tok, texts, vocab)
        eos_id = cached_tokenizer(tok).sep_token_id  # [SEP] ends a paragraph (lsgpt.text)
        data = out / "input_data.json"
        data.write_text(json.dumps(input_data(rows, s.max_new_tokens), ensure_ascii=False))
        print(f"loadtest: {served_desc}\n  models {models}, {len(rows)} prompts from {src} "
              f"(e.g. {texts[0]!r} -> {rows[0]}), max_new_tokens {s.max_new_tokens}, tokenizer {tok}", flush=True)
        points: list[Point] = []
        new_tokens: dict[str, float] = {}
        with served(repo, models, a.url, threads=a.server_threads or None) as (url, server):
            print(f"  tritonserver gRPC {url}" + (f" (pid {server.proc.pid})" if server and server.proc else ""))
            for m in models:
                new_tokens[m] = warm_up(url, m, rows, s.max_new_tokens, eos_id)
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
        "task": "loadtest",
        "device": device_slug(),
        "served": served_desc,
        "models": models,
        "prompts": len(rows),
        "prompt_source": src,
        "tokenizer": tok,
        "max_new_tokens": s.max_new_tokens,
        "mean_new_tokens": new_tokens,
        "settings": asdict(s),
        "server_threads": a.server_threads or "torch default",
        "perf_analyzer": str(pa.binary),
        "seconds": round(time.time() - t0, 1),
        "failed_requests": sum(p.failed for p in points),
        "errors": [f"{p.model} {p.mode} {p.value:g}: {p.error}" for p in points if p.error],
        "points": [asdict(p) for p in points],
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(sys.argv[1:] if argv is None else argv)]),
    }
    (out / "loadtest.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    table = summarize(points)
    (out / "loadtest.md").write_text(f"{_subtitle(report)}\n\n{table}\n")
    pngs = plot(report, out)
    print(table)
    print(f"wrote {out / 'loadtest.json'}, {out / 'loadtest.md'}, perf_analyzer CSVs in {out / 'csv'}"
          + "".join(f", {p}" for p in pngs))
    if report["failed_requests"] or report["errors"]:
        print(f"loadtest: {report['failed_requests']} failed requests, {len(report['errors'])} perf_analyzer errors",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
