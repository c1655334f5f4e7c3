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
    """model_repository/ as committed (configs, LightSeq's empty version folders), without anything a user published."""
    def ignore(folder: str, names: list[str]) -> list[str]:
        return [n for n in names if n.endswith(".hdf5") or n == "__pycache__" or (n.isdigit() and n != "1")]

    shutil.copytree(ROOT / "model_repository", dst, ignore=ignore)
    return dst


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """`scripts/demo.py --quick` into a folder laid out like a checkout after `make demo` (data/, model/,
    model_repository/, results/), with the code folders linked in so the README's relative commands run there."""
    work = tmp_path_factory.mktemp("demo")
    tracked_repository(work / "model_repository")
    for d in ("training", "export", "client", "lsgpt", "scripts", "benchmarks"):
        (work / d).symlink_to(ROOT / d)
    cmd = [sys.executable, "scripts/demo.py", "--quick", "--data-dir", str(work / "data"), "--model-dir",
           str(work / "model"), "--repository", str(work / "model_repository"), "--results", str(work / "results")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work, proc


@pytest.mark.slow
def test_demo_quick_end_to_end(demo):
    tmp_path, proc = demo
    repo = tmp_path / "model_repository"
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    for model, folder in (("gpt2", "fp16"), ("gpt2_int8", "int8")):
        s = summary[model]
        assert s["served_equals_in_process"], s  # the demo's own check: text through gRPC == the engine in process
        # and an independent one: the article's generate CLI, in a fresh process, on the exported file
        sampling = [f"--{k.replace('_', '-')}={v}" for k, v in s["sampling"].items()]  # the demo's seeded sampling
        cli = subprocess.run([sys.executable, "client/generate.py", "-m", str(tmp_path / "model" / folder / "pytorch_model.hdf5"),
                              "-i", "我好难受", "-p", str(tmp_path / "data" / "tokenizer"), *sampling,
                              "--max-new-tokens", "8"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert cli.returncode == 0, cli.stderr[-2000:]
        assert [ln for ln in cli.stdout.splitlines() if ln.startswith("我好难受")] == [s["samples"]["我好难受"]], cli.stdout
        assert s["perplexity"] > 1
        assert 0 < s["distinct2"] <= 1 and 0 < s["distinct2_greedy"] <= 1
        assert s["samples"]["我好难受"].startswith("我好难受")
        assert s["loadtest"]["failed"] == 0 and s["loadtest"]["throughput"] > 0
    # the exported files are where the README says
    for path in ("model/fp16/pytorch_model.hdf5", "model/int8/pytorch_model.hdf5", "data/train.txt"):
        assert (tmp_path / path).is_file()
    assert any((repo / "gpt2_int8").glob("*/model.hdf5"))
    assert "perplexity (held-out)" in proc.stdout


# ---------------------------------------------------------------------------------------------------------
# The README as a contract: every command of its "next step" table, as written, on the demo's outputs.

SKIP = {  # why a README command does not run here; anything else must run and exit 0
    "torchrun": "the article's pretraining: 8 GPUs and the Hugging Face hub (no network here)",
    "make serve": "long-running; the same launcher is tested in test_docker (entrypoint) and test_serving",
    "make loadtest": "minutes of perf_analyzer; benchmarks/loadtest.py is tested in test_loadtest",
    "make bench": "minutes of benchmarks; not a promise about this machine's speed",
}
SHRINK = {  # documented options that make a command small, appended as a user would
    "python training/train.py": ["--max_steps", "2", "--block_size", "32", "--per_device_train_batch_size", "2"],
}


def readme_commands() -> list[tuple[str, str]]:
    """(row label, command) for every `python …` / `torchrun …` / `make …` in the README's next-step table."""
    import re

    rows, inside = [], False
    for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("| you want to | command |"):
            inside = True
            continue
        if inside and not line.startswith("|"):
            break
        if inside and not line.startswith("| ---"):
            label, cell = line.split("|")[1].strip(), "|".join(line.split("|")[2:])
            rows += [(label, c) for c in re.findall(r"`([^`]+)`", cell) if c.startswith(("python ", "torchrun ", "make "))]
    return rows


@pytest.mark.slow
def test_readme_next_step_commands_work_as_written(demo):
    import os
    import shlex

    from lsgpt.serving.launcher import TritonServer, free_port

    work, _ = demo
    commands = readme_commands()
    assert len(commands) >= 10, commands  # the table was found
    (work / "my.txt").write_text("\n".join((work / "data" / "train.txt").read_text(encoding="utf-8").splitlines()[:30]) + "\n",
                                 encoding="utf-8")  # "train on your own text": the user's file
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    ran, skipped = [], []
    server = None

    def demo_checkpoints():  # the demo's trained models (their HDF5 exports the README's export rows redo)
        return {f: f.read_bytes() for d in ("fp16", "int8") for f in (work / "model" / d).rglob("*")
                if f.is_file() and f.suffix != ".hdf5"}

    checkpoints = demo_checkpoints()
    try:
        for label, cmd in commands:
            reason = next((why for prefix, why in SKIP.items() if cmd.startswith(prefix)), None)
            if reason:
                skipped.append((cmd, reason))
                continue
            argv = shlex.split(cmd) + next((extra for prefix, extra in SHRINK.items() if cmd.startswith(prefix)), [])
            if "localhost:8001" in cmd:  # the documented server address: start one (free port) on the demo's repository
                if server is None:
                    server = TritonServer(work / "model_repository", grpc_port=free_port(), http_port=free_port(),
                                          metrics_port=free_port(), models=["gpt2", "gpt2_int8"])
                    server.start()
                    server.wait_ready()
                argv = [a.replace("localhost:8001", server.grpc_url) for a in argv]
            proc = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0 and "Traceback" not in proc.stderr, (label, cmd, proc.stderr[-2000:])
            ran.append(cmd)
    finally:
        if server is not None:
            server.stop()
    print("ran:", *ran, "skipped:", *(f"{c}  ({why})" for c, why in skipped), sep="\n  ")
    assert demo_checkpoints() == checkpoints  # issue 26: nothing the README runs replaces the demo's models
    assert any(c.startswith("python export/export.py") for c in ran) and any("--url" in c for c in ran)
