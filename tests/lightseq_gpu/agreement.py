"""LightSeq 3.0.1's own GPT inference against our engine on the same files, token by token (issue 31's stretch).

`build` (any Linux machine with nvcc 13, no GPU needed) cross-compiles tests/lightseq_gpu/driver.cc.cu with
LightSeq's GptEncoder / QuantGptEncoder, their kernels and loaders -- the lightseq wheel's sources, copied and
patched with cuda13.patch and hopper_int8.patch -- for the H100 (sm_90), and leaves the binary in .lsbuild/
(git-ignored; carried to the GPU machine). cuBLAS/cuRAND headers come from NVIDIA's pip wheels (`pip download --no-deps`, cached).
`compare` (the GPU machine) exports fp16 and int8 files of a few random-weight models, has LightSeq generate
greedily from random prompts, then runs our engine teacher-forced on prompt + LightSeq's tokens and counts the
steps where our argmax is LightSeq's next token (up to and including LightSeq's first eos); also LightSeq's ppl
of those rows against ours. `--stand-in` replaces LightSeq by our own greedy generation (checks this script on a
machine without the binary or a GPU).

    .venv/bin/python tests/lightseq_gpu/agreement.py build
    PYTHONPATH=.:tests python3 tests/lightseq_gpu/agreement.py compare --out "$OUT"
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
ARTIFACT = ROOT / ".lsbuild"
BINARY = ARTIFACT / "lightseq_gpu_driver"
CACHE = Path(os.environ.get("LSGPT_CACHE") or Path.home() / ".cache" / "lsgpt")
# headers (and libcublas*.so.13 to link against) for CUDA 13; the GPU machine's PyTorch brings the libraries
WHEELS = {"nvidia-cublas": "13.10.0.20", "nvidia-curand": "10.4.5.25"}
LS_PARTS = ("kernels", "model", "proto", "tools")
# name -> (layers, hidden, heads, vocab, max_step, widened weights): "article" is the article's shape with
# larger-than-init weights (oracles.tiny's wide recipe) so that context, not just the last token, picks the argmax
MODELS = {"small": (2, 64, 4, 1000, 128, True), "article": (12, 768, 12, 21128, 512, True),
          "article-init": (12, 768, 12, 21128, 512, False)}


def lightseq_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("lightseq")
    for loc in spec.submodule_search_locations if spec else ():
        if (Path(loc) / "inference" / "model" / "gpt_encoder.cc.cu").is_file():
            return Path(loc) / "inference"
    sys.exit("lightseq==3.0.1 is not installed (scripts/setup.sh)")


def wheel(name: str) -> Path:
    """NVIDIA's wheel `name`, downloaded once (no dependencies) and unpacked; returns its nvidia/cu13 folder."""
    version, dest = WHEELS[name], CACHE / "wheels" / f"{name}-{WHEELS[name]}"
    if not (dest / "nvidia" / "cu13" / "include").is_dir():
        dl = CACHE / "wheels" / "dl"
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dl),
                        f"{name}=={version}"], check=True)
        whl = next(dl.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
        with zipfile.ZipFile(whl) as z:
            z.extractall(dest)
    return dest / "nvidia" / "cu13"


def build_key(ls: Path, nvcc: str) -> str:
    h = hashlib.sha256(json.dumps(WHEELS).encode())
    for p in sorted([*HERE.glob("Makefile"), *HERE.glob("*.patch"), *HERE.glob("*.cu"),
                     *(f for d in LS_PARTS for f in (ls / d).rglob("*") if f.is_file())]):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    h.update(subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.encode())
    return h.hexdigest()[:16]


def build(args) -> int:
    ls, cuda = lightseq_dir(), Path(args.cuda_home)
    nvcc = str(cuda / "bin" / "nvcc")
    cublas, curand = wheel("nvidia-cublas"), wheel("nvidia-curand")
    out = CACHE / f"lightseq-gpu-{build_key(ls, nvcc)}"
    t0 = time.monotonic()
    if not (out / "lightseq_gpu_driver").is_file():
        cmd = ["nice", "-n", "10", "make", "-j1", "-f", str(HERE / "Makefile"), f"LS={ls}", f"OUT={out}",
               f"CUBLAS={cublas}", f"CURAND={curand}", f"CUDA_HOME={cuda}"]
        if subprocess.run(cmd).returncode != 0:
            print(f"build failed (objects kept in {out})")
            return 1
    ARTIFACT.mkdir(exist_ok=True)
    shutil.copy2(out / "lightseq_gpu_driver", BINARY)
    ldd = subprocess.run(["ldd", str(BINARY)], capture_output=True, text=True).stdout
    info = {"build": str(out), "seconds": round(time.monotonic() - t0, 1), "bytes": BINARY.stat().st_size,
            "wheels": WHEELS, "nvcc": subprocess.run([nvcc, "--version"], capture_output=True, text=True)
            .stdout.strip().splitlines()[-1], "ldd": ldd.split("\n")}
    (ARTIFACT / "build.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"{BINARY}: {info['bytes'] / 2**20:.1f} MiB ({info['seconds']} s)\n{ldd}")
    return 0


def cublas_env(home: Path) -> dict[str, str]:
    """The environment the binary runs in: libcublas.so.13 / libcublasLt.so.13 from this Python's NVIDIA wheels
    (PyTorch's), and a HOME whose ~/.lightseq/igemm_configs/ exists, so that LightSeq's cublasAlgoMap takes its
    default GEMM algorithms without trying to wget a config (there is none for the H100 anyway)."""
    import site

    roots = {*site.getsitepackages(), site.getusersitepackages(), *sys.path}
    dirs = {str(p.parent) for sp in roots if sp and Path(sp).is_dir()
            for p in [*Path(sp).glob("nvidia/**/libcublas.so.13"), *Path(sp).glob("torch/lib/libcublas.so.13")]}
    if not dirs:  # a CUDA toolkit's own, if it has cuBLAS 13
        dirs = {str(p.parent) for p in Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")).glob("**/libcublas.so.13")}
    print("libcublas.so.13 from:", ", ".join(sorted(dirs)) or "nowhere found (the driver will not start)")
    (home / ".lightseq" / "igemm_configs").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HOME=str(home))
    env["LD_LIBRARY_PATH"] = ":".join([*sorted(dirs), *filter(None, [os.environ.get("LD_LIBRARY_PATH")])])
    return env


def run_lightseq(kind: str, path: Path, prompts: list[list[int]], new: int, env: dict) -> dict:
    which = {"fp16": "gpt", "int8": "quant_gpt"}[kind]
    proc = subprocess.run([str(BINARY), which, str(path), str(new)], input="\n".join(" ".join(map(str, p))
                          for p in prompts) + "\n", capture_output=True, text=True, env=env, timeout=600)
    res: dict = {"rows": [], "ppl": [], "conf": {}, "rc": proc.returncode}
    for line in proc.stdout.splitlines():
        tag, *rest = line.split()[1:] if line.startswith("LSGEN ") else [None]
        if tag == "row":
            res["rows"].append([int(t) for t in rest[1:]])
        elif tag == "ppl":
            res["ppl"].append(float(rest[1]))
        elif tag == "conf":
            res["conf"][rest[0]] = int(rest[1])
        elif tag in ("ms", "error"):
            res[tag] = float(rest[0]) if tag == "ms" else " ".join(rest)
    if proc.returncode != 0 or "LSGEN ok" not in proc.stdout:
        raise RuntimeError(f"LightSeq driver failed (rc={proc.returncode}): {res.get('error')}\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return res


def stand_in(engine, prompts: list[list[int]], new: int) -> dict:
    """Our own greedy generation in LightSeq's place (--stand-in): the compare path without the binary."""
    from lsgpt.engine.sampling import SamplingParams

    rows = engine.generate(prompts, SamplingParams(max_new_tokens=new, top_k=1, suppress=()))
    return {"rows": rows, "ppl": engine.ppl(rows), "conf": {"eos_id": engine.config.eos_id}, "ms": None}


def teacher_forced(engine, rows: list[list[int]], prompt_len: int, eos: int) -> dict:
    """Our engine on each of LightSeq's rows: at every generated position, is our argmax LightSeq's token?"""
    import torch

    steps = exact = tied = 0
    gaps, first_diff = [], []
    for row in rows:
        gen = row[prompt_len:]
        n = next((i + 1 for i, t in enumerate(gen) if t == eos), len(gen))  # up to LightSeq's first eos
        logits = engine.logits(torch.tensor([row[: prompt_len + n]]))[0, prompt_len - 1: prompt_len - 1 + n]
        want = torch.tensor(gen[:n])
        top = logits.max(-1).values
        mine = logits.gather(1, want[:, None])[:, 0]
        agree = logits.argmax(-1) == want
        steps, exact, tied = steps + n, exact + int(agree.sum()), tied + int((mine == top).sum())
        gaps += (top - mine)[mine != top].tolist()
        first_diff.append(int((~agree).nonzero()[0]) if not agree.all() else None)
    return {"steps": steps, "agree": exact / max(steps, 1), "agree_or_tied": tied / max(steps, 1),
            "disagree_gap_max": max(gaps, default=0.0), "disagree_gaps": sorted(gaps)[-10:],
            "first_disagreement_per_row": first_diff}


def make_files(work: Path, name: str) -> dict[str, Path]:
    from benchmarks.common import export_pair
    from lsgpt.contract import SEP_ID
    from oracles.tiny import make_model

    layers, hidden, heads, vocab, max_step, wide = MODELS[name]
    # the article's ids: eos [SEP] = 102 (fp16 and int8 alike); no pad_token_id, so the exporter writes padding =
    # vocab, out of the vocabulary (a padding id LightSeq generated would drop out of its real_seq_len)
    model = make_model(0, wide=wide, n_layer=layers, n_embd=hidden, n_head=heads, vocab_size=vocab,
                       n_positions=max_step, eos_token_id=SEP_ID, bos_token_id=SEP_ID - 1, pad_token_id=None)
    fp, int8 = export_pair(model, work / name, max_step)
    return {"fp16": fp, "int8": int8}


def engine_for(path: Path, eps: float | None, cpu: bool):
    """Our engine on `path`, as Engine.load builds it; eps: another LayerNorm epsilon (LightSeq's kernels use
    1e-12, we use HF's 1e-5: docs/format.md), to tell that difference from others."""
    import torch

    from lsgpt.engine import Engine
    from lsgpt.engine.int8 import QuantGPT
    from lsgpt.engine.model import GPT
    from lsgpt.format import read_hdf5

    dev = torch.device("cpu" if cpu or not torch.cuda.is_available() else "cuda")
    if eps is None:
        return Engine.load(path, device=dev)
    cfg, arrays = read_hdf5(path)
    cfg.layer_norm_eps = eps
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    return Engine(cfg, (QuantGPT if cfg.quantized else GPT)(cfg, arrays, dev, dtype), dev)


def compare_one(path: Path, kind: str, args, env: dict | None) -> dict:
    import torch

    engine = engine_for(path, None, args.stand_in)
    cfg = engine.config
    g = torch.Generator().manual_seed(args.seed)
    specials = {0, 100, 101, 102, 103, cfg.eos_id, cfg.pad_id}
    ids = [t for t in torch.randint(104, cfg.vocab, (args.prompts * args.prompt_len * 2,), generator=g).tolist()
           if t not in specials]
    prompts = [ids[i * args.prompt_len:(i + 1) * args.prompt_len] for i in range(args.prompts)]
    ls = stand_in(engine, prompts, args.new) if args.stand_in else run_lightseq(kind, path, prompts, args.new, env)
    eos = ls["conf"].get("eos_id", cfg.eos_id)
    r = {"file": str(path), "kind": kind, "engine_backend": engine.backend, "eos_id": eos,
         "lightseq_conf": ls["conf"], "lightseq_ms": ls["ms"], "rows": ls["rows"], "ppl_lightseq": ls["ppl"]}
    for eps in (None, 1e-12):  # None: the engine as it ships (first: the figure that counts)
        if eps is not None:
            engine = engine_for(path, eps, args.stand_in)
        tf = teacher_forced(engine, ls["rows"], args.prompt_len, eos)
        ours = engine.ppl(ls["rows"])
        tf["ppl_ours"] = ours
        tf["ppl_max_rel_diff"] = max(abs(a - b) / max(abs(b), 1e-6) for a, b in zip(ls["ppl"], ours, strict=True))
        r["ours" if eps is None else f"ours_eps_{eps:g}"] = tf
    return r


def compare(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.stand_in and not BINARY.is_file():
        sys.exit(f"{BINARY} is missing: run `tests/lightseq_gpu/agreement.py build` and carry .lsbuild")
    report = {"stand_in": args.stand_in, "prompts": args.prompts, "prompt_len": args.prompt_len, "new": args.new,
              "seed": args.seed, "results": [], "errors": []}
    steps = agree = 0.0
    with tempfile.TemporaryDirectory(prefix="lsgpu-") as tmp:
        env = None if args.stand_in else cublas_env(Path(tmp))
        for name in args.models:
            files = make_files(Path(tmp), name)
            for kind, path in files.items():
                try:
                    r = {"model": name, **compare_one(path, kind, args, env)}
                except Exception as e:  # noqa: BLE001 - one file's failure is a result; the others still run
                    report["errors"].append({"model": name, "kind": kind, "error": f"{type(e).__name__}: {e}"})
                    print(f"{name} {kind}: FAILED {type(e).__name__}: {str(e)[:2000]}", flush=True)
                    continue
                report["results"].append(r)
                steps, agree = steps + r["ours"]["steps"], agree + r["ours"]["agree"] * r["ours"]["steps"]
                for which in ("ours", "ours_eps_1e-12"):
                    t = r[which]
                    print(f"{name:12s} {kind:4s} {which:14s} steps {t['steps']:4d}  agree {t['agree']:.4f}  "
                          f"agree-or-tied {t['agree_or_tied']:.4f}  max gap {t['disagree_gap_max']:.3g}  "
                          f"ppl rel diff {t['ppl_max_rel_diff']:.1e}  lightseq {r['lightseq_ms']} ms", flush=True)
                report.update(overall_agree=agree / max(steps, 1), steps=steps)
                (out / "lightseq_agreement.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"overall: {agree / max(steps, 1):.4f} of {int(steps)} teacher-forced steps agree (target >= 0.99), "
          f"{len(report['errors'])} failed -> {out / 'lightseq_agreement.json'}")
    (out / "lightseq_agreement.json").write_text(json.dumps(report, indent=1) + "\n")
    return 1 if report["errors"] else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="cross-compile the driver into .lsbuild/ (no GPU needed)")
    b.add_argument("--cuda-home", default=os.environ.get("CUDA_HOME", "/usr/local/cuda-13.0"))
    c = sub.add_parser("compare", help="LightSeq vs our engine on exported files (the GPU machine)")
    c.add_argument("--out", required=True)
    c.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    c.add_argument("--prompts", type=int, default=8)
    c.add_argument("--prompt-len", type=int, default=16)
    c.add_argument("--new", type=int, default=64)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--stand-in", action="store_true", help="our greedy generation in LightSeq's place")
    args = p.parse_args(argv)
    return build(args) if args.cmd == "build" else compare(args)


if __name__ == "__main__":
    sys.exit(main())
