"""Engine: load a LightSeq GPT HDF5 file (fp16 or int8) and generate, on CPU or CUDA.

Public API (used by the Triton models, client/generate.py, the benchmarks and the tests):

    engine = Engine.load("model/fp16/pytorch_model.hdf5", device=None)   # None: cuda if available
    engine.config                      # lsgpt.format.GptConfig (vocab, max_step, eos_id, ...)
    engine.generate([[101, 2769], [101, 1962, 4638]], SamplingParams(max_new_tokens=20, top_k=1))
        -> [[101, 2769, ...], [101, 1962, 4638, ...]]   # prompt + continuation per row, EOS kept,
                                                       # no padding (rows may differ in length)
    engine.stream([101, 2769], SamplingParams(...))  -> iterator of new token ids
    engine.logits(tokens [B,T] LongTensor) -> [B,T,V] float32   # full-sequence forward (tests)
    engine.ppl(prompts) -> list[float]                            # LightSeq ppl: mean NLL per row
    engine.validate(prompts, params)                              # raises RequestError

RequestError (a ValueError) carries a message that names the problem; the Triton models turn it into
INVALID_ARGUMENT. Generation semantics follow LightSeq (spec §2.8) with per-request extensions.
"""

from __future__ import annotations

from lsgpt.generate import Engine, RequestError, SamplingParams  # noqa: F401
