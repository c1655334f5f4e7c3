"""The main job (scripts/demo.py, what `make demo` runs) end to end in its reduced size: the same code path
— corpus, fp16 training, int8 QAT, export into a model repository, the real tritonserver, gRPC generation
through the client library, a perf_analyzer run — with fewer steps."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def tracked_repository(dst: Path) -> Path:
    """model_repository/ as committed (configs + version 1 model.py), without anything a user published."""
    def ignore(folder: str, names: list[str]) -> list[str]:
        return [n for n in names if n.endswith(".hdf5") or n == "__pycache__" or (n.isdigit() and n != "1")]

    shutil.copytree(ROOT / "model_repository", dst, ignore=ignore)
    return dst


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
    repo = tracked_repository(tmp_path / "repo")
    cmd = [sys.executable, "scripts/demo.py", "--quick", "--data-dir", str(tmp_path / "data"),
           "--model-dir", str(tmp_path / "model"), "--repository", str(repo), "--results", str(tmp_path / "results")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    for model in ("gpt2", "gpt2_int8"):
        s = summary[model]
        assert s["served_equals_in_process"], s  # text through gRPC == the engine's own output, same request
        assert s["perplexity"] > 1
        assert s["samples"]["我好难受"].startswith("我好难受")
        assert s["loadtest"]["failed"] == 0 and s["loadtest"]["throughput"] > 0
    # the exported files are where the README says
    for path in ("model/fp16/pytorch_model.hdf5", "model/int8/pytorch_model.hdf5", "data/train.txt"):
        assert (tmp_path / path).is_file()
    assert any((repo / "gpt2_int8").glob("*/model.hdf5"))
    assert "perplexity (held-out)" in proc.stdout
