"""One GPU vs two GPUs (torchrun, NCCL) for training/train.py, the article's command: steady-state tokens/s,
step time, peak GPU memory per rank, and the per-step losses at the same global batch (issue 16).

Two subcommands; benchmarks/train_multi_gpu.sh runs both.

  train      training/train.py's own command line, unchanged, plus one TrainerCallback (nothing else is patched):
               python -m benchmarks.train_multi_gpu train <train.py args>            (1 process)
               torchrun --standalone --nproc_per_node=2 -m benchmarks.train_multi_gpu train <train.py args>
             Every rank writes <output_dir>/timing_rank<R>.json: a wall-clock timestamp at the end of every
             optimizer step (the GPU synchronized only at the end of step --warmup and of the last step, the two
             ends of the timed window), torch.cuda.max_memory_allocated / max_memory_reserved over the training
             loop (train.py resets the peak just before trainer.train()), batch shape and world size.
  summarize  reads the run folders (timing_rank*.json, trainer_state.json, metrics.json) and writes
             results.json + results.md: tokens/s = world x per-device batch x grad. accumulation x block x timed
             steps / (t[last] - t[warmup]) from rank 0's timestamps; scaling = 2-GPU / 1-GPU tokens/s; per-step
             loss comparisons (mean/max relative difference) for the pairs named with --pair.

Steady state: the first --warmup steps (torch.compile of the fast path, cuDNN/NCCL set-up, allocator growth)
are outside the timed window; the Trainer's train_samples_per_second (which includes them) is kept beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WARMUP_ENV = "MG_WARMUP"  # steps outside the timed window (default 20)


def _argv_value(argv: list[str], flag: str, default=None):
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return default


def train(argv: list[str]) -> int:
    import torch
    from transformers import TrainerCallback

    import lsgpt.training.train as T

    warmup = int(os.environ.get(WARMUP_ENV, "20"))
    block = int(_argv_value(argv, "--block_size", "500"))

    class Timing(TrainerCallback):
        def __init__(self):
            self.t: list[float] = []
            self.t_begin = None

        def _sync(self):
            if torch.cuda.is_available():
                torch.cuda.synchronize()

        def on_train_begin(self, args, state, control, **kw):
            self._sync()
            self.t_begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step in (warmup, state.max_steps):
                self._sync()
            self.t.append(time.perf_counter())

        def on_train_end(self, args, state, control, **kw):
            self._sync()
            cuda = torch.cuda.is_available()
            rank = args.process_index
            rec = {
                "rank": rank, "world_size": args.world_size, "warmup_steps": warmup, "steps": len(self.t),
                "per_device_batch": args.per_device_train_batch_size,
                "grad_accum": args.gradient_accumulation_steps, "block": block,
                "t_begin": self.t_begin, "t_step_end": self.t,
                "device": torch.cuda.get_device_name(torch.cuda.current_device()) if cuda else "cpu",
                "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
                "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3) if cuda else None,
                "argv": argv,
            }
            out = Path(args.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"timing_rank{rank}.json").write_text(json.dumps(rec))

    base = T.Trainer
    cb = Timing()

    class TimedTrainer(base):
        def __init__(self, *a, callbacks=None, **kw):
            super().__init__(*a, callbacks=[*(callbacks or []), cb], **kw)

    T.Trainer = TimedTrainer  # train.main() looks the name up in its module at call time
    sys.argv = [str(ROOT / "training" / "train.py"), *argv]
    return T.cli(argv)


# ---------------------------------------------------------------------------------------------------------


def load_run(d: Path) -> dict:
    r: dict = {"dir": d.name}
    ranks = sorted(d.glob("timing_rank*.json"))
    if not ranks:
        r["error"] = "no timing (run failed or timed out: see its log)"
        return r
    tim = [json.loads(p.read_text()) for p in ranks]
    t0 = tim[0]
    t, w = t0["t_step_end"], t0["warmup_steps"]
    n = len(t)
    world = t0["world_size"]
    samples_per_step = world * t0["per_device_batch"] * t0["grad_accum"]
    r.update(world_size=world, per_device_batch=t0["per_device_batch"], grad_accum=t0["grad_accum"],
             global_batch=samples_per_step, block=t0["block"], steps=n, warmup_steps=w, device=t0["device"])
    if n > w + 1:
        dt = t[n - 1] - t[w - 1]
        steps = n - w
        tok = samples_per_step * t0["block"]
        # per-step intervals in the window (the Trainer reads the loss back every step with --logging_steps 1, so
        # each timestamp follows the GPU); a stall over 5x the median is a recompilation (the 1-GPU runs' last,
        # partial batch of an epoch is a new shape for torch.compile), counted and reported, not averaged in
        iv = sorted(1000 * (t[i] - t[i - 1]) for i in range(w, n))
        med = iv[len(iv) // 2]
        keep = [x for x in iv if x <= 5 * med]
        r["timed_steps"] = steps
        r["window_mean_step_ms"] = round(1000 * dt / steps, 2)
        r["window_tokens_per_s"] = round(tok * steps / dt, 1)
        r["stalls_ms"] = [round(x) for x in iv if x > 5 * med]
        r["median_step_ms"] = round(med, 2)
        r["step_ms"] = round(sum(keep) / len(keep), 2)
        r["tokens_per_s"] = round(tok * 1000 / r["step_ms"], 1)
        r["samples_per_s"] = round(samples_per_step * 1000 / r["step_ms"], 2)
        # each rank's own clock over the same window (they should agree under DDP)
        r["step_ms_per_rank"] = [round(1000 * (x["t_step_end"][n - 1] - x["t_step_end"][w - 1]) / steps, 2)
                                 for x in tim if len(x["t_step_end"]) == n]
    r["warmup_s"] = round(t[w - 1] - t0["t_begin"], 2) if n >= w else None
    r["first_step_s"] = round(t[0] - t0["t_begin"], 2) if n else None
    r["peak_allocated_gib_per_rank"] = [x["peak_allocated_gib"] for x in tim]
    r["peak_reserved_gib_per_rank"] = [x["peak_reserved_gib"] for x in tim]
    st = d / "trainer_state.json"
    if st.is_file():
        hist = json.loads(st.read_text())["log_history"]
        r["losses"] = [e["loss"] for e in hist if "loss" in e]
    m = d / "metrics.json"
    if m.is_file():
        mm = json.loads(m.read_text())
        for k in ("eval_loss", "train_samples_per_second", "train_runtime", "fast_path", "enable_quant",
                  "peak_gpu_memory_gib", "int8_before_qat_loss", "fp16_loss"):
            if k in mm:
                r[k] = mm[k]
    return r


def compare(a: list[float], b: list[float], window: int = 10) -> dict:
    n = min(len(a), len(b))
    if not n:
        return {"steps": 0}
    rel = [abs(b[i] - a[i]) / abs(a[i]) for i in range(n)]
    sa = [sum(a[i:i + window]) / window for i in range(0, n - window + 1, window)]
    sb = [sum(b[i:i + window]) / window for i in range(0, n - window + 1, window)]
    srel = [abs(y - x) / abs(x) for x, y in zip(sa, sb)]
    worst = max(range(n), key=lambda i: rel[i])
    return {"steps": n, "mean_rel_diff": round(sum(rel) / n, 5), "max_rel_diff": round(max(rel), 5),
            "max_rel_diff_step": worst + 1, "steps_over_1pct": sum(x > 0.01 for x in rel),
            f"max_rel_diff_{window}_step_means": round(max(srel), 5) if srel else None,
            "mean_rel_diff_last_half": round(sum(rel[n // 2:]) / (n - n // 2), 5),
            "first_loss": [a[0], b[0]], "last_loss": [a[n - 1], b[n - 1]]}


def fmt(x, spec=",.0f"):
    return "—" if x is None else format(x, spec)


def summarize(a) -> int:
    runs_dir = Path(a.runs)
    runs = {p.name: load_run(p) for p in sorted(runs_dir.iterdir()) if p.is_dir()}
    res: dict = {"runs": runs, "scaling": {}, "loss_match": {}}
    for spec in a.scale:  # "label=one:two"
        label, pair = spec.split("=", 1)
        one, two = pair.split(":")
        x, y = runs.get(one, {}), runs.get(two, {})
        if x.get("tokens_per_s") and y.get("tokens_per_s"):
            res["scaling"][label] = {"one": one, "two": two,
                                     "scaling": round(y["tokens_per_s"] / x["tokens_per_s"], 3),
                                     "target": 1.8, "meets_target": y["tokens_per_s"] / x["tokens_per_s"] >= 1.8}
    for spec in a.pair:  # "label=ref:other[:noise_ref:noise_other]"
        label, rest = spec.split("=", 1)
        names = rest.split(":")
        x, y = runs.get(names[0], {}), runs.get(names[1], {})
        if not (x.get("losses") and y.get("losses")):
            continue
        c = {"a": names[0], "b": names[1], **compare(x["losses"], y["losses"])}
        if "eval_loss" in x and "eval_loss" in y:
            c["eval_loss"] = [x["eval_loss"], y["eval_loss"]]
            c["eval_loss_rel_diff"] = round(abs(y["eval_loss"] - x["eval_loss"]) / x["eval_loss"], 5)
        if len(names) == 4:
            nx, ny = runs.get(names[2], {}), runs.get(names[3], {})
            if nx.get("losses") and ny.get("losses"):
                nz = compare(nx["losses"], ny["losses"])
                c["noise_ref"] = {"a": names[2], "b": names[3], **nz}
                if "eval_loss" in nx and "eval_loss" in ny:
                    c["noise_ref"]["eval_loss_rel_diff"] = round(
                        abs(ny["eval_loss"] - nx["eval_loss"]) / nx["eval_loss"], 5)
                # "within noise": the 1-vs-2-GPU mean per-step difference is no larger than 1.5x the one between
                # two runs that differ only by dropout masks / kernel numerics at the same global batch
                c["within_noise"] = c["mean_rel_diff"] <= 1.5 * nz["mean_rel_diff"]
        res["loss_match"][label] = c
    (Path(a.out) / "results.json").write_text(json.dumps(res, indent=1))

    L = ["tokens/s and step ms: mean over the steps after the warm-up, stalls over 5x the median (recompilation) "
         "left out and listed", "",
         "| run | GPUs | batch/GPU x GPUs | tokens/s (steady) | step ms | stalls ms | peak alloc GiB/rank | peak reserved GiB/rank "
         "| warm-up s | Trainer samples/s (incl. warm-up) | eval loss |", "|" + " --- |" * 11]
    for name, r in runs.items():
        if "error" in r:
            L.append(f"| {name} | | | {r['error']} | | | | | | | |")
            continue
        L.append(f"| {name} | {r['world_size']} | {r['per_device_batch']}x{r['world_size']}"
                 f"{'' if r['grad_accum'] == 1 else ' x' + str(r['grad_accum']) + ' acc'} | "
                 f"{fmt(r.get('tokens_per_s'))} | {fmt(r.get('step_ms'), '.1f')} | {r.get('stalls_ms') or ''} | "
                 f"{' / '.join(fmt(v, '.2f') for v in r['peak_allocated_gib_per_rank'])} | "
                 f"{' / '.join(fmt(v, '.2f') for v in r['peak_reserved_gib_per_rank'])} | "
                 f"{fmt(r.get('warmup_s'), '.1f')} | {fmt(r.get('train_samples_per_second'), '.1f')} | "
                 f"{fmt(r.get('eval_loss'), '.4f')} |")
    L += ["", "| scaling | 1 GPU | 2 GPUs | 2-GPU / 1-GPU tokens/s | >= 1.8x |", "| --- | --- | --- | --- | --- |"]
    for label, s in res["scaling"].items():
        L.append(f"| {label} | {s['one']} | {s['two']} | {s['scaling']:.3f} | {s['meets_target']} |")
    L += ["", "| loss match | runs | steps | mean rel diff | max rel diff (step) | 10-step means max | eval loss rel diff "
          "| noise ref (runs: mean / max / eval) | within noise |", "|" + " --- |" * 9]
    for label, c in res["loss_match"].items():
        nz = c.get("noise_ref")
        nzs = (f"{nz['a']} vs {nz['b']}: {nz['mean_rel_diff']:.4f} / {nz['max_rel_diff']:.4f} / "
               f"{fmt(nz.get('eval_loss_rel_diff'), '.4f')}") if nz else "—"
        L.append(f"| {label} | {c['a']} vs {c['b']} | {c['steps']} | {c['mean_rel_diff']:.4f} | "
                 f"{c['max_rel_diff']:.4f} ({c['max_rel_diff_step']}) | "
                 f"{fmt(c.get('max_rel_diff_10_step_means'), '.4f')} | {fmt(c.get('eval_loss_rel_diff'), '.4f')} | "
                 f"{nzs} | {c.get('within_noise', '—')} |")
    (Path(a.out) / "results.md").write_text("\n".join(L) + "\n")
    print("\n".join(L))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "train":
        return train(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("train", help="train.py's arguments follow")
    s = sub.add_parser("summarize")
    s.add_argument("--runs", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--scale", action="append", default=[], help="label=one_gpu_run:two_gpu_run")
    s.add_argument("--pair", action="append", default=[], help="label=run_a:run_b[:noise_a:noise_b]")
    a = ap.parse_args(argv)
    return summarize(a)


if __name__ == "__main__":
    sys.exit(main())
