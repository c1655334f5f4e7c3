"""A served model's answers as Triton responses: the result tensors (ids, and text when a tokenizer is there), streamed
tokens, the end of a stream, an error with its Triton code. Names: lsgpt/contract.py."""

from __future__ import annotations

from typing import Any

import numpy as np

from lsgpt.contract import RESULT, TEXT, TEXT_OUTPUT

try:  # present inside the Python backend stub only
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - imported outside Triton (docs, linters)
    pb_utils = None


def error(msg: str, code: str = "INVALID_ARG"):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(msg, getattr(pb_utils.TritonError, code)))


def code(err: Exception) -> str:
    """The Triton error code of a request that failed after it was queued (or could not be queued)."""
    from lsgpt.engine.scheduler import Cancelled, QueueFull, ShuttingDown

    if isinstance(err, (QueueFull, ShuttingDown)):
        return "UNAVAILABLE"
    return "CANCELLED" if isinstance(err, Cancelled) else "INTERNAL"


def text_name(text_in: bool) -> str:
    """text_output answers a text_input request; `text` is the text beside the ids of a token_ids request."""
    return TEXT_OUTPUT if text_in else TEXT


def result(rows: list[list[int]], prompts: list[list[int]], eos_id: int, tokenizer: Any = None,
           text: str | None = None):
    """Prompt + continuation per row (padded with EOS like LightSeq), and the continuations' text as `text`."""
    width = max(len(r) for r in rows)
    out = np.full((len(rows), width), eos_id, dtype=np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    tensors = [pb_utils.Tensor(RESULT, out)]
    if tokenizer is not None and text is not None:
        from lsgpt.text import decode

        texts = np.array([[decode(tokenizer, r[len(p):]).encode()] for r, p in zip(rows, prompts)],
                         dtype=np.object_)  # the continuation, as an OpenAI completion gives it
        tensors.append(pb_utils.Tensor(text, texts))
    return pb_utils.InferenceResponse(output_tensors=tensors)


def tokens(toks: list[int], piece: str | None, text: str):
    """Streamed tokens (one, or those that gathered while the stream's previous send was in flight: result
    [1, k]), with their text increment when there is a decoder."""
    outs = [pb_utils.Tensor(RESULT, np.array([toks], dtype=np.int32))]
    if piece is not None:
        outs.append(pb_utils.Tensor(text, np.array([[piece.encode()]], dtype=np.object_)))
    return pb_utils.InferenceResponse(output_tensors=outs)


def stream_end(rest: str | None, text: str):
    """The last response of a stream: no token, the rest of the text (if any decoder)."""
    outs = [pb_utils.Tensor(RESULT, np.zeros((1, 0), dtype=np.int32))]
    if rest is not None:
        outs.append(pb_utils.Tensor(text, np.array([[rest.encode()]], dtype=np.object_)))
    return pb_utils.InferenceResponse(output_tensors=outs)
