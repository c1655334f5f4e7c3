"""Train over the part of the vocabulary a corpus uses, then give the checkpoint back the full vocabulary.

A small GPT-2 (the demo's: 4 layers, 128 wide) spends most of a CPU training step in the tied embedding and
the softmax over the 21128-entry Chinese BERT vocabulary (the matmul, the log-softmax over [batch, block, 21128]
logits, and AdamW over 2.7 M embedding weights). A corpus of a few hundred thousand characters uses about
5,000 of those tokens; the other 16,000 are never a target, and training only pushes their logits down. So:

  subset   the tokens the corpus uses (and the five special tokens), in vocabulary order, as a tokenizer of
           their own (`vocab.txt` + `full_ids.json`: subset id -> full id). It tokenizes the corpus exactly as
           the full tokenizer does (checked: WordPiece's longest match only ever picks pieces the corpus uses).
  (train)  training/train.py with --tokenizer_name <subset folder>: a much smaller softmax, embedding and AdamW.
  expand   a checkpoint trained over the subset (fp16, or QAT with its clips) -> the same model over the full
           vocabulary: row full_ids[i] of the embedding is subset row i; every token the corpus never uses gets
           the row of [PAD], which is never a target either, so training gave it the low logit an unused token
           earns (their next-token probability after
           我好难受 is reported). config ids, tokenizer files and vocab.txt are the full
           vocabulary's, so export, serving and clients see an ordinary checkpoint. The held-out perplexity is
           measured again over the full vocabulary and written to metrics.json (`perplexity`), next to the
           subset's.

  python lsgpt/training/vocab_subset.py subset --tokenizer data/tokenizer --train_file data/train.txt --out model/subset/tokenizer
  python training/train.py --tokenizer_name model/subset/tokenizer ... --output_dir model/subset/fp16
  python lsgpt/training/vocab_subset.py expand --model model/subset/fp16 --tokenizer data/tokenizer \\
      --subset model/subset/tokenizer --train_file data/train.txt --out model/fp16
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from lsgpt.text import encode_paragraph, load_tokenizer

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
WTE = "transformer.wte.weight"
HEAD = "lm_head.weight"


def _encode_all(tok, lines: list[str]) -> list[list[int]]:
    max_len, tok.model_max_length = tok.model_max_length, int(1e12)  # paragraphs are long; blocks are not
    try:
        return [encode_paragraph(tok, t) for t in lines]
    finally:
        tok.model_max_length = max_len


def make_subset(tokenizer: str, train_file: str, out: Path) -> dict:
    """The subset tokenizer of the tokens train_file uses; checks it tokenizes the file as the full one does."""
    from transformers import BertTokenizerFast

    from lsgpt.training.train import read_paragraphs

    full = load_tokenizer(tokenizer)
    lines = read_paragraphs(train_file)
    enc = _encode_all(full, lines)
    used = set(full.convert_tokens_to_ids(list(SPECIALS)))
    for ids in enc:
        used.update(ids)
    full_ids = sorted(used)
    inv = {i: t for t, i in full.get_vocab().items()}
    tokens = [inv[i] for i in full_ids]
    sub = BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=False,
                            tokenize_chinese_chars=True, strip_accents=False,
                            model_max_length=full.model_max_length)
    remap = np.array(full_ids)
    if any(remap[s].tolist() != f for s, f in zip(_encode_all(sub, lines), enc)):
        raise SystemExit("error: the subset tokenizer does not tokenize the corpus as the full one does")
    out.mkdir(parents=True, exist_ok=True)
    sub.save_pretrained(str(out))
    (out / "vocab.txt").write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
    (out / "full_ids.json").write_text(json.dumps(full_ids))
    info = {"subset": str(out), "tokens": len(full_ids), "full_vocab": len(full),
            "corpus_tokens": sum(map(len, enc))}
    print(json.dumps(info))
    return info


@torch.no_grad()
def heldout_loss(model, tok, train_file: str, block: int, batch: int = 8, max_blocks: int | None = None) -> float:
    """train.py's held-out loss: its validation blocks (the first `max_blocks` of them if given), the Trainer's
    mean of per-batch losses, computed on the device the model is on."""
    from lsgpt.training.train import DataTrainingArguments, build_datasets

    _, val = build_datasets(DataTrainingArguments(train_file=train_file), tok, block, main_process=True)
    n = len(val) if max_blocks is None else min(max_blocks, len(val))
    dev = next(model.parameters()).device
    model.eval()
    losses, sizes = [], []
    for i in range(0, n, batch):
        rows = [val[j] for j in range(i, min(i + batch, n))]
        x = torch.stack([r["input_ids"] for r in rows]).to(dev)
        y = torch.stack([r["labels"] for r in rows]).to(dev)
        mask = torch.stack([r["attention_mask"] for r in rows]).to(dev)
        losses.append(model(input_ids=x, attention_mask=mask, labels=y).loss.item())
        sizes.append(len(rows))
    return float(np.average(losses, weights=sizes))


def _load(folder: Path):
    from transformers import GPT2LMHeadModel

    from lsgpt.training.qat import CONFIG_FLAG, QuantGPT2LMHeadModel

    cfg = json.loads((folder / "config.json").read_text())
    if cfg.get(CONFIG_FLAG):
        model = QuantGPT2LMHeadModel.from_pretrained(str(folder))
        model.set_quant(True)
    else:
        model = GPT2LMHeadModel.from_pretrained(str(folder))
    model.loss_type = "ForCausalLM"
    return model




def expand(model_dir: Path, tokenizer: str, subset: Path, train_file: str, out: Path) -> dict:
    from safetensors.torch import load_file, save_file

    full = load_tokenizer(tokenizer)
    full_ids = torch.tensor(json.loads((subset / "full_ids.json").read_text()))
    pad = full_ids.tolist().index(full.pad_token_id)
    weights = load_file(str(model_dir / "model.safetensors"))
    wte = weights[WTE]
    if wte.shape[0] != len(full_ids):
        raise SystemExit(f"error: {model_dir}: embedding has {wte.shape[0]} rows, the subset {len(full_ids)} tokens")
    big = wte[pad].repeat(len(full), 1)
    big[full_ids] = wte
    weights[WTE] = big
    weights.pop(HEAD, None)  # tied: the head is the embedding
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["vocab_size"] = len(full)
    ids = {"eos_token_id": full.sep_token_id, "bos_token_id": full.cls_token_id, "pad_token_id": full.pad_token_id}
    cfg.update(ids)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        (out / "generation_config.json").write_text(json.dumps({**json.loads(gen.read_text()), **ids}, indent=2))
    full.save_pretrained(str(out))
    vocab = sorted(full.get_vocab().items(), key=lambda kv: kv[1])
    (out / "vocab.txt").write_text("".join(t + "\n" for t, _ in vocab), encoding="utf-8")

    # Held-out perplexity again, over the full vocabulary, and the mass the unused tokens get.
    block = cfg["n_positions"]
    metrics = json.loads((model_dir / "metrics.json").read_text()) if (model_dir / "metrics.json").is_file() else {}
    sub_loss = metrics.get("eval_loss")
    if sub_loss is None:
        sub_loss = heldout_loss(_load(model_dir), load_tokenizer(subset), train_file, block)
    model = _load(out)
    loss = heldout_loss(model, full, train_file, block)
    x = torch.tensor([_encode_all(full, ["我好难受"])[0][:-1]])
    with torch.no_grad():
        probs = model(input_ids=x).logits[0, -1].float().softmax(-1)
    unused = torch.ones(len(full), dtype=torch.bool)
    unused[full_ids] = False
    metrics.update({
        "vocab_subset_tokens": len(full_ids),
        "subset_eval_loss": sub_loss, "subset_perplexity": math.exp(min(sub_loss, 50.0)),
        "eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "perplexity": math.exp(min(loss, 50.0)),
        "unused_tokens_probability": float(probs[unused].sum()),
        "expanded_from": str(model_dir),
    })
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"held-out perplexity over the full vocabulary: {metrics['perplexity']:.3f} "
          f"(over the {len(full_ids)}-token subset: {metrics['subset_perplexity']:.3f}; "
          f"the {int(unused.sum())} unused tokens after 我好难受: p={metrics['unused_tokens_probability']:.2e} together)", flush=True)
    return metrics


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("subset", help="the tokenizer of the tokens a corpus uses")
    s.add_argument("--tokenizer", required=True)
    s.add_argument("--train_file", required=True)
    s.add_argument("--out", type=Path, required=True)
    e = sub.add_parser("expand", help="a subset checkpoint -> the full vocabulary")
    e.add_argument("--model", type=Path, required=True)
    e.add_argument("--tokenizer", required=True)
    e.add_argument("--subset", type=Path, required=True)
    e.add_argument("--train_file", required=True)
    e.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    if args.cmd == "subset":
        make_subset(args.tokenizer, args.train_file, args.out)
    else:
        expand(args.model, args.tokenizer, args.subset, args.train_file, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
