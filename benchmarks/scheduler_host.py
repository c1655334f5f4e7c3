"""The scheduler's host work per decode step, the forward left out (issue 29: at 256 streams a served step took
2.2 ms against 1.3 ms in process on the H100, and py-spy found the model process's GIL held ~93% of the time).

A Scheduler over a small random model gets `rows` running greedy requests (served-like: a cancellation flag per
request, EOS on, lengths that never end within the run); its decode forward is replaced by a copy of fixed
logits, so what is timed is everything else a step does on the host: the step's bookkeeping, sampling launches,
the read-back, and each row's token (cancellation, metrics, stop checks). The same on CPU and GPU.

    python -m benchmarks.scheduler_host                       # 32,256 rows; median of 5 runs of 200 steps
    python -m benchmarks.scheduler_host --rows 256 --sampled 0.25 --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks import common


def build(rows: int, vocab: int, device: str, sampled: float, hdf5: Path | None):
    """A Scheduler whose `rows` slots all hold a running request, its loop thread stopped (steps run here)."""
    import torch

    from lsgpt.engine.engine import Engine, SamplingParams
    from lsgpt.engine.sampling import validate_request
    from lsgpt.engine.scheduler import Request, Scheduler

    if hdf5 is None:
        tmp = Path(tempfile.mkdtemp(prefix="lsgpt-schedhost-"))
        hdf5, _ = common.export_pair(common.random_model(2, 64, 4, vocab, 1024), tmp, 1024)
    eng = Engine.load(hdf5, device)
    s = Scheduler(eng, max_rows=rows, max_queue=rows)
    with s._cv:  # the loop thread stops; this thread drives the steps
        s._stop = True
        s._cv.notify()
    s._thread.join()
    flag = type("Flag", (), {"__call__": lambda self: False})()  # a served request's Watched: a flag read per token
    for slot in range(rows):
        draw = slot < sampled * rows
        sp = SamplingParams(max_new_tokens=10**6, **({"top_k": 50, "temperature": 0.9, "seed": slot} if draw
                                                      else {"top_k": 1}))
        sp = validate_request(eng.config, [5, 6, 7], sp, suppress=eng.suppress)
        r = Request([5, 6, 7], sp, lambda ids, err: None, None, flag, limit=10**9, tokens=[5, 6, 7], slot=slot,
                    submitted=time.monotonic())
        s._occupy(r)  # as an admission does, then its first token's sampling state
        s._set_params(slot, sp)
        s.pos[slot] = 3
    s.free = []
    logits = torch.randn(rows, eng.config.vocab, device=eng.device)
    s.graphs.clear()  # the forward: a copy of fixed logits (what the step does around it is timed)
    eng.decode = lambda tok, pos, cache: logits[: tok.shape[0]].clone()
    return s


def per_step_us(s, steps: int) -> float:
    import torch

    for _ in range(10):
        s._step()
    if s.engine.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        s._step()
    if s.engine.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps * 1e6


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=lambda x: [int(v) for v in x.split(",")], default=[32, 256],
                   help="running rows, comma-separated (default 32,256)")
    p.add_argument("--steps", type=int, default=200, help="timed steps per run")
    p.add_argument("--runs", type=int, default=5, help="runs per level (the median is reported)")
    p.add_argument("--sampled", type=float, default=0.0, help="share of rows that sample (top-k 50), the rest greedy")
    p.add_argument("--vocab", type=int, default=1000, help="vocabulary of the random model (default 1000)")
    p.add_argument("--hdf5", type=Path, help="a model file instead of a random 2-layer/64 one")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda when present)")
    p.add_argument("--out", type=Path, help="write the JSON here")
    a = p.parse_args(argv)
    if not 0 <= a.sampled <= 1:
        p.error(f"--sampled: a share in [0, 1], got {a.sampled}")
    if any(r < 1 for r in a.rows) or a.steps < 1 or a.runs < 1:
        p.error("--rows, --steps and --runs must be >= 1")
    import torch

    torch.set_num_threads(1)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    res = {"command": common.command_line(argv), "device": common.device_slug(device), "levels": []}
    for rows in a.rows:
        s = build(rows, a.vocab, device, a.sampled, a.hdf5)
        runs = [per_step_us(s, a.steps) for _ in range(a.runs)]
        res["levels"].append({"rows": rows, "sampled": a.sampled, "host_us_per_step": round(statistics.median(runs), 1),
                              "runs_us": [round(x, 1) for x in runs]})
        print(json.dumps(res["levels"][-1]), flush=True)
    if a.out:
        common.write_json(a.out, res)
    return res


if __name__ == "__main__":
    main()
