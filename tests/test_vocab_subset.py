"""lsgpt/training/vocab_subset.py, the demo's training over the tokens its corpus uses: `subset` then `expand`.

Oracle: the subset model itself. Expanded to the full vocabulary, the model must give, at every position, the
subset model's logits at the full ids of the subset's tokens (same rows of the tied embedding, moved), and the
[PAD] row's logit at every token the corpus never uses; the expanded checkpoint loads as an ordinary GPT-2 of
the full vocabulary. Bad input: a checkpoint that does not match the subset is refused with a one-line error."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_VOCAB
from transformers import GPT2Config, GPT2LMHeadModel

from lsgpt.text import encode_paragraph, load_tokenizer
from lsgpt.training.vocab_subset import expand, make_subset

TEXT = ["我今天很开心，我要找个男朋友。", "这是中大的人，不在上来。", "我今天要找人。", "这是我的男朋友，很开心。"]


def test_expanded_model_predicts_as_the_subset_model(tiny_models, tmp_path):
    corpus = tmp_path / "train.txt"
    corpus.write_text("\n".join(TEXT * 20) + "\n", encoding="utf-8")
    info = make_subset(str(tiny_models.tokenizer), str(corpus), tmp_path / "subset")
    full_ids = json.loads((tmp_path / "subset" / "full_ids.json").read_text())
    assert info["tokens"] == len(full_ids) < len(TINY_VOCAB)  # the Latin words and '##' pieces are unused
    assert full_ids[:5] == [0, 1, 2, 3, 4]  # the special tokens stay, in place

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(full_ids), n_positions=32,
                     bos_token_id=2, eos_token_id=3, pad_token_id=0)
    small = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # a [PAD] row unlike the others, so that its copies are recognisable
        small.transformer.wte.weight[0] = torch.linspace(-1, 1, 32)
    small.save_pretrained(tmp_path / "small")
    metrics = expand(tmp_path / "small", str(tiny_models.tokenizer), tmp_path / "subset", str(corpus),
                     tmp_path / "full")
    big = GPT2LMHeadModel.from_pretrained(tmp_path / "full").eval()
    assert big.config.vocab_size == len(TINY_VOCAB) and metrics["vocab_subset_tokens"] == len(full_ids)
    assert (tmp_path / "full" / "vocab.txt").read_text(encoding="utf-8").split() == TINY_VOCAB

    full_tok = load_tokenizer(str(tiny_models.tokenizer))
    x_full = torch.tensor([encode_paragraph(full_tok, TEXT[0])])
    x_sub = torch.tensor([[full_ids.index(t) for t in x_full[0].tolist()]])
    with torch.no_grad():
        want, got = small(x_sub).logits[0], big(x_full).logits[0]
    torch.testing.assert_close(got[:, full_ids], want, rtol=0, atol=1e-5)  # same arithmetic, columns moved
    unused = [i for i in range(len(TINY_VOCAB)) if i not in full_ids]
    torch.testing.assert_close(got[:, unused], want[:, :1].expand(-1, len(unused)), rtol=0, atol=1e-5)


def test_expand_refuses_a_checkpoint_of_another_vocabulary(tiny_models, tmp_path):
    corpus = tmp_path / "train.txt"
    corpus.write_text("\n".join(TEXT * 20) + "\n", encoding="utf-8")
    make_subset(str(tiny_models.tokenizer), str(corpus), tmp_path / "subset")
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(TINY_VOCAB), n_positions=32)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "full_vocab_model")
    with pytest.raises(SystemExit, match="embedding has .* rows, the subset .* tokens"):
        expand(tmp_path / "full_vocab_model", str(tiny_models.tokenizer), tmp_path / "subset", str(corpus),
               tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written
