"""Train GPT-2 on one-paragraph-per-line text: fp16 pretraining, then int8 quantization-aware training.

A cut-down HF `run_clm` that accepts the commands of the article (ls-gpt2-demo), e.g.

  python3 -m torch.distributed.launch --nproc_per_node=8 training/train.py \\
      --model_name_or_path uer/gpt2-chinese-cluecorpussmall --train_file data/train.txt \\
      --per_device_train_batch_size 16 --per_device_eval_batch_size 8 --num_train_epochs 150 \\
      --learning_rate 1.5e-4 --output_dir model/fp16 --overwrite_output_dir --fp16 --logging_steps 10 \\
      --enable_quant false
  ... --output_dir model/int8 --resume_from_checkpoint model/fp16 --enable_quant true   (int8 QAT)

torchrun works the same way. Offline, from scratch:

  python training/train.py --tokenizer_name data/tokenizer --config_overrides n_layer=2,n_embd=128,n_head=4 \\
      --train_file data/train.txt --output_dir model/fp16 --num_train_epochs 1

Data: each non-blank line is a paragraph, encoded as [CLS] text [SEP] ([SEP] is the EOS the model learns),
concatenated and cut into --block_size blocks; the first --validation_split_percentage % of the lines are
held out. No token_type_ids reach the model (the demo's train/inference mismatch). Tokenized blocks are
cached (key: file content, tokenizer vocabulary, block size, split) under --data_cache_dir.

--resume_from_checkpoint DIR: a Trainer checkpoint of this kind of run (trainer_state.json + optimizer.pt,
same --enable_quant) resumes exactly where it stopped; anything else (a finished fp16 run, for QAT) only
provides the starting weights and the run trains its full number of epochs. QAT from an fp16 Trainer
checkpoint (checkpoint-N) also starts from its Adam moments (--carry_optimizer_state false: a fresh Adam).
Without the flag, a run that finds checkpoint-N folders in --output_dir (and no --overwrite_output_dir)
resumes from the last one.

--output_dir that already holds a model (config.json, weights, *.hdf5 exports, a Trainer state) and no checkpoint
to resume: the run stops with exit status 2 and one `error:` line (HF run_clm's rule), unless
--overwrite_output_dir, or --resume_from_checkpoint names that folder or a checkpoint in it (continuing that run
in place). A run that writes its model into a folder removes the *.hdf5 exports that were there before it: they
were made from weights it has just replaced.

Output (--output_dir): config.json (eos/bos/pad = [SEP]/[CLS]/[PAD]), model.safetensors (QAT: clips under
transformer.h.{i}.ls_clips.* and transformer.ls_clips.*), tokenizer files incl. vocab.txt, metrics.json.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

from lsgpt.text import encode_paragraph, load_tokenizer
from lsgpt.training import fasttrain
from lsgpt.training.qat import CONFIG_FLAG, QuantGPT2LMHeadModel, calibrate_clips

logger = logging.getLogger("train")
CACHE_VERSION = 1  # bump when the tokenization or the cache layout changes
DEFAULT_BLOCK = 500  # the demo's block size


class DataError(ValueError):
    """Unusable training data: the message names the file (and line)."""


class UsageError(ValueError):
    """A command that must not run as given (e.g. it would replace another model): one line, exit status 2."""


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "hub id or local folder of a GPT-2 checkpoint; omit to train from scratch"}
    )
    config_name: str | None = field(default=None, metadata={"help": "config (hub id/folder) for a new model"})
    config_overrides: str | None = field(
        default=None, metadata={"help": "new model: e.g. 'n_layer=2,n_embd=128,n_head=4,n_positions=256'"}
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "tokenizer folder, vocab.txt or hub id (default: the model's)"}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "hub download cache"})
    enable_quant: bool = field(default=False, metadata={"help": "int8 quantization-aware training (lsgpt.training.qat)"})
    fast_path: bool | None = field(
        default=None,
        metadata={"help": "training fast path (lsgpt.training.fasttrain: compiled fp16/QAT regions, fused AdamW, no per-step "
                  "host syncs); default: on where CUDA is. --fast_path false: the plain HF Trainer path"},
    )
    carry_optimizer_state: bool = field(
        default=True,
        metadata={"help": "QAT from an fp16 Trainer checkpoint (checkpoint-N, with optimizer.pt): start from its Adam "
                  "moments for the shared weights (false: a fresh Adam)"},
    )
    clip_init: str = field(
        default="calibrate",
        metadata={"help": "QAT from weights without clips (an fp16 checkpoint, or from scratch): 'calibrate' sets "
                  "each learned clip to max |x| at its clip point over --clip_calibration_batches training batches; "
                  "'fixed' keeps LightSeq's initial constants. Clips loaded from a QAT checkpoint are kept either way",
                  "choices": ["calibrate", "fixed"]},
    )
    clip_calibration_batches: int = field(
        default=8, metadata={"help": "--clip_init calibrate: training batches per process (quantizers off)"}
    )


@dataclass
class DataTrainingArguments:
    train_file: str = field(default=None, metadata={"help": "UTF-8 text, one paragraph per line (required)"})
    validation_split_percentage: int = field(default=5, metadata={"help": "percent of the lines (the first ones) held out"})
    block_size: int | None = field(default=None, metadata={"help": "tokens per block (default min(500, n_positions))"})
    data_cache_dir: str | None = field(
        default=None, metadata={"help": "tokenization cache (default: .lsgpt_cache beside the train file)"}
    )
    overwrite_cache: bool = field(default=False, metadata={"help": "re-tokenize even if a cache exists"})


@dataclass
class CompatArguments:
    """Flags the article uses that transformers 5 dropped from TrainingArguments."""

    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "start afresh even if --output_dir holds checkpoints of an earlier run"}
    )


# ---------------------------------------------------------------------------------------------
# Data.


def read_paragraphs(path: str | os.PathLike) -> list[str]:
    """Non-blank lines of a UTF-8 file; DataError names the file and line on any problem."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"training file not found: {p}")
    raw = p.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    out = []
    for n, line in enumerate(raw.split(b"\n"), 1):
        try:
            text = line.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            bad = line[e.start : e.start + 4]
            raise DataError(
                f"{p}:{n}: not valid UTF-8 (bytes {bad!r} at column {e.start + 1}); "
                "the training file must be UTF-8 text, one paragraph per line"
            ) from None
        if text:
            out.append(text)
    if not out:
        raise DataError(f"{p}: no text (the file is empty or has only blank lines)")
    return out


