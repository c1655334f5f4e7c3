"""The CPU side of issue 31's stretch (tests/lightseq_gpu/): cuda13.patch and hopper_int8.patch still apply to the installed
lightseq wheel's sources, and agreement.py's comparison runs end to end with our own greedy tokens in LightSeq's
place (--stand-in). LightSeq itself runs on the GPU machine only (tests/lightseq_gpu/README.md)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from oracles import lightseq_src as LS

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "tests" / "lightseq_gpu"


def test_patches_apply(tmp_path):
    proto = LS.lightseq_proto_dir()
    if proto is None or shutil.which("patch") is None:
        pytest.skip("needs lightseq==3.0.1 (scripts/setup.sh) and patch")
    for part in ("kernels", "model", "proto", "tools"):
        shutil.copytree(proto.parent / part, tmp_path / part)
    for name in ("cuda13.patch", "hopper_int8.patch"):  # in the Makefile's order
        with open(HERE / name) as p:
            proc = subprocess.run(["patch", "-p1", "-d", str(tmp_path), "--no-backup-if-mismatch"], stdin=p,
                                  capture_output=True, text=True)
        assert proc.returncode == 0, name + ": " + proc.stdout + proc.stderr
    assert "#include <functional>" in (tmp_path / "tools" / "util.h").read_text()
    assert (tmp_path / "model" / "quant_gpt_encoder.cc.cu").read_text().count("lsgpt_sm90()") == 11


def test_agreement_stand_in(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    proc = subprocess.run([sys.executable, str(HERE / "agreement.py"), "compare", "--stand-in", "--models", "small",
                           "--prompts", "2", "--new", "8", "--out", str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "lightseq_agreement.json").read_text())
    assert [(r["model"], r["kind"]) for r in report["results"]] == [("small", "fp16"), ("small", "int8")]
    assert report["steps"] > 0 and report["overall_agree"] == 1.0  # our tokens, our engine: every step agrees
    for r in report["results"]:
        assert all(len(row) >= 16 for row in r["rows"]) and r["ours"]["ppl_max_rel_diff"] < 1e-6
