"""The engine: GPT-2 in torch from a LightSeq HDF5 file, fp16 or int8, with in-flight batching on top.

  model      fp16/fp32 forward with a KV cache          int8       LightSeq's int8 dataflow (integer GEMMs)
  kernels    the GPU fast path's Triton kernels          fused      a whole forward in those kernels
  sampling   request parameters, penalties, sampling, the finish rule (once, for Engine and Scheduler)
  engine     Engine: load, validate, generate, stream    scheduler  Scheduler: in-flight batching over an Engine

`from lsgpt.engine import Engine, SamplingParams, RequestError` is the public entry (imported on first use, so
`lsgpt.engine.kernels` alone does not load the rest).
"""

from typing import Any

_PUBLIC = {"Engine": "lsgpt.engine.engine", "SamplingParams": "lsgpt.engine.sampling",
           "RequestError": "lsgpt.engine.sampling"}


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'lsgpt.engine' has no attribute {name!r}")