def split_lines(lines: list[str], percent: int) -> tuple[list[str], list[str]]:
    """The demo's split: validation = the first `percent` % of the lines, train = the rest."""
    if not 0 <= percent < 100:
        raise DataError(f"--validation_split_percentage must be in 0..99, got {percent}")
    n_val = math.ceil(len(lines) * percent / 100) if percent else 0
    if percent and len(lines) < 2:
        raise DataError(f"need at least 2 lines to hold out {percent}% for validation, got {len(lines)}")
    return lines[n_val:], lines[:n_val]


def to_blocks(seqs: list[list[int]], block: int, pad_id: int, keep_tail: bool) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate and cut into [N, block] blocks, plus the real length of each block.

    The tail shorter than a block is dropped (run_clm) unless keep_tail or there is no full block: then
    it is right-padded and its padding is excluded from the loss. Causal attention never lets a real
    token see the padding after it, so no attention mask is needed.
    """
    flat = np.fromiter((t for s in seqs for t in s), dtype=np.int32)
    n_full = len(flat) // block
    tail = len(flat) - n_full * block
    use_tail = tail > 0 and (keep_tail or n_full == 0)
    ids = np.full((n_full + use_tail, block), pad_id, dtype=np.int32)
    ids[:n_full] = flat[: n_full * block].reshape(n_full, block)
    lengths = np.full(n_full + use_tail, block, dtype=np.int32)
    if use_tail:
        ids[n_full, :tail] = flat[n_full * block :]
        lengths[n_full] = tail
    return ids, lengths


class BlockDataset(torch.utils.data.Dataset):
    """input_ids, attention_mask and labels (= input_ids, HF shifts; padding -> -100). No token_type_ids."""

    def __init__(self, ids: np.ndarray, lengths: np.ndarray):
        self.ids, self.lengths = ids, lengths

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        x = torch.from_numpy(self.ids[i].astype(np.int64))
        labels = x.clone()
        n = int(self.lengths[i])
        labels[n:] = -100
        mask = torch.ones_like(x)
        mask[n:] = 0
        return {"input_ids": x, "attention_mask": mask, "labels": labels}

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())


def _cache_key(path: str, tok, block: int, percent: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    meta = [CACHE_VERSION, type(tok).__name__, getattr(tok, "do_lower_case", None), block, percent, vocab]
    h.update(json.dumps(meta, ensure_ascii=False).encode())
    return h.hexdigest()[:20]


def build_datasets(
    data_args: DataTrainingArguments, tok, block: int, main_process: bool, lines: list[str] | None = None
) -> tuple[BlockDataset, BlockDataset | None]:
    """Read, split, tokenize and block the text, through a cache shared by runs (and ranks)."""
    from tqdm.auto import tqdm

    path = data_args.train_file
    if not Path(path).is_file():
        raise DataError(f"training file not found: {path}")
    cache_dir = Path(data_args.data_cache_dir or Path(path).resolve().parent / ".lsgpt_cache")
    cache = cache_dir / f"{Path(path).stem}-{_cache_key(path, tok, block, data_args.validation_split_percentage)}.npz"
    if cache.is_file() and not data_args.overwrite_cache:
        logger.info("tokenized data from cache %s", cache)
        z = np.load(cache)
    else:
        lines = lines if lines is not None else read_paragraphs(path)
        train_lines, val_lines = split_lines(lines, data_args.validation_split_percentage)
        max_len, tok.model_max_length = tok.model_max_length, int(1e12)  # paragraphs may exceed it; blocks don't
        try:
            enc = [
                encode_paragraph(tok, t)
                for t in tqdm(lines, desc=f"tokenizing {Path(path).name}", unit="line", disable=not main_process)
            ]
        finally:
            tok.model_max_length = max_len
        n_val = len(val_lines)
        tr_ids, tr_len = to_blocks(enc[n_val:], block, tok.pad_token_id, keep_tail=False)
        va_ids, va_len = to_blocks(enc[:n_val], block, tok.pad_token_id, keep_tail=True) if n_val else (
            np.zeros((0, block), np.int32), np.zeros(0, np.int32))
        z = {"train_ids": tr_ids, "train_len": tr_len, "val_ids": va_ids, "val_len": va_len}
        n_unk = sum(s.count(tok.unk_token_id) for s in enc)
        logger.info(
            "%d lines (%d held out) -> %d tokens (%.2f%% [UNK]) -> %d train / %d validation blocks of %d",
            len(lines), n_val, sum(map(len, enc)), 100 * n_unk / max(1, sum(map(len, enc))),
            len(tr_ids), len(va_ids), block,
        )
        if main_process:  # one writer; other ranks wait in main_process_first()
            try:
                cache_dir.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_suffix(".tmp.npz")
                np.savez(tmp, **z)
                os.replace(tmp, cache)
            except OSError as e:
                logger.warning("cannot write the tokenization cache %s (%s); continuing without", cache, e)
    train = BlockDataset(z["train_ids"], z["train_len"])
    val = BlockDataset(z["val_ids"], z["val_len"]) if len(z["val_ids"]) else None
    if len(train) == 0:
        raise DataError(f"{path}: no training text left after holding out the validation lines")
    return train, val


# ---------------------------------------------------------------------------------------------
# Model.


def load_tok(name: str):
    """lsgpt.text.load_tokenizer, plus bare vocab.txt files under transformers 5 (vocab dict)."""
    if os.path.isfile(name):
        from transformers import BertTokenizerFast

        with open(name, encoding="utf-8") as f:
            vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
        return BertTokenizerFast(vocab=vocab, do_lower_case=False, tokenize_chinese_chars=True)
    return load_tokenizer(name)


def is_trainer_checkpoint(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, f)) for f in ("trainer_state.json", "optimizer.pt"))


def checkpoint_is_qat(path: str) -> bool:
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            return bool(json.load(f).get(CONFIG_FLAG, False))
    except (OSError, ValueError):
        return False


def build_model(model_args: ModelArguments, init_from: str | None, tok, fast: bool = False) -> GPT2LMHeadModel:
    # The fast path trains fp16 through our model too, quantizers off (see plain_fp16_checkpoint below).
    cls = QuantGPT2LMHeadModel if model_args.enable_quant or fast else GPT2LMHeadModel
    if init_from:
        logger.info("weights from %s (%s)", init_from, cls.__name__)
        model = cls.from_pretrained(init_from, cache_dir=model_args.cache_dir)
    else:
        if model_args.config_name:
            config = GPT2Config.from_pretrained(model_args.config_name, cache_dir=model_args.cache_dir)
        else:
            config = GPT2Config(activation_function="gelu_new")  # LightSeq's GELU is the tanh form
        config.vocab_size = len(tok)
        if model_args.config_overrides:
            config.update_from_string(model_args.config_overrides)
        logger.info("new %s: %s", cls.__name__, model_args.config_overrides or "default GPT-2 config")
        model = cls(config)
    if isinstance(model, QuantGPT2LMHeadModel):
        model.set_quant(model_args.enable_quant)
        if not model_args.enable_quant:
            plain_fp16_checkpoint(model)
    if model.config.vocab_size != len(tok):
        logger.warning("resizing the embedding from %d to the tokenizer's %d", model.config.vocab_size, len(tok))
        model.resize_token_embeddings(len(tok))
    if model.config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        logger.warning("activation %s is not LightSeq's tanh GELU", model.config.activation_function)
    # Said explicitly, the Trainer knows the loss shifts labels and normalizes by the T-1 predicted tokens of a
    # block; with loss_type unset (HF's GPT-2 config) it divides by T and reports a loss (T-1)/T too low.
    model.loss_type = "ForCausalLM"
    # Ids for this vocabulary (the uer config says 50256); exporter and engine read eos/pad from here.
    ids = {"eos_token_id": tok.sep_token_id, "bos_token_id": tok.cls_token_id, "pad_token_id": tok.pad_token_id}
    for k, v in ids.items():
        setattr(model.config, k, v)
        if model.generation_config is not None:
            setattr(model.generation_config, k, v)
    return model


def plain_fp16_checkpoint(model: QuantGPT2LMHeadModel) -> None:
    """fp16 training through the QAT model, quantizers off: its clips never train (frozen, so DDP and the
    optimizer skip them) and never reach a checkpoint (the exporter would take them for trained QAT clips
    and skip calibration). The checkpoint holds exactly GPT2LMHeadModel's weights, with "ls_quant": false."""
    names = set()
    for n, p in model.named_parameters():
        if ".ls_clips." in n:
            p.requires_grad_(False)
            names.add(n)
    model._keys_to_ignore_on_save = set(model._keys_to_ignore_on_save or ()) | names


