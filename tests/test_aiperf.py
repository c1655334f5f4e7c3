"""The LLM load test by NVIDIA's aiperf (benchmarks/llm_aiperf.py, `make loadtest LOADTEST_ARGS=--aiperf`).

Oracles: the load's stated bounds (lengths in their spans, prompt + new within the model) and a real aiperf 0.13.0 export
(tests/oracles/, from a run against our OpenAI frontend, numbers read off by hand). The run through the real
server, frontend and aiperf needs .venv-aiperf (made by the script's first run, with the network), so it skips
where that is missing (CI); no timing is asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXPORT = ROOT / "tests" / "oracles" / "aiperf-0.13.0-profile_export_aiperf.json"


def test_mixed_load_lengths_stay_in_their_spans_and_fit_the_model():
    """common.llm_requests (the load of loadtest.py --llm and of aiperf): prompt lengths and max_new_tokens in their
    spans, prompt + new within max_step, [CLS] once at the start, the rest a real prompt's tokens in order."""
    from benchmarks.common import llm_requests

    rows = [[101, 11, 12, 13], [101, 21, 22]]
    for max_step in (1024, 48):
        reqs = llm_requests(rows, (4, 64), (16, 256), max_step, n=200, seed=3)
        assert len(reqs) == 200
        for i, (ids, new) in enumerate(reqs):
            body = rows[i % 2][1:]
            assert ids[0] == 101 and 101 not in ids[1:]
            assert ids[1:] == [body[k % len(body)] for k in range(len(ids) - 1)]
            assert len(ids) + new <= max_step - 1 and new >= 1
            if max_step == 1024:
                assert 4 <= len(ids) <= 64 and 16 <= new <= 256
        if max_step == 1024:  # both spans are covered, not one corner
            assert min(len(r) for r, _ in reqs) < 12 and max(len(r) for r, _ in reqs) > 56
            assert min(n for _, n in reqs) < 48 and max(n for _, n in reqs) > 224


def test_summary_of_a_real_aiperf_export_splits_cancelled_from_failed():
    from benchmarks.llm_aiperf import summarize

    export = json.loads(EXPORT.read_text())
    row = summarize("gpt2_int8", 4, export)
    assert (row["requests_ok"], row["cancelled"], row["failed"]) == (14, 2, 0)
    assert row["output_tokens_per_s"] == 438.31 and row["requests_per_s"] == 5.78
    assert (row["ttft_p50_ms"], row["ttft_p95_ms"], row["ttft_p99_ms"]) == (62.61, 183.76, 194.46)
    assert (row["itl_p50_ms"], row["itl_p95_ms"]) == (6.56, 7.17)
    assert (row["latency_p50_ms"], row["latency_p95_ms"], row["latency_p99_ms"]) == (580.0, 928.58, 999.56)
    export["error_summary"].append({"error_details": {"code": 500, "type": "HTTPError", "message": "boom"}, "count": 3})
    assert summarize("gpt2_int8", 4, export)["failed"] == 3


@pytest.mark.parametrize("args, says", [
    (["--cancel-pct", "150"], "--cancel-pct takes 0 to 99"),
    (["--concurrency", "4,x"], "--concurrency takes"),
    (["--aiperf", "/nonexistent/aiperf"], "no such file"),
    (["--openai-url", "http://127.0.0.1:1"], "no OpenAI API answers at http://127.0.0.1:1"),
])
def test_a_wrong_flag_is_one_clear_error(args, says, tmp_path):
    r = subprocess.run([sys.executable, "-m", "benchmarks.llm_aiperf", *args, "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "benchmarks.loadtest", "--aiperf", "--url", "localhost:1"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--openai-url" in r.stderr, r.stderr[-2000:]


@pytest.mark.skipif(not (ROOT / ".venv-aiperf" / "bin" / "aiperf").is_file(),
                    reason="aiperf is not installed here (python -m benchmarks.llm_aiperf makes .venv-aiperf)")
def test_aiperf_through_the_real_server_and_openai_frontend(tmp_path):
    """make loadtest LOADTEST_ARGS="--aiperf --quick" on a tiny random GPT-2 over the real vocabulary (its text
    is what aiperf counts; the 8-entry test vocabulary decodes to nothing): aiperf streams from our OpenAI API in
    front of the real tritonserver, a share of the requests cancelled; every request is accounted for, none failed."""
    import shutil

    repo = tmp_path / "repo"  # the configs alone: the script serves a fresh tiny random GPT-2 (loadtest's way)
    for cfg in (ROOT / "model_repository").glob("*/config.pbtxt"):
        (repo / cfg.parent.name).mkdir(parents=True)
        shutil.copy(cfg, repo / cfg.parent.name / cfg.name)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "benchmarks.loadtest", "--aiperf", "--quick", "--model-repository",
                        str(repo), "--concurrency", "2",
                        "--llm-prompt-tokens", "4,16", "--llm-new-tokens", "8,32", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    report = json.loads((out / "aiperf.json").read_text())
    assert [(p["model"], p["concurrency"]) for p in report["points"]] == [("gpt2", 2), ("gpt2_int8", 2)]
    for p in report["points"]:
        assert p["failed"] == 0 and p["requests_ok"] > 0
        assert p["requests_ok"] + p["cancelled"] == 16  # --quick: 16 requests a level
        assert p["output_tokens_per_s"] > 0 and p["mean_output_tokens"] <= 32
    assert (out / "aiperf.csv").read_text().startswith("model,concurrency,")
    assert (out / "gpt2-c2" / "profile_export_aiperf.json").is_file()
