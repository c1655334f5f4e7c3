"""Smoke run of -m benchmarks.loadtest: real tritonserver, real perf_analyzer over gRPC, tiny models.

No timing assertions (performance is measured by the scripts): only that every request succeeded and that
perf_analyzer's CSV parses with a positive throughput for both served models.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_VOCAB, make_repository

ROOT = Path(__file__).resolve().parent.parent


def _perf_analyzer_or_skip() -> None:
    from benchmarks.common import BenchError, find_perf_analyzer

    try:
        find_perf_analyzer()
    except BenchError as e:
        pytest.skip(str(e))
    try:
        from lsgpt.serving.launcher import LaunchError, find_tritonserver

        find_tritonserver()
    except LaunchError as e:
        pytest.skip(str(e))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_loadtest_quick_smoke(tiny_models, tmp_path):
    _perf_analyzer_or_skip()
    repo = make_repository(tmp_path / "repo", tiny_models)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "benchmarks.loadtest", "--quick", "--model-repository", str(repo),
           "--tokenizer", str(tiny_models.tokenizer), "--prompts", "builtin", "--concurrency", "1,2",
           "--request-rates", "5", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    report = json.loads((out / "loadtest.json").read_text())
    assert report["models"] == ["gpt2", "gpt2_int8"]
    assert report["served"].startswith("repository"), report["served"]
    assert report["failed_requests"] == 0 and report["errors"] == []
    points = report["points"]
    assert {(p["model"], p["mode"], p["value"]) for p in points} == {
        (m, mode, v) for m in ("gpt2", "gpt2_int8") for mode, v in (("concurrency", 1), ("concurrency", 2),
                                                                     ("request_rate", 5))
    }
    for p in points:
        assert p["failed"] == 0 and p["ok"] > 0 and p["returncode"] == 0, p
        with open(out / p["csv"], newline="") as f:
            rows = list(csv.DictReader(f))
        assert rows, p["csv"]
        assert float(rows[-1]["Inferences/Second"]) > 0
        assert float(rows[-1]["p95 latency"]) > 0
        assert p["throughput"] == pytest.approx(float(rows[-1]["Inferences/Second"]))

    # perf_analyzer sent the real tokenized prompts: [CLS] text, ids inside the tiny vocabulary.
    data = json.loads((out / "input_data.json").read_text())["data"]
    assert data[0]["token_ids"]["content"][0] == 2  # the tiny vocabulary's [CLS]
    assert all(max(d["token_ids"]["content"]) < len(TINY_VOCAB) and d["max_new_tokens"] == [8] for d in data)
    if (out / "loadtest_concurrency.png").exists():  # matplotlib installed
        assert (out / "loadtest_concurrency.png").stat().st_size > 0


def test_venv_perf_analyzer_runs_as_is():
    """What a tritonclient user reaches for: `.venv/bin/perf_analyzer` with no environment set up by us."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pa = Path(sys.executable).parent / "perf_analyzer"
    if not pa.exists():
        pytest.skip("perf_analyzer not installed beside this interpreter (not the project's .venv)")
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    proc = subprocess.run([str(pa), "--help"], capture_output=True, text=True, timeout=60, env=env)
    out = proc.stdout + proc.stderr
    assert "error while loading shared libraries" not in out and "cannot open shared object" not in out, out[-500:]
    assert "SYNOPSIS" in out or "Usage" in out, out[-500:]


def test_loadtest_user_mistakes_get_one_line_errors_and_write_nothing(tmp_path):
    """A missing prompts file or a --url where no server answers: exit 2 with one line, before any work."""
    _perf_analyzer_or_skip()
    from lsgpt.serving.launcher import free_port

    for args in (["--prompts", str(tmp_path / "missing.txt")], ["--url", f"127.0.0.1:{free_port()}"]):
        out = tmp_path / "out"
        proc = subprocess.run([sys.executable, "-m", "benchmarks.loadtest", "--quick", *args, "--out", str(out)],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr and proc.stderr.startswith("loadtest: error:"), proc.stderr
        assert not out.exists(), "nothing is written for a refused run"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_llm_load_test_matches_the_engine(tiny_models, tmp_path):
    """`loadtest.py --llm --quick`: perf_analyzer --streaming on the twins under the mixed load; every streamed
    request's tokens equal the engine's greedy continuation of that request (so the TTFT / ITL / tokens/s summary
    counts real tokens), and the summary agrees with the raw profile export."""
    _perf_analyzer_or_skip()
    from lsgpt.engine.engine import Engine, SamplingParams

    repo = make_repository(tmp_path / "repo", tiny_models)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "benchmarks.loadtest", "--llm", "--quick", "--model-repository",
           str(repo), "--tokenizer", str(tiny_models.tokenizer), "--prompts", "builtin", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "llm.json").read_text())
    assert report["models"] == ["gpt2_stream", "gpt2_int8_stream"]
    lengths = [len(r["token_ids"]["content"]) for r in report["requests"]]
    news = [r["max_new_tokens"][0] for r in report["requests"]]
    assert min(lengths) >= 2 and len(set(lengths)) > 1 and len(set(news)) > 1  # a mixed load
    assert all(n + k < tiny_models.max_step for n, k in zip(lengths, news))
    engines = {"gpt2_stream": Engine.load(tiny_models.fp16, device="cpu"),
               "gpt2_int8_stream": Engine.load(tiny_models.int8, device="cpu")}
    for point in report["points"]:
        prof = json.loads((out / f"{point['model']}_c{point['concurrency']}_profile.json").read_text())
        reqs = prof["experiments"][-1]["requests"]
        assert point["requests"] == len(reqs) > 0
        assert point["output_tokens"] == sum(len(r["response_timestamps"]) - 1 for r in reqs)
        assert 0 < point["ttft_p50_ms"] <= point["latency_p50_ms"] and point["itl_p50_ms"] > 0
        eng = engines[point["model"]]
        for r in reqs[:8]:
            ids, k = r["request_inputs"]["token_ids"], r["request_inputs"]["max_new_tokens"]
            want = eng.generate([ids], SamplingParams(max_new_tokens=k, top_k=1))[0][len(ids):]
            got = [o["result"] for o in r["response_outputs"][:-1]]
            assert got == want, (point["model"], ids, k)
    with open(out / "llm.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(report["points"]) == 4