# ---------------------------------------------------------------------------------------------
# Main.


class _StepCounter(TrainerCallback):
    """Optimizer steps run by this process (a resumed run reports only its own)."""

    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kw):
        self.steps += 1


class _CarryAdamState(TrainerCallback):
    """fp16 -> int8 QAT from a Trainer checkpoint (checkpoint-N with optimizer.pt): start QAT's AdamW with the fp16
    run's moments for every weight they share, instead of zeros, because a fresh Adam's first steps are about
    lr * sign(g) for every weight, a shake the hand-over pays for. The clips (new parameters) start fresh; the
    new run's learning rates and schedule are its own. Anything that does not line up (another optimizer, other
    shapes) leaves Adam fresh, with a warning."""

    def __init__(self, checkpoint: str):
        self.checkpoint = checkpoint
        self.carried = 0

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
        path = os.path.join(self.checkpoint, "optimizer.pt")
        opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
        try:
            old = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a warning, then a fresh Adam, as without this callback
            logger.warning("not carrying Adam's state from %s: %s", path, e)
            return
        names = {id(p): n for n, p in model.named_parameters()}
        new = opt.state_dict()  # this run's groups and hyperparameters; its state is still empty
        if len(new["param_groups"]) != len(old["param_groups"]):
            logger.warning("not carrying Adam's state: %d parameter groups here, %d in %s",
                           len(new["param_groups"]), len(old["param_groups"]), path)
            return
        state: dict[int, dict] = {}
        for g_new, g_old, group in zip(new["param_groups"], old["param_groups"], opt.param_groups):
            shared = [(i, p) for i, p in zip(g_new["params"], group["params"])
                      if ".ls_clips." not in names.get(id(p), "")]  # the clips: transformer[.h.N].ls_clips.*
            if len(shared) != len(g_old["params"]):
                logger.warning("not carrying Adam's state: a group of %d shared weights here, %d in %s",
                               len(shared), len(g_old["params"]), path)
                return
            for (i, p), j in zip(shared, g_old["params"]):
                st = old["state"].get(j)
                if st is None:
                    continue
                if any(torch.is_tensor(v) and v.dim() and v.shape != p.shape for v in st.values()):
                    logger.warning("not carrying Adam's state: %s is %s here, not as in %s", names.get(id(p)),
                                   tuple(p.shape), path)
                    return
                state[i] = st
        opt.load_state_dict({"state": state, "param_groups": new["param_groups"]})
        self.carried = len(state)
        logger.info("QAT starts with the fp16 run's Adam moments for %d weights (%s); the clips start fresh",
                    len(state), path)


