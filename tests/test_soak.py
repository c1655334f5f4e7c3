"""benchmarks/soak.py's GPU memory reading, against an nvidia-smi stand-in on PATH that prints what the H100
machine's printed (`--format=csv,noheader,nounits`): the server's processes are summed, other processes' memory
is not, and where nvidia-smi lists none of the server's processes the visible GPU's used memory is taken."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import soak


def fake_smi(folder: Path, apps: str, used: str) -> None:
    script = folder / "nvidia-smi"
    script.write_text("#!/bin/sh\n"
                      'case "$1" in\n'
                      f"  --query-compute-apps=*) printf '{apps}' ;;\n"
                      f'  --query-gpu=*) echo "$@" > "{folder}/gpu-args"; printf \'{used}\' ;;\n'
                      "esac\n")
    script.chmod(0o755)


@pytest.fixture
def server_tree():
    """A parent with one child, standing in for tritonserver and a model stub."""
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                               "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
                               "print(c.pid, flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    yield parent.pid, child
    parent.kill()
    os.kill(child, 9)


def test_gpu_memory_sums_the_server_tree_only(tmp_path, monkeypatch, server_tree):
    parent, child = server_tree
    fake_smi(tmp_path, f"{parent}, 584\\n{child}, 1552\\n999999, 30000\\n", "40000\\n")
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert soak.gpu_memory(parent) == {"gpu_mib": 584 + 1552, "gpu_scope": "server processes"}


def test_gpu_memory_falls_back_to_the_visible_gpu(tmp_path, monkeypatch, server_tree):
    parent, _ = server_tree
    fake_smi(tmp_path, "999999, 30000\\n", "3714\\n")  # a PID namespace of its own: none of ours listed
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert soak.gpu_memory(parent) == {"gpu_mib": 3714, "gpu_scope": "whole GPU"}
    assert (tmp_path / "gpu-args").read_text().split()[-2:] == ["-i", "1"]  # the server's GPU, not the others


def test_served_soak_with_in_band_cancellations_passes_under_supervision(tiny_models, tmp_path):
    """The whole served soak through the real tritonserver, as the README and gpu.sh run it: a third of the requests
    stream from the twin and are stopped in band after two tokens; the server runs under the launcher's supervisor.
    Oracle: its report (every request answered or cancelled, none failed, no restart) and the server's own
    statistics, which soak.py adds to the failures. A wrong --cancel-mode is refused with argparse's message."""
    import json

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "benchmarks.soak", "--model", "gpt2_int8", "--hdf5", str(tiny_models.int8),
           "--minutes", "0.4", "--concurrency", "4", "--cancel-fraction", "0.3", "--max-new-tokens", "4,8",
           "--prompts", "builtin", "--warmup", "10", "--tokenizer", str(tiny_models.tokenizer), "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "soak.json").read_text())
    d = report["details"]
    assert report["requests_failed"] == 0 and report["requests_hung"] == 0, d["errors"]
    assert report["requests_ok"] > 0 and report["requests_cancelled"] > 0
    assert d["cancel_mode"] == "in-band" and d["server_restarts"] == [] and d["server_failed"] == 0
    bad = subprocess.run(cmd[:3] + ["--cancel-mode", "polite"], cwd=root, env=env, capture_output=True, text=True,
                         timeout=60)
    assert bad.returncode == 2 and "invalid choice: 'polite'" in bad.stderr, bad.stderr[-500:]


def test_fault_injection_soak_loses_no_request(tiny_models, tmp_path):
    """Issue 28: --faults for about a minute through the real tritonserver under the launcher's supervision: good
    and broken publishes, a kill -9 of a model process, a drain + stop + start on the same ports. Oracle: the
    report's classification (every failed request overlaps a fault's window with a server status: none lost, none
    hung), every kind injected and recovered from, and the server answering at the end."""
    import json

    root = Path(__file__).resolve().parents[1]
    kinds = ["publish", "broken", "kill-model", "sigterm"]
    cmd = [sys.executable, "-m", "benchmarks.soak", "--model", "gpt2_int8", "--hdf5", str(tiny_models.int8),
           "--minutes", "1", "--concurrency", "3", "--max-new-tokens", "4,8", "--prompts", "builtin",
           "--warmup", "10", "--tokenizer", str(tiny_models.tokenizer), "--out", str(tmp_path),
           "--faults", ",".join(kinds), "--fault-every", "4", "--seed", "1"]
    proc = subprocess.run(cmd, cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True,
                          text=True, timeout=900)
    report = json.loads((tmp_path / "soak.json").read_text())
    f = report["details"]["faults"]
    assert f["lost"] == 0 and report["requests_hung"] == 0, f["lost_requests"]
    assert all(f["per_kind"][k]["faults"] >= 1 for k in kinds), f["per_kind"]
    assert f["serves_at_end"] and f["all_recovered"] and report["requests_ok"] > 0, f["events"]
    assert proc.returncode == 0 and report["passed"], proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "| sigterm |" in (tmp_path / "soak.md").read_text()
