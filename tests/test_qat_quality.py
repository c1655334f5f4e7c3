"""benchmarks/qat_quality.py: its engine column (Engine.ppl of the exported file, aggregated by trainer_mean) is the
same measurement as its HF column (lsgpt.training.vocab_subset.heldout_loss of the checkpoint), on the same blocks.

Oracle: heldout_loss on the HF model the file was exported from (weights already fp16-exact, so the file holds
them unchanged and the CPU engine's fp32 forward is HF's). The corpus's held-out tail block is short and the
model's predictions are far from uniform, so a plain token mean instead of the Trainer's mean of per-batch means
misses by far more than the tolerance; the first-k-blocks case checks that both sides cut the same prefix."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_VOCAB
from transformers import GPT2Config, GPT2LMHeadModel

from benchmarks.qat_quality import trainer_mean
from lsgpt.engine.engine import Engine
from lsgpt.export.convert import export_model
from lsgpt.text import load_tokenizer
from lsgpt.training.train import DataTrainingArguments, build_datasets
from lsgpt.training.vocab_subset import heldout_loss

LINES = ["我今天很开心，我要找个男朋友。", "这是中大的人，不在上来。", "我今天要找人。", "这是我的男朋友，很开心。",
         "有人在这。"]


def test_engine_column_equals_heldout_loss(tiny_models, tmp_path):
    corpus = tmp_path / "train.txt"
    corpus.write_text("\n".join(LINES * 40) + "\n", encoding="utf-8")
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=len(TINY_VOCAB), n_positions=64,
                     initializer_range=0.3, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    model = GPT2LMHeadModel(cfg).half().float().eval()  # fp16-exact weights: the fp16 file holds them as they are
    model.loss_type = "ForCausalLM"
    hdf5 = export_model(model, tmp_path / "fp16.hdf5", max_step=64, eos_id=3)
    tok = load_tokenizer(tiny_models.tokenizer)
    block = 9
    _, val = build_datasets(DataTrainingArguments(train_file=str(corpus)), tok, block, main_process=True)
    assert len(val) > 8 and 2 < val.lengths[-1] < block  # two batches, the last one ending in a short block
    rows = [val.ids[i, : val.lengths[i]].tolist() for i in range(len(val))]
    nll = Engine.load(hdf5, "cpu").ppl(rows)
    counts = [len(r) - 1 for r in rows]

    want = heldout_loss(model, tok, str(corpus), block)
    assert trainer_mean(nll, counts) == pytest.approx(want, rel=1e-5)
    token_mean = sum(a * c for a, c in zip(nll, counts)) / sum(counts)
    assert abs(token_mean - want) > 1e-3 * want  # the aggregation is what is being checked
    k = 5
    assert trainer_mean(nll[:k], counts[:k]) == pytest.approx(heldout_loss(model, tok, str(corpus), block,
                                                                            max_blocks=k), rel=1e-5)


def test_continue_handover_lr_is_the_trainers_cosine_at_step_n():
    """--handover continue starts QAT at the learning rate the fp16 N+M run had at step N. Oracle: transformers'
    own cosine schedule (what train.py's --lr_scheduler_type cosine builds)."""
    from transformers import get_cosine_schedule_with_warmup

    from benchmarks.qat_quality import cosine_lr

    peak, warmup, total = 3e-4, 60, 800
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = get_cosine_schedule_with_warmup(opt, warmup, total)
    for step in range(total + 1):
        assert cosine_lr(peak, warmup, total, step) == pytest.approx(sched.get_last_lr()[0], rel=1e-9, abs=1e-15)
        opt.step()
        sched.step()


def test_continue_handover_refuses_its_own_qat_lr(tmp_path, capsys):
    """--handover continue takes QAT's learning rate from the fp16 schedule; a --qat-lr beside it is refused with a
    message, before anything is trained."""
    from benchmarks.qat_quality import main

    with pytest.raises(SystemExit) as e:
        main(["--shape", "cpu", "--handover", "continue", "--qat-lr", "1e-4", "--out", str(tmp_path / "o"),
              "--work", str(tmp_path / "w")])
    assert e.value.code == 2 and "--qat-lr: with --handover continue" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