def forget_eval_preparation(trainer: Trainer) -> None:
    """Undo what trainer.evaluate() before trainer.train() leaves behind, so that train() wraps the model in DDP.

    evaluate() has accelerate prepare the model in evaluation mode (no DistributedDataParallel) and mark it
    `_is_accelerate_prepared`; train()'s prepare then returns the marked model as it is. Under torchrun every rank
    would train on its own gradients, never all-reduced, and the ranks' weights would drift apart."""
    model, acc = trainer.model, trainer.accelerator
    if not getattr(model, "_is_accelerate_prepared", False):
        return
    original = model.__dict__.pop("_original_forward", None)
    if original is not None:  # mixed precision wrapped forward in autocast; train()'s prepare wraps it again
        if getattr(original, "__func__", None) is type(model).forward:
            model.__dict__.pop("forward", None)
        else:
            model.forward = original
    del model._is_accelerate_prepared
    acc._models[:] = [m for m in acc._models if m is not model]
    trainer.model_wrapped = model


class _RequireDDP(TrainerCallback):
    """Stops a multi-process run whose training model is not DistributedDataParallel (ranks would not all-reduce
    their gradients; see forget_eval_preparation)."""

    def __init__(self):
        self.trainer: Trainer | None = None

    def on_train_begin(self, args, state, control, **kw):
        # MULTI_GPU, MULTI_CPU, ...: accelerate's DDP types (FSDP and DeepSpeed wrap differently)
        acc = self.trainer.accelerator if self.trainer is not None else None
        if acc is None or acc.num_processes <= 1 or not acc.distributed_type.name.startswith("MULTI_"):
            return
        wrapped = self.trainer.model_wrapped
        if not isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
            raise RuntimeError(f"{args.world_size} processes but the model trains as {type(wrapped).__name__}, not "
                               "DistributedDataParallel: gradients would not be all-reduced")


