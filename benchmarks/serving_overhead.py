#!/usr/bin/env python3
"""What does serving cost? One 100-token greedy generation (batch 1) through tritonserver (gRPC, Python
backend, our engine) vs the same engine in process, on this machine's device (CPU here).

    python benchmarks/serving_overhead.py                                  # GPT-2 base shape + a tiny model
    python benchmarks/serving_overhead.py --shapes 2x64 --runs 3 --out /tmp/o.json

Models are random GPT-2s exported with lsgpt.convert (the cost of serving does not depend on the weights);
vocabulary 21128 (the article's tokenizer) unless --vocab. Each path gets a warm-up, then --runs timed runs;
we report medians and server - in-process. The server path is timed at the client: raw tritonclient
infer() (what perf_analyzer does) and client.Client.generate_ids() (our library).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from lsgpt.repository import publish  # noqa: E402
from lsgpt.launcher import TritonServer, free_port  # noqa: E402

PROMPT = [101, 2769, 791, 1921, 2523, 2458, 2552, 8024]  # [CLS] 我今天很开心，


def export_random(layers: int, hidden: int, vocab: int, path: Path) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from lsgpt.convert import export_model

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=layers, n_embd=hidden, n_head=max(1, hidden // 64), vocab_size=vocab, n_positions=512,
                     bos_token_id=101 % vocab, eos_token_id=vocab - 1)
    # eos = the last id (like the article's export): a random model practically never emits it.
    return export_model(GPT2LMHeadModel(cfg).eval(), path, max_step=512, eos_id=vocab - 1)


def timed_interleaved(fns: dict, runs: int) -> dict[str, tuple[float, list[float], object]]:
    """Warm each path up, then run them in turns so that machine noise hits all of them alike."""
    outs = {k: f() for k, f in fns.items()}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(runs):
        for k, f in fns.items():
            time.sleep(0.5)  # let the other process's OpenMP threads stop spinning (2-core CPU boxes)
            t = time.perf_counter()
            outs[k] = f()
            times[k].append(round(time.perf_counter() - t, 4))
    return {k: (statistics.median(v), v, outs[k]) for k, v in times.items()}


def measure(layers: int, hidden: int, vocab: int, new_tokens: int, runs: int, work: Path, device: str) -> dict:
    import tritonclient.grpc as grpcclient

    from client.api import Client
    from lsgpt.engine import Engine, SamplingParams

    hdf5 = export_random(layers, hidden, vocab, work / f"gpt2_{layers}x{hidden}.hdf5")
    prompt = [t % vocab for t in PROMPT]
    params = SamplingParams(top_k=1, max_new_tokens=new_tokens)
    engine = Engine.load(hdf5, device=device)

    repo = work / f"repo_{layers}x{hidden}"
    for name in ("gpt2",):
        (repo / name).mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text((ROOT / "model_repository" / name / "config.pbtxt").read_text())
    publish(hdf5, repo, "gpt2", lightseq=False)  # gpt2_stream/ gets the file too, but no config: not served
    with TritonServer(repo, grpc_port=free_port(), http_port=free_port(), metrics_port=free_port()) as server:
        server.wait_ready(600)
        c = grpcclient.InferenceServerClient(server.grpc_url)

        def raw():
            ids = grpcclient.InferInput("token_ids", [1, len(prompt)], "INT32")
            ids.set_data_from_numpy(np.asarray([prompt], dtype=np.int32))
            k = grpcclient.InferInput("top_k", [1, 1], "INT32")
            k.set_data_from_numpy(np.array([[1]], dtype=np.int32))
            n = grpcclient.InferInput("max_new_tokens", [1, 1], "INT32")
            n.set_data_from_numpy(np.array([[new_tokens]], dtype=np.int32))
            return c.infer("gpt2", [ids, k, n]).as_numpy("result")[0].tolist()

        class _Tok:  # Client needs a tokenizer only for text; ids go straight through
            sep_token_id = vocab - 1

        lib = Client(server.grpc_url, "gpt2", _Tok())
        res = timed_interleaved({
            "in_process": lambda: engine.generate([prompt], params)[0],
            "server_raw": raw,
            "server_client_library": lambda: lib.generate_ids([prompt], top_k=1, max_new_tokens=new_tokens)[0],
        }, runs)
        # The model logs where Triton put it (KIND_AUTO: the GPU when there is one).
        log = server.log_tail(400).splitlines()
        placed = [ln.split("engine on ")[1].split(",")[0] for ln in log if "engine on " in ln]
    (local_s, local_all, local_out), (raw_s, raw_all, raw_out), (lib_s, lib_all, lib_out) = res.values()
    generated = len(local_out) - len(prompt)
    assert raw_out[: len(local_out)] == local_out and lib_out == local_out, "server output differs from the engine's"
    return {
        "model": {"layers": layers, "hidden": hidden, "vocab": vocab, "file_mb": round(hdf5.stat().st_size / 2**20, 1)},
        "new_tokens": generated,
        "in_process_device": str(engine.device),
        "server_engine_device": placed[-1] if placed else "unknown",
        "in_process_s": round(local_s, 4),
        "server_raw_tritonclient_s": round(raw_s, 4),
        "server_client_library_s": round(lib_s, 4),
        "overhead_raw_s": round(raw_s - local_s, 4),
        "overhead_raw_pct": round(100 * (raw_s - local_s) / local_s, 1),
        "overhead_client_library_s": round(lib_s - local_s, 4),
        "per_token_in_process_ms": round(1000 * local_s / max(generated, 1), 2),
        "runs": {"in_process": local_all, "server_raw": raw_all, "server_client_library": lib_all},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="12x768,2x64", help="comma-separated LAYERSxHIDDEN")
    ap.add_argument("--vocab", type=int, default=21128)
    ap.add_argument("--new-tokens", type=int, default=100)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--device", default=None, help="in-process engine device (default: cuda if present, else cpu)")
    ap.add_argument("--out", default=str(ROOT / "results" / "serving-overhead-cpu.json"))
    a = ap.parse_args(argv)
    import torch

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if a.out.endswith("-cpu.json") and device != "cpu":
        a.out = a.out.replace("-cpu.json", "-gpu.json")
    results = []
    with tempfile.TemporaryDirectory(prefix="overhead-") as tmp:
        for shape in a.shapes.split(","):
            layers, hidden = map(int, shape.lower().split("x"))
            r = measure(layers, hidden, a.vocab, a.new_tokens, a.runs, Path(tmp), device)
            print(json.dumps({k: v for k, v in r.items() if k != "runs"}), flush=True)
            results.append(r)
    report = {
        "what": f"batch 1, greedy, {a.new_tokens} new tokens, prompt {len(PROMPT)} tokens; "
                f"median of {a.runs} interleaved runs after a warm-up",
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu",
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch_threads": torch.get_num_threads(),
        "results": results,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
