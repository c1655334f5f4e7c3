"""The served contract, written once: tensor names and types, the sampling inputs and their limits, file names,
server defaults. Imported by the engine, the Triton model, the launcher, the publisher, the client (so: the
standard library only, no numpy, no torch), the benchmarks and the tests; tests/test_contract.py checks every
config.pbtxt against it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

# ---- files -------------------------------------------------------------------------------------------------
MODEL_FILE = "model.hdf5"  # in every version folder (our models) and at the model root (LightSeq's backend)
TOKENIZER_FILE = "vocab.txt"  # published beside MODEL_FILE: text in / text out
BACKEND = "lsgpt"  # config.pbtxt `backend:` of our models (a Python-based backend, lsgpt/serving/backend/model.py)

# ---- tensors (LightSeq's names for ids in and out) ---------------------------------------------------------
TOKEN_IDS = "token_ids"  # INT32 [-1]: the prompt, [CLS] first
TEXT_INPUT = "text_input"  # STRING [1]: the prompt as text, instead of token_ids
RESULT = "result"  # INT32 [-1]: prompt + continuation (rows padded with EOS); streamed: one new token
TEXT_OUTPUT = "text_output"  # STRING [1]: the continuation's text (streamed: the text increment)
TEXT = "text"  # STRING [1], streaming twins only: the text increment of a token_ids request
STOP_WORDS = "stop_words"  # INT32 [-1]: stop sequences as token ids, -1 between two sequences
STREAM = "stream"  # BOOL [1]: the *_stream twins stream unless false; the others refuse true
STREAM_SUFFIX = "_stream"  # gpt2 -> gpt2_stream: the decoupled twin of a model, same file
CANCEL = "lsgpt_cancel"  # request parameter (string): stop this model's running request of that id (the
#   in-band cancel a stream sends before it half-closes, instead of cancelling the gRPC call)

# ---- the article's vocabulary ------------------------------------------------------------------------------
VOCAB_SIZE = 21128  # the Chinese BERT vocabulary of uer/gpt2-chinese-cluecorpussmall
PAD_ID, CLS_ID, SEP_ID = 0, 101, 102  # [SEP] is EOS: training paragraphs are [CLS] text [SEP]

# ---- limits ------------------------------------------------------------------------------------------------
MAX_STEP_LIMIT = 1024  # LightSeq's largest max_step (softmax block bound): no prompt of ours is longer than this

# ---- server defaults (config.pbtxt parameters override them) -----------------------------------------------
MAX_RUNNING_ROWS = 32  # rows decoded together by one model's scheduler
MAX_QUEUED_REQUESTS = 256  # requests waiting for a row; beyond it UNAVAILABLE at once


@dataclass(frozen=True)
class Param:
    """One optional per-request sampling input: its Triton type, its Python type, and its valid range."""

    triton_dtype: str  # "INT32" / "INT64" / "FP32"
    type: type  # int or float
    ok: Callable[[Any], bool]
    want: str  # the valid range, in words (error messages)


def _finite(v: float) -> bool:
    return math.isfinite(v)


PARAMS: dict[str, Param] = {
    "max_new_tokens": Param("INT32", int, lambda v: v >= 1, ">= 1"),
    "top_k": Param("INT32", int, lambda v: v >= 0, ">= 0 (0: no top-k filter, 1: greedy)"),
    "top_p": Param("FP32", float, lambda v: 0.0 < v <= 1.0, "in (0, 1]"),
    "temperature": Param("FP32", float, lambda v: _finite(v) and v >= 0.0, "finite and >= 0 (0: greedy)"),
    "seed": Param("INT64", int, lambda v: 0 <= v < 2**63, "in [0, 2**63)"),
    "repetition_penalty": Param("FP32", float, lambda v: _finite(v) and v > 0.0, "finite and > 0 (1: off)"),
    "presence_penalty": Param("FP32", float, lambda v: -2.0 <= v <= 2.0, "in [-2, 2] (0: off)"),
    "frequency_penalty": Param("FP32", float, lambda v: -2.0 <= v <= 2.0, "in [-2, 2] (0: off)"),
}

# Every input of our served models: name -> (Triton dtype, dims). All optional (token_ids or text_input).
INPUTS: dict[str, tuple[str, list[int]]] = {
    TOKEN_IDS: ("INT32", [-1]),
    TEXT_INPUT: ("STRING", [1]),
    **{name: (p.triton_dtype, [1]) for name, p in PARAMS.items()},
    STOP_WORDS: ("INT32", [-1]),
    STREAM: ("BOOL", [1]),
}
MAX_STOP_SEQUENCES = 16  # per request (OpenAI allows 4; TensorRT-LLM's stop_words take any number)
MAX_STOP_TOKENS = 64  # per sequence
OUTPUTS: dict[str, tuple[str, list[int]]] = {RESULT: ("INT32", [-1]), TEXT_OUTPUT: ("STRING", [1])}
STREAM_OUTPUTS: dict[str, tuple[str, list[int]]] = {**OUTPUTS, TEXT: ("STRING", [1])}


def param_error(name: str, value: Any) -> str | None:
    """Why `value` is not a valid `name` (type or range), or None. None values are always valid (= default)."""
    if value is None:
        return None
    p = PARAMS[name]
    number = numbers.Real if p.type is float else numbers.Integral  # numpy scalars too
    if isinstance(value, bool) or not isinstance(value, number):
        return f"{name} must be {'a number' if p.type is float else 'an integer'}, got {value!r}"
    return None if p.ok(p.type(value)) else f"{name}={value!r} is invalid: must be {p.want}"


def stop_error(stop: Any, vocab: int | None = None) -> str | None:
    """Why `stop` (a sequence of token-id sequences) is not a valid set of stop sequences, or None."""
    if len(stop) > MAX_STOP_SEQUENCES:
        return f"{len(stop)} stop sequences: at most {MAX_STOP_SEQUENCES}"
    for s in stop:
        if not 1 <= len(s) <= MAX_STOP_TOKENS:
            return f"a stop sequence has {len(s)} tokens: it must have 1..{MAX_STOP_TOKENS}"
        bad = [t for t in s if not 0 <= t < (vocab if vocab is not None else 2**31)]
        if bad:
            return f"stop sequence token id {bad[0]} is outside the vocabulary" + (f" 0..{vocab - 1}" if vocab else "")
    return None


def matched_stop(generated: Sequence[int], stop: Sequence[Sequence[int]]) -> tuple[int, ...] | None:
    """The stop sequence `generated` (a continuation so far) ends with, or None."""
    n = len(generated)
    return next((tuple(s) for s in stop if len(s) <= n and tuple(generated[n - len(s):]) == tuple(s)), None)


def encode_stop(stop: Sequence[Sequence[int]]) -> list[int]:
    """Stop sequences -> the flat stop_words row: [1, 2, -1, 3] = the sequences (1, 2) and (3,)."""
    out: list[int] = []
    for s in stop:
        out += [*map(int, s), -1]
    return out[:-1]


def decode_stop(row: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    """The flat stop_words row -> stop sequences (empty runs, e.g. -1 padding, are ignored)."""
    out, cur = [], []
    for t in map(int, row):
        if t == -1:
            if cur:
                out.append(tuple(cur))
            cur = []
        else:
            cur.append(t)
    if cur:
        out.append(tuple(cur))
    return tuple(out)