class _KillAtStep(TrainerCallback):
    """Fault injection for tests (LSGPT_FAULT_KILL_AT_STEP=N): SIGKILL this process during step N."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def parse_args(argv: list[str] | None):
    if not torch.cuda.is_available():
        # Read while TrainingArguments is built: without it, torchrun/launch on a CPU machine would make
        # every process a lone rank 0 instead of a gloo DDP group.
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
    extra = () if any(f.name == "overwrite_output_dir" for f in dataclasses.fields(TrainingArguments)) else (
        CompatArguments,)
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments, *extra))
    parser.description = __doc__.split("\n\n")[0]
    if argv is None and len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        parsed = parser.parse_json_file(os.path.abspath(sys.argv[1]))
    else:
        parsed = parser.parse_args_into_dataclasses(args=argv)
    model_args, data_args, training_args = parsed[:3]
    overwrite = parsed[3].overwrite_output_dir if extra else training_args.overwrite_output_dir
    if not data_args.train_file:
        parser.error("--train_file is required")
    if not (model_args.tokenizer_name or model_args.model_name_or_path or training_args.resume_from_checkpoint):
        parser.error("give --tokenizer_name (or --model_name_or_path) for the tokenizer")
    if model_args.clip_calibration_batches < 1:
        parser.error("--clip_calibration_batches must be at least 1")
    return model_args, data_args, training_args, overwrite


def main(argv: list[str] | None = None) -> int:
    model_args, data_args, args, overwrite = parse_args(argv)
    # Every rank checks the text before anything waits on a barrier: a bad file must stop all ranks, not
    # leave the others waiting in main_process_first() for a rank 0 that exited.
    lines = read_paragraphs(data_args.train_file)
    split_lines(lines, data_args.validation_split_percentage)
    configure_run(args)
    resume, trainer_resume, init_from = starting_point(model_args, args, overwrite)
    old_exports = sorted(Path(args.output_dir).glob("*.hdf5"))  # made from the weights this run replaces
    tok = load_tok(tokenizer_name(model_args, init_from))
    fast = model_args.fast_path if model_args.fast_path is not None else fasttrain.available()
    model = build_model(model_args, init_from, tok, fast)
    block = data_args.block_size or min(DEFAULT_BLOCK, model.config.n_positions)
    if block > model.config.n_positions:
        raise SystemExit(f"error: --block_size {block} exceeds the model's n_positions={model.config.n_positions}")

    with args.main_process_first(desc="tokenization"):
        train_ds, eval_ds = build_datasets(data_args, tok, block, args.process_index == 0, lines)
    logger.info("train %d blocks (%d tokens), validation %d blocks", len(train_ds), train_ds.n_tokens,
                len(eval_ds) if eval_ds else 0)

    clip_init = init_clips(model, model_args, args, train_ds) if model_args.enable_quant else None
    carry_from = resume if (resume and trainer_resume is None and model_args.enable_quant
                            and model_args.carry_optimizer_state and is_trainer_checkpoint(resume)
                            and not checkpoint_is_qat(resume)) else None
    trainer, counter = make_trainer(model, tok, args, train_ds, eval_ds, fast, carry_from)
    metrics: dict[str, float] = {}
    if model_args.enable_quant and eval_ds is not None:
        metrics.update(qat_baseline(trainer, model, args, fresh_start=trainer_resume is None))

    forget_eval_preparation(trainer)  # after the evaluations above: train() must wrap the model in DDP
    result = trainer.train(resume_from_checkpoint=trainer_resume)
    trainer.save_model()
    trainer.save_state()
    if args.process_index == 0:
        remove_stale_exports(old_exports)
    add_final_metrics(metrics, trainer, result, eval_ds)
    if args.process_index == 0:
        metrics.update(global_step=trainer.state.global_step, steps_run=counter.steps, resumed_from=trainer_resume,
                       init_from=init_from, enable_quant=model_args.enable_quant, fast_path=fast, clip_init=clip_init)
        write_outputs(trainer, tok, args, metrics, model_args.enable_quant, eval_ds is not None)
    return 0


def init_clips(model: QuantGPT2LMHeadModel, model_args: ModelArguments, args: TrainingArguments,
               train_ds: BlockDataset) -> str:
    """QAT's starting clips -> how they were set: "checkpoint" (a QAT checkpoint's, kept: resuming must not
    recalibrate), "fixed" (LightSeq's constants) or "calibrate" (max |x| over a few training batches, the
    default: LightSeq's constants cost the H100 run 10.6% perplexity at QAT's start; docs/decisions.md)."""
    if model.clips_loaded:
        logger.info("QAT clips from the checkpoint")
        return "checkpoint"
    if model_args.clip_init == "fixed":
        logger.info("QAT clips start at LightSeq's fixed constants (--clip_init fixed)")
        return "fixed"
    model.to(args.device)  # the Trainer would move it there anyway
    batches = calibration_batches(train_ds, model_args.clip_calibration_batches, args.per_device_train_batch_size,
                                  args.seed, args.process_index, args.world_size, args.device)
    clips = calibrate_clips(model, batches, reduce_max=_all_reduce_max if args.world_size > 1 else None)
    logger.info("QAT clips calibrated (max |x| over %d blocks x %d processes, quantizers off): %s",
                sum(len(b["input_ids"]) for b in batches), args.world_size, summarize_clips(clips))
    return "calibrate"


def calibration_batches(ds: BlockDataset, n: int, batch_size: int, seed: int, rank: int, world: int,
                        device: torch.device) -> list[dict[str, torch.Tensor]]:
    """This process's share of n * world batches of training blocks, drawn with their own generator (the
    global RNG, hence the training order and dropout, stays as it would be without calibration)."""
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    mine = order[: n * batch_size * world][rank::world].tolist()
    batches = [default_data_collator([ds[i] for i in mine[j:j + batch_size]]) for j in range(0, len(mine), batch_size)]
    return [{k: v.to(device) for k, v in b.items() if k != "labels"} for b in batches]


def _all_reduce_max(t: torch.Tensor) -> None:
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)


def summarize_clips(clips: dict[str, float]) -> str:
    """One line: the embedding clips, then each layer clip's range over the layers."""
    by_name: dict[str, list[float]] = {}
    for k, v in clips.items():
        by_name.setdefault(k.rsplit(".", 1)[1].removesuffix("_clip_max"), []).append(v)
    return ", ".join(f"{n} {min(v):.3g}" if len(v) == 1 else f"{n} {min(v):.3g}..{max(v):.3g}"
                     for n, v in by_name.items())


