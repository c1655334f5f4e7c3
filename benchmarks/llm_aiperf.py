#!/usr/bin/env python3
"""LLM load test by NVIDIA's aiperf (the successor of genai-perf), through our OpenAI-compatible API.

    python -m benchmarks.llm_aiperf                          # the repository's models (or a tiny random one)
    make loadtest LOADTEST_ARGS=--aiperf                     # the same
    python -m benchmarks.llm_aiperf --quick                  # a minute: concurrency 1,4, few requests
    python -m benchmarks.llm_aiperf --openai-url http://127.0.0.1:9000 --models gpt2_int8   # a running `make openai`

What runs: a real tritonserver of ours on free ports (what loadtest.py serves: --hdf5, else the repository's
exported models, else a tiny random GPT-2), lsgpt/serving/openai_api.py in front of it, then per model and concurrency
one `aiperf profile --endpoint-type completions --streaming` (closed loop), a mixed load:
- the requests of loadtest.py --llm (common.llm_requests): real prompts (data/train.txt's lines, else built-in
  ones) cut or repeated to lengths uniform in --prompt-tokens (4..64), max_tokens uniform in --new-tokens
  (16..256), both capped to the model's positions; given to aiperf as a single_turn dataset (text, output_length);
- --cancel-pct of the requests (10) cancelled --cancel-delay seconds after they are sent (aiperf disconnects; the
  frontend stops the stream in band), counted apart from failures;
- token counts from the server's usage (our tokenizer).
Out (--out, default results/tmp/<device>/aiperf/, or aiperf-quick/ with --quick; --record: results/<device>/): aiperf's own artifacts per level
(<model>-c<N>/), and our table of them: aiperf.json, aiperf.csv, aiperf.md, aiperf.png (time to first token,
inter-token latency and request latency p50/p95/p99, output tokens/s, requests ok / cancelled / failed).

aiperf lives in a virtual environment of its own (.venv-aiperf, aiperf==AIPERF_VERSION, made on first use with
the network; docs/decisions.md says why). Exit status 1 when any request failed (cancellations are not failures).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchmarks import common
from lsgpt.contract import STREAM_SUFFIX

AIPERF_VERSION = "0.13.0"
AIPERF_VENV = common.ROOT / ".venv-aiperf"
CANCELLED_CODE = 499  # aiperf records the requests it cancels on purpose as errors with this code
COLUMNS = ("model", "concurrency", "requests_ok", "cancelled", "failed", "output_tokens_per_s", "requests_per_s",
           "ttft_p50_ms", "ttft_p95_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p95_ms", "itl_p99_ms",
           "latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "mean_output_tokens", "mean_prompt_tokens")


def summarize(model: str, concurrency: int, export: dict) -> dict:
    """One row of our table from aiperf's profile_export_aiperf.json."""
    def stat(name: str, key: str) -> float | None:
        v = export.get(name) or {}
        return None if v.get(key) is None else round(float(v[key]), 2)

    errors = export.get("error_summary") or []
    cancelled = sum(e["count"] for e in errors if (e.get("error_details") or {}).get("code") == CANCELLED_CODE)
    failed = sum(e["count"] for e in errors) - cancelled
    row = {"model": model, "concurrency": concurrency, "requests_ok": int(stat("request_count", "avg") or 0),
           "cancelled": cancelled, "failed": failed,
           "output_tokens_per_s": stat("output_token_throughput", "avg"),
           "requests_per_s": stat("request_throughput", "avg"),
           "mean_output_tokens": stat("output_sequence_length", "avg"),
           "mean_prompt_tokens": stat("input_sequence_length", "avg")}
    for short, name in (("ttft", "time_to_first_token"), ("itl", "inter_token_latency"), ("latency", "request_latency")):
        for q in ("p50", "p95", "p99"):
            row[f"{short}_{q}_ms"] = stat(name, q)
    return {k: row[k] for k in COLUMNS}


