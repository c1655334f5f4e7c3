"""Shared fixtures (keep this file small): a tiny exported GPT-2 (fp16 + int8) with its vocabulary."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

# A BERT-style vocabulary small enough for a fast model, with CJK characters, Latin words and '##' pieces
# so that detokenization (CJK joining, word spacing) is exercised. [SEP] (id 3) is EOS.
TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("我今天很开心要找个男朋友，。的是了不在有人这中大为上来") + [
    "hello", "world", "the", "model", "##s", "##ing", "##ed", "a", "b", "1", "2", ",", ".", "!", "?",
]
CALIBRATION_TEXT = "我今天很开心，hello world.\n我要找个男朋友。the models\n这是中大的人，不在上来。\n"


@dataclass(frozen=True)
class TinyModels:
    tokenizer: Path  # a folder holding vocab.txt
    fp16: Path
    int8: Path
    eos_id: int
    max_step: int


def make_tiny_gpt2(seed: int):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=len(TINY_VOCAB), n_positions=128,
                     bos_token_id=2, eos_token_id=3, pad_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> TinyModels:
    from lsgpt.export.convert import export_model

    d = tmp_path_factory.mktemp("tiny_gpt2")
    (d / "tok").mkdir()
    (d / "tok" / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n")
    # also beside the files, as a published version folder has it: an in-process Engine.load of them then knows
    # the vocabulary's non-text special tokens and suppresses them, as the served model does
    (d / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n")
    (d / "calib.txt").write_text(CALIBRATION_TEXT)
    model = make_tiny_gpt2(seed=0)
    fp16 = export_model(model, d / "fp16.hdf5", max_step=64, eos_id=3)
    int8 = export_model(model, d / "int8.hdf5", max_step=64, eos_id=3, quantize=True,
                        calibrate_text=d / "calib.txt", tokenizer=d / "tok")
    return TinyModels(d / "tok", fp16, int8, eos_id=3, max_step=64)


def make_repository(dst: Path, tiny: TinyModels) -> Path:
    """A copy of model_repository/'s tracked files (configs, version 1) with the tiny models published."""
    import shutil

    from lsgpt.repository import publish

    src = Path(__file__).resolve().parent.parent / "model_repository"
    for cfg in src.glob("*/config.pbtxt"):
        (dst / cfg.parent.name / "1").mkdir(parents=True)
        shutil.copy(cfg, dst / cfg.parent.name / "config.pbtxt")
        for f in (cfg.parent / "1").glob("*.py"):
            shutil.copy(f, dst / cfg.parent.name / "1" / f.name)
    publish(tiny.fp16, dst, "gpt2", tokenizer=tiny.tokenizer)
    publish(tiny.int8, dst, "gpt2_int8", tokenizer=tiny.tokenizer)
    return dst


def scrape_metrics(server) -> dict[str, float]:
    """Triton's /metrics (Prometheus text) of a running lsgpt.serving.launcher.TritonServer as {'name{labels}': value}."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out