def remove_stale_exports(paths: list[Path]) -> None:
    """The HDF5 exports of the model this run has just replaced: left there, they would be served as this one."""
    for p in paths:
        try:
            p.unlink()
            logger.warning("removed %s: an export of the model this run replaced (export again)", p)
        except OSError as e:
            logger.warning("%s is an export of the model this run replaced; cannot remove it: %s", p, e)


def configure_run(args: TrainingArguments) -> None:
    """Logging (rank 0 only says INFO), TrainingArguments this script fixes, and the seed."""
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
        level=logging.INFO if args.process_index == 0 else logging.WARNING,
    )
    transformers.utils.logging.set_verbosity_warning()
    if args.fp16 and not torch.cuda.is_available():
        logger.warning("--fp16 needs a GPU; training in fp32 on the CPU")
        args.fp16, args.mixed_precision = False, "no"
    args.prediction_loss_only = True  # evaluation needs the loss only, not [N, T, V] logits
    if args.ddp_find_unused_parameters is None:
        args.ddp_find_unused_parameters = False  # every parameter is used (frozen clips don't train)
    if not torch.cuda.is_available():
        args.dataloader_pin_memory = False
    set_seed(args.seed)


def starting_point(model_args: ModelArguments, args: TrainingArguments, overwrite: bool):
    """Where the weights come from, and whether this continues a Trainer run (docs/format.md §9.2).

    -> (--resume_from_checkpoint as given, the Trainer checkpoint to resume or None, the folder of the starting
    weights or None). Clears args.resume_from_checkpoint: we decide, the Trainer must not pick it up on its own.
    UsageError when the run would replace a model in --output_dir that it does not continue.
    """
    resume = args.resume_from_checkpoint
    args.resume_from_checkpoint = None
    trainer_resume, init_from = None, model_args.model_name_or_path
    if resume:
        if not os.path.isdir(resume):
            raise SystemExit(f"error: --resume_from_checkpoint {resume}: no such folder")
        if not overwrite and not (os.path.isdir(args.output_dir) and get_last_checkpoint(args.output_dir)):
            refuse_to_replace(args.output_dir, continuing=resume)  # HF: a folder with checkpoint-N is a run's
        if is_trainer_checkpoint(resume) and checkpoint_is_qat(resume) == model_args.enable_quant:
            trainer_resume = init_from = resume
        else:
            init_from = resume
            logger.info("%s is not a checkpoint of this run: its weights start a new run of the full length", resume)
    elif os.path.isdir(args.output_dir) and not overwrite:
        last = get_last_checkpoint(args.output_dir)
        if last and checkpoint_is_qat(last) == model_args.enable_quant:
            trainer_resume = init_from = last
            logger.info("resuming from %s (pass --overwrite_output_dir to start afresh)", last)
        elif last or any(n.startswith("checkpoint-") for n in os.listdir(args.output_dir)):
            raise UsageError(
                f"{args.output_dir} holds checkpoints of another kind of run; "
                "use --overwrite_output_dir or another --output_dir"
            )
        else:
            refuse_to_replace(args.output_dir)
    return resume, trainer_resume, init_from


