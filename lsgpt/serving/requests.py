"""A Triton request -> prompts (token ids) + one SamplingParams per row: the tensors and parameters named in
lsgpt/contract.py (token_ids or text_input, the per-row sampling inputs, stop_words, stream; the in-band cancel).

Conversion only. What is checked here is what must hold to build the prompts and SamplingParams at all (an input
present, its shape, one value per row, UTF-8 text, a tokenizer for text) and what the served model's form decides
(stream needs the decoupled twin; the twin takes one prompt a request). The rules on the values (token ids in the
vocabulary, prompt length, parameter ranges, stop sequences) are the engine's: a RequestError when the request is
submitted. Either way the client gets INVALID_ARGUMENT naming the problem.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from lsgpt.contract import (
    CANCEL,
    CANCEL_KEY,
    COALESCE,
    PARAMS,
    STOP_WORDS,
    STREAM,
    STREAM_SUFFIX,
    STRICT_LENGTH,
    TEXT_INPUT,
    TOKEN_IDS,
    decode_stop,
    text_error,
)


class BadRequest(ValueError):
    """A request that cannot be converted: answered with INVALID_ARGUMENT."""


@dataclass(frozen=True)
class Form:
    """What the served model is, as far as reading its requests goes."""

    name: str
    decoupled: bool  # the streaming twin: one prompt a request, streams unless told not to
    max_batch: int  # config.pbtxt max_batch_size (0: none)
    tokenizer: Any = None  # for text_input; None: token_ids only


@dataclass
class Parsed:
    prompts: list[list[int]]
    params: list[Any]  # SamplingParams per row
    stream: bool
    text: bool = False  # came as text_input: answer with text_output (the continuation's text)
    owner_key: str = ""  # the key it carries for cancelling it in band (contract.CANCEL_KEY); '': not in band
    gather: bool = False  # a stream may send several tokens in one response (contract.COALESCE)


def parse(request, form: Form, parameters: dict[str, Any]) -> Parsed:
    """The request's prompts and per-row SamplingParams, with what its `parameters` (request_parameters) ask;
    BadRequest if it cannot be read as one."""
    from lsgpt.engine.engine import SamplingParams

    inputs = {t.name(): t for t in request.inputs()}  # once (pb_utils.get_input_tensor_by_name lists them per call)
    rows, text = _prompts(inputs, form.tokenizer)
    b = len(rows)
    if b == 0:
        raise BadRequest("the request has no prompt (batch size 0)")
    if form.max_batch and b > form.max_batch:  # Triton checks this too; keep the message ours
        raise BadRequest(f"batch size {b} exceeds max_batch_size {form.max_batch}")
    fields = _fields(inputs, b)
    if parameters.get(STRICT_LENGTH):
        for f in fields:
            f["strict_length"] = True
    stream = _stream(inputs, b, form)
    try:
        params = [SamplingParams(**f) for f in fields]
    except (TypeError, ValueError) as e:
        raise BadRequest(str(e)) from None
    key = parameters.get(CANCEL_KEY)
    return Parsed(rows, params, stream, text=text, owner_key=key if isinstance(key, str) else "",
                  gather=parameters.get(COALESCE) is True)


def _prompts(inputs: dict[str, Any], tokenizer: Any) -> tuple[list[list[int]], bool]:
    """The rows of token_ids, or text_input's texts encoded; and whether they came as text."""
    t = inputs.get(TOKEN_IDS)
    text_in = inputs.get(TEXT_INPUT)
    if t is None and text_in is None:
        raise BadRequest("give input 'token_ids' (INT32 ids) or 'text_input' (a string)")
    if t is not None and text_in is not None:
        raise BadRequest("give either 'token_ids' or 'text_input', not both")
    if t is not None:
        ids = t.as_numpy()
        if ids.ndim != 2:
            raise BadRequest(f"input 'token_ids' must have shape [batch, seq_len], got {list(ids.shape)}")
        return ids.astype(np.int64).tolist(), False
    if tokenizer is None:
        raise BadRequest("this model has no tokenizer for 'text_input' (publish it with --tokenizer, or "
                         "send token_ids)")
    from lsgpt.text import encode_prompt

    texts = text_in.as_numpy().reshape(-1)
    for x in texts:  # size and UTF-8 before tokenizing: megabytes of text would hold this model for seconds
        why = text_error(x if isinstance(x, bytes) else str(x), "input 'text_input'")
        if why:
            raise BadRequest(why)
    return [encode_prompt(tokenizer, x.decode() if isinstance(x, bytes) else str(x)) for x in texts], True


def _fields(inputs: dict[str, Any], b: int) -> list[dict[str, Any]]:
    """SamplingParams keyword arguments per row: the sampling inputs given (contract.PARAMS) and stop_words."""
    fields: list[dict[str, Any]] = [{} for _ in range(b)]
    for name, param in PARAMS.items():
        p = inputs.get(name)
        if p is None:
            continue
        v = p.as_numpy().reshape(-1)
        if v.size != b:
            shape = list(p.as_numpy().shape)
            raise BadRequest(f"input '{name}' must have one value per row ([{b}, 1]), got shape {shape}")
        for row, x in enumerate(v.tolist()):
            fields[row][name] = param.type(x)
    sw = inputs.get(STOP_WORDS)
    if sw is not None:
        v = sw.as_numpy()
        v = v.reshape(1, -1) if v.ndim == 1 else v
        if v.shape[0] != b:
            raise BadRequest(f"input '{STOP_WORDS}' must have one row per prompt ([{b}, n]), got {list(v.shape)}")
        for row in range(b):
            fields[row]["stop"] = decode_stop(v[row].tolist())
    return fields


def _stream(inputs: dict[str, Any], b: int, form: Form) -> bool:
    """Whether to stream: the decoupled twin does unless the `stream` input says false; the others cannot."""
    st = inputs.get(STREAM)
    stream = form.decoupled
    if st is not None:
        v = st.as_numpy().reshape(-1)
        if v.size not in (1, b) or v.min() != v.max():
            raise BadRequest(f"input 'stream' must be one BOOL per request ([{b}, 1], all equal), got {v.tolist()}")
        stream = bool(v[0])
    if stream and not form.decoupled:
        raise BadRequest(f"stream=true needs a decoupled model: {form.name} answers once; stream from "
                         f"{form.name}{STREAM_SUFFIX}")
    if form.decoupled and b != 1:
        raise BadRequest(f"the decoupled model takes one prompt per request, got {b}")
    return stream


def request_parameters(request) -> dict[str, Any]:
    """The request's parameters (JSON), {} when none or unreadable."""
    try:
        params = json.loads(request.parameters() or "{}")
    except (AttributeError, ValueError):
        return {}
    return params if isinstance(params, dict) else {}


def cancel_target(params: dict[str, Any]) -> tuple[str, str] | None:
    """(request id, key) an in-band cancel names (request parameters contract.CANCEL and contract.CANCEL_KEY), or
    None for a normal request; BadRequest for a cancel without a key (it could stop nothing)."""
    target = params.get(CANCEL)
    if target is None:
        return None
    key = params.get(CANCEL_KEY)
    if not isinstance(key, str):
        raise BadRequest(f"an in-band cancel ({CANCEL}) must also give the key the request carried ({CANCEL_KEY}): "
                         "only the request's owner may stop it")
    return str(target), key

