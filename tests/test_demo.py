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
    for model, folder in (("gpt2", "fp16"), ("gpt2_int8", "int8")):
        s = summary[model]
        assert s["served_equals_in_process"], s  # the demo's own check: text through gRPC == the engine in process
        # and an independent one: the article's generate CLI, in a fresh process, on the exported file
        cli = subprocess.run([sys.executable, "client/generate.py", "-m", str(tmp_path / "model" / folder / "pytorch_model.hdf5"),
                              "-i", "我好难受", "-p", str(tmp_path / "data" / "tokenizer"), "--top-k", "1",
                              "--max-new-tokens", "8"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert cli.returncode == 0, cli.stderr[-2000:]
        assert [ln for ln in cli.stdout.splitlines() if ln.startswith("我好难受")] == [s["samples"]["我好难受"]], cli.stdout
        assert s["perplexity"] > 1
        assert s["samples"]["我好难受"].startswith("我好难受")
        assert s["loadtest"]["failed"] == 0 and s["loadtest"]["throughput"] > 0
    # the exported files are where the README says
    for path in ("model/fp16/pytorch_model.hdf5", "model/int8/pytorch_model.hdf5", "data/train.txt"):
        assert (tmp_path / path).is_file()
    assert any((repo / "gpt2_int8").glob("*/model.hdf5"))
    assert "perplexity (held-out)" in proc.stdout