def model_files(folder: str | os.PathLike) -> list[str]:
    """What in `folder` is a model (or a Trainer run's state): config, weights, HDF5 exports, checkpoint-N."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:  # no such folder (or not one)
        return []
    return [e.name for e in entries
            if (e.is_dir() and e.name.startswith("checkpoint-"))
            or (e.is_file() and (e.name in ("config.json", "trainer_state.json")
                                 or e.name.endswith((".safetensors", ".bin", ".pt", ".hdf5"))))]


def refuse_to_replace(output_dir: str, continuing: str | None = None) -> None:
    """HF run_clm's rule: a run does not write over a model in --output_dir unless --overwrite_output_dir says so,
    or it continues that very run (`continuing`: --resume_from_checkpoint is the folder or a checkpoint in it)."""
    found = model_files(output_dir)
    if not found:
        return
    if continuing is not None:
        out, src = Path(output_dir).resolve(), Path(continuing).resolve()
        if src == out or out in src.parents:
            return
    shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
    raise UsageError(f"--output_dir {output_dir} already holds a model ({shown}); train into a new --output_dir, "
                     "or pass --overwrite_output_dir to replace it")


def tokenizer_name(model_args: ModelArguments, init_from: str | None) -> str:
    """--tokenizer_name, else the starting checkpoint's tokenizer files, else --model_name_or_path."""
    has_tok = init_from and any(os.path.isfile(os.path.join(init_from, f)) for f in ("tokenizer.json", "vocab.txt"))
    tok_name = model_args.tokenizer_name or (init_from if has_tok else model_args.model_name_or_path)
    if not tok_name:
        raise SystemExit(f"error: no tokenizer in {init_from}; pass --tokenizer_name")
    return tok_name