def find_aiperf(explicit: str | None, install: bool) -> Path:
    """--aiperf, else .venv-aiperf/bin/aiperf (made now when missing and `install`), else BenchError."""
    if explicit:
        p = Path(explicit)
        if not p.is_file():
            raise common.BenchError(f"--aiperf {explicit}: no such file")
        return p
    exe = AIPERF_VENV / "bin" / "aiperf"
    if exe.is_file():
        return exe
    if not install:
        raise common.BenchError(f"aiperf is not installed: run without --no-install (makes {AIPERF_VENV} with "
                                f"aiperf=={AIPERF_VERSION}; needs the network once), or pass --aiperf PATH")
    print(f"llm_aiperf: installing aiperf=={AIPERF_VERSION} into {AIPERF_VENV} (once; a few minutes)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(AIPERF_VENV)], check=True)
    r = subprocess.run([str(AIPERF_VENV / "bin" / "pip"), "install", "-q", f"aiperf=={AIPERF_VERSION}"])
    if r.returncode or not exe.is_file():
        raise common.BenchError(f"pip could not install aiperf=={AIPERF_VERSION} into {AIPERF_VENV} (offline?)")
    return exe


def hf_tokenizer(tok: str, dst: Path) -> Path:
    """Our tokenizer as a Hugging Face folder: aiperf loads one (it counts nothing with it: --use-server-token-count)."""
    from lsgpt.text import cached_tokenizer

    cached_tokenizer(tok).save_pretrained(dst)
    return dst


def write_dataset(tok: str, a: argparse.Namespace, max_step: int, vocab: int | None, path: Path) -> int:
    """The mixed load as aiperf's single_turn JSONL ({"text", "output_length"} a line); how many requests."""
    from lsgpt.text import cached_tokenizer, decode

    texts = common.load_prompts(common.default_prompt_source(), 16, 64)
    rows = common.encode_prompts(tok, texts, vocab)
    n = max(a.requests, 3 * max(a.concurrency))
    reqs = common.llm_requests(rows, a.prompt_span, a.new_span, max_step, n=n, seed=a.seed)
    t = cached_tokenizer(tok)
    path.write_text("".join(json.dumps({"text": decode(t, ids), "output_length": new}, ensure_ascii=False) + "\n"
                            for ids, new in reqs), encoding="utf-8")
    return n


class OpenAIFrontend:
    """lsgpt/serving/openai_api.py in a child process on a free loopback port, in front of a gRPC url."""

    def __init__(self, grpc_url: str, tokenizer: str, log: Path):
        from lsgpt.serving.launcher import free_port

        self.port, self.log = free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "lsgpt.serving.openai_api", "--url", grpc_url,
                     "-p", tokenizer, "--port", str(self.port)]

    def __enter__(self) -> OpenAIFrontend:
        self.out = open(self.log, "w")
        self.proc = subprocess.Popen(self.args, stdout=self.out, stderr=subprocess.STDOUT, cwd=common.ROOT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise common.BenchError(f"the OpenAI frontend exited: {self.log.read_text()[-1500:]}")
            try:
                urllib.request.urlopen(self.url + "/v1/models", timeout=2).read()
                return self
            except OSError:
                time.sleep(0.5)
        raise common.BenchError(f"the OpenAI frontend did not answer at {self.url} within 120 s")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.out.close()


def profile(aiperf: Path, url: str, model: str, concurrency: int, a: argparse.Namespace, tokenizer: Path,
            data: Path, out: Path) -> dict:
    """One aiperf run at one concurrency; our summary row of it."""
    art = out / f"{model}-c{concurrency}"
    requests = max(a.requests, 3 * concurrency)
    cmd = [str(aiperf), "profile", "-m", model, "--url", url, "--endpoint-type", "completions", "--streaming",
           "--tokenizer", str(tokenizer), "--use-server-token-count", "--custom-dataset-type", "single_turn",
           "--input-file", str(data), "--concurrency", str(concurrency), "--request-count", str(requests),
           "--warmup-request-count", str(max(2, concurrency)), "--random-seed", str(a.seed),
           "--ui-type", "none", "--no-server-metrics", "--no-gpu-telemetry", "--artifact-dir", str(art)]
    if a.cancel_pct > 0:
        cmd += ["--request-cancellation-rate", f"{a.cancel_pct:g}", "--request-cancellation-delay", f"{a.cancel_delay:g}"]
    print(f"llm_aiperf: {model} at concurrency {concurrency}, {requests} requests", flush=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    r = subprocess.run(cmd, cwd=out, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=a.timeout)
    (art.parent / f"{art.name}.log").write_text(r.stdout)
    export = art / "profile_export_aiperf.json"
    if r.returncode or not export.is_file():
        raise common.BenchError(f"aiperf failed at {model} c{concurrency} (exit {r.returncode}): {r.stdout[-1500:]}\n"
                                f"(aiperf's log: {art}/logs/aiperf.log; the frontend's: {out}/openai_server.log)")
    return summarize(model, concurrency, json.loads(export.read_text()))


def check_openai(url: str, models: list[str]) -> None:
    """BenchError unless an OpenAI API answers at `url` and lists every model asked for."""
    try:
        listed = {m["id"] for m in json.loads(urllib.request.urlopen(url.rstrip("/") + "/v1/models", timeout=10).read())["data"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise common.BenchError(f"no OpenAI API answers at {url}/v1/models ({e}); start one with `make openai`") from None
    if missing := [m for m in models if m not in listed]:
        raise common.BenchError(f"{url} does not serve {missing} (it lists {sorted(listed)})")


def served_max_step(repo: Path, model: str) -> int | None:
    """The positions of the model file a repository serves (its newest version), if it has one."""
    from lsgpt.format import read_hdf5

    version = common.latest_version(repo / model)
    return read_hdf5(version / common.MODEL_FILE)[0].max_step if version else None


def table(rows: list[dict]) -> str:
    head = ("| model | conc. | ok / cancelled / failed | output tokens/s | TTFT p50 / p95 ms | ITL p50 / p95 ms "
            "| latency p50 / p95 / p99 ms |\n|---|---|---|---|---|---|---|")
    lines = [f"| {r['model']} | {r['concurrency']} | {r['requests_ok']} / {r['cancelled']} / {r['failed']} | "
             f"{r['output_tokens_per_s']} | {r['ttft_p50_ms']} / {r['ttft_p95_ms']} | {r['itl_p50_ms']} / "
             f"{r['itl_p95_ms']} | {r['latency_p50_ms']} / {r['latency_p95_ms']} / {r['latency_p99_ms']} |" for r in rows]
    return "\n".join([head, *lines])


def plot(rows: list[dict], out: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("llm_aiperf: matplotlib missing, no plot", file=sys.stderr)
        return
    panels = (("output_tokens_per_s", "output tokens/s"), ("ttft_p95_ms", "time to first token p95 (ms)"),
              ("itl_p95_ms", "inter-token latency p95 (ms)"), ("latency_p95_ms", "request latency p95 (ms)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, (key, label) in zip(axes, panels):
        for m in dict.fromkeys(r["model"] for r in rows):
            pts = [(r["concurrency"], r[key]) for r in rows if r["model"] == m and r[key] is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "aiperf.png", dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="gpt2,gpt2_int8", help="comma-separated model names of the OpenAI API")
    p.add_argument("--concurrency", default="1,4,16,64", help="comma-separated")
    p.add_argument("--requests", type=int, default=64, help="requests per level (at least 3 x the concurrency)")
    p.add_argument("--prompt-tokens", default="4,64", help="prompt length range (tokens)")
    p.add_argument("--new-tokens", default="16,256", help="max_tokens range")
    p.add_argument("--cancel-pct", type=float, default=10.0, help="percent of requests cancelled mid-stream")
    p.add_argument("--cancel-delay", type=float, default=0.1, help="seconds after sending that they are cancelled")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="concurrency 1,4 and 16 requests a level (about a minute)")
    p.add_argument("--openai-url", help="a running OpenAI frontend (`make openai`) instead of starting one")
    p.add_argument("--model-repository", type=Path, default=common.ROOT / "model_repository")
    p.add_argument("--hdf5", type=Path, help="serve this exported file instead (fp -> gpt2, int8 -> gpt2_int8)")
    p.add_argument("--tokenizer", help="folder with vocab.txt (default: the one published beside the model)")
    p.add_argument("--max-step", type=int, help="the model's positions, to cap the load (default: the served "
                                                 "file's; 1024 with --openai-url)")
    p.add_argument("--aiperf", help="the aiperf executable (default .venv-aiperf/bin/aiperf, made on first use)")
    p.add_argument("--no-install", action="store_true", help="never create .venv-aiperf")
    p.add_argument("--timeout", type=float, default=900, help="seconds per aiperf run")
    common.add_output_args(p, "aiperf")
    a = p.parse_args(argv)
    try:
        a.concurrency = [int(x) for x in a.concurrency.split(",") if x]
        a.prompt_span = tuple(int(x) for x in a.prompt_tokens.split(","))
        a.new_span = tuple(int(x) for x in a.new_tokens.split(","))
        assert len(a.prompt_span) == 2 and len(a.new_span) == 2 and min(*a.prompt_span, *a.new_span) >= 1
        assert a.concurrency and min(a.concurrency) >= 1
    except (ValueError, AssertionError):
        p.error("--concurrency takes N,N,...; --prompt-tokens and --new-tokens take LO,HI (positive)")
    if not 0 <= a.cancel_pct < 100:
        p.error("--cancel-pct takes 0 to 99")
    if a.quick:
        a.concurrency, a.requests = [c for c in a.concurrency if c <= 4] or [1], 16
    return a


def main(argv: list[str] | None = None, command: str | None = None) -> int:
    """`command`: the command line to record when another script (loadtest.py --aiperf) calls this one."""
    a = parse_args(argv)
    models = [m for m in a.models.split(",") if m]
    name = "aiperf-quick" if a.quick else "aiperf"  # a quick try never replaces a full run's results
    out: Path = (a.out or common.results_dir(name, record=a.record)).resolve()
    try:
        if a.openai_url:  # the user's mistakes before any install
            check_openai(a.openai_url, models)
        aiperf = find_aiperf(a.aiperf, not a.no_install)
        out.mkdir(parents=True, exist_ok=True)
        rows: list[dict] = []
        with tempfile.TemporaryDirectory(prefix="lsgpt-aiperf-") as tmp:
            if a.openai_url:
                served, vocab = f"OpenAI frontend at {a.openai_url}", None
                repo = a.model_repository
                tok = common.find_tokenizer(a.tokenizer, repo, models[0])
            else:
                repo, tok, served, vocab, models = common.prepare(a.model_repository, Path(tmp), hdf5=a.hdf5,
                                                                  tokenizer=a.tokenizer, models=models)
            max_step = a.max_step or served_max_step(repo, models[0]) or 1024
            hf = hf_tokenizer(tok, Path(tmp) / "tokenizer")
            data = out / "requests.jsonl"
            n = write_dataset(tok, a, max_step, vocab, data)
            print(f"llm_aiperf: {served}; models {models}, {n} mixed requests a level ({data}), max_step {max_step}",
                  flush=True)
            if a.openai_url:
                for m in models:
                    rows += [profile(aiperf, a.openai_url, m, c, a, hf, data, out) for c in a.concurrency]
            else:
                twins = [x for m in models for x in (m, m + STREAM_SUFFIX)]  # stream: true goes to the twin
                with common.served(repo, twins) as (grpc_url, _), \
                        OpenAIFrontend(grpc_url, tok, out / "openai_server.log") as api:
                    for m in models:
                        rows += [profile(aiperf, api.url, m, c, a, hf, data, out) for c in a.concurrency]
    except common.BenchError as e:
        print(f"llm_aiperf: error: {e}", file=sys.stderr)
        return 2
    with open(out / "aiperf.csv", "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        w.writerows(rows)
    title = f"{common.device_slug()} | {served} | aiperf {AIPERF_VERSION}, {a.cancel_pct:g}% cancelled"
    report = {"task": "aiperf", "device": common.device_slug(), "served": served, "aiperf": AIPERF_VERSION,
              "prompt_tokens": a.prompt_span, "new_tokens": a.new_span, "max_step": max_step, "cancel_pct": a.cancel_pct, "cancel_delay_s": a.cancel_delay, "points": rows,
              "command": command or common.command_line(argv)}
    common.write_report(out, "aiperf", report, md=f"{title}\n\nCommand: `{report['command']}`\n\n{table(rows)}")
    plot(rows, out, title)
    print(f"wrote {out / 'aiperf.json'}, aiperf.csv, aiperf.md, aiperf.png; aiperf's own files in {out}/<model>-c<N>/")
    failed = sum(r["failed"] for r in rows)
    if failed:
        print(f"llm_aiperf: {failed} requests failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