def make_trainer(model, tok, args: TrainingArguments, train_ds, eval_ds, fast: bool, carry_from: str | None):
    """The HF Trainer with this script's callbacks (and the fast path's configuration) -> (trainer, step counter)."""
    counter, require_ddp = _StepCounter(), _RequireDDP()
    callbacks = [counter, require_ddp]
    if os.environ.get("LSGPT_FAULT_KILL_AT_STEP"):
        callbacks.append(_KillAtStep(int(os.environ["LSGPT_FAULT_KILL_AT_STEP"])))
    if carry_from:
        callbacks.append(_CarryAdamState(carry_from))
    if fast:
        try:
            fasttrain.configure(model, args)
        except ValueError as e:  # e.g. a mistyped LSGPT_COMPILE_MODE
            raise SystemExit(f"error: {e}") from None
    trainer = Trainer(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
        processing_class=tok, data_collator=fasttrain.collate if fast else default_data_collator,
        callbacks=callbacks,
    )
    require_ddp.trainer = trainer
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    return trainer, counter


def qat_baseline(trainer: Trainer, model, args: TrainingArguments, fresh_start: bool) -> dict[str, float]:
    """Held-out losses of QAT's starting checkpoint without, then with, quantizers (fp16_*, int8_before_qat_*).

    Measured at a fresh start and kept in fp16_baseline.json, which a resumed run reads back."""
    baseline = Path(args.output_dir) / "fp16_baseline.json"
    if fresh_start:
        model.set_quant(False)
        base = trainer.evaluate(metric_key_prefix="fp16")
        model.set_quant(True)
        base.update(trainer.evaluate(metric_key_prefix="int8_before_qat"))
        base = {k: v for k, v in base.items() if k.endswith("_loss")}
        if args.process_index == 0:
            baseline.parent.mkdir(parents=True, exist_ok=True)
            baseline.write_text(json.dumps(base, indent=2))
        return base
    if baseline.is_file():
        return json.loads(baseline.read_text())
    return {}


def add_final_metrics(metrics: dict, trainer: Trainer, result, eval_ds) -> None:
    """Training metrics (train_*), the held-out evaluation, and a perplexity for every held-out loss."""
    metrics.update({f"train_{k}" if not k.startswith("train") else k: v for k, v in result.metrics.items()})
    if eval_ds is not None:
        metrics.update(trainer.evaluate())
    for k in [k for k in metrics if k.endswith("_loss") and not k.startswith("train")]:
        metrics[k[: -len("loss")] + "perplexity"] = math.exp(min(metrics[k], 50.0))
    metrics["perplexity"] = metrics.get("eval_perplexity")  # None without held-out text


def write_outputs(trainer: Trainer, tok, args: TrainingArguments, metrics: dict, enable_quant: bool,
                  held_out: bool) -> None:
    """Rank 0: vocab.txt, metrics.json and the Trainer's all_results.json, then the perplexity line."""
    out = Path(args.output_dir)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])  # LightSeq users load vocab.txt
    (out / "vocab.txt").write_text("".join(t + "\n" for t, _ in vocab), encoding="utf-8")
    if torch.cuda.is_available():
        metrics["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    trainer.save_metrics("all", {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))})
    if enable_quant and "fp16_perplexity" in metrics:
        print(
            f"held-out perplexity: fp16 {metrics['fp16_perplexity']:.3f} (start, no quantizers) | "
            f"int8 {metrics.get('int8_before_qat_perplexity', float('nan')):.3f} before QAT | "
            f"int8 {metrics['eval_perplexity']:.3f} after QAT",
            flush=True,
        )
    elif held_out:
        print(f"held-out perplexity: {metrics['eval_perplexity']:.3f}", flush=True)


def cli(argv: list[str] | None = None) -> int:
    rc, ok = 1, False
    try:
        rc = main(argv)
        ok = True
    except (DataError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        rc = 2
    finally:
        close_process_group(wait_for_peers=ok)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        leave_now(rc)
    return rc


def leave_now(rc: int) -> None:
    """A torchrun worker whose run is over (outputs written, peers met at the barrier) exits without C++'s
    exit-time destructors: on a busy machine one of them still aborted a finished rank ("terminate called
    without an active exception") after the barrier and destroy_process_group, failing a run that had succeeded."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def close_process_group(wait_for_peers: bool) -> None:
    """Leave torchrun cleanly. Without it a rank that finishes first tears gloo/NCCL down in its exit-time
    destructors while rank 0 still writes, and aborts ("terminate called without an active exception"). The
    barrier only after success: a failed rank must not wait for peers that may be stuck elsewhere."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if wait_for_peers:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(cli())

