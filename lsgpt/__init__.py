"""lsgpt: GPT-2 in LightSeq's HDF5 format — format, exporter, engine, tokenizer helpers.

Submodules (import what you need; this package imports nothing heavy on its own):
  format    HDF5 dataset names, sizes, quantization formulas, read/validate/write (numpy + h5py)
  text      tokenizer helpers, prompt format, CJK-aware detokenization (no torch)
  export    HF checkpoint -> HDF5 (fp16 / int8), calibration
  model     fp16/fp32 transformer with KV cache (torch)
  quantize  int8 dataflow of LightSeq's QuantGpt (torch; integer GEMMs)
  generate  Engine: loading, batching unequal prompts, sampling, streaming
  qat       fake quantizers and the QAT GPT-2 used by training
  triton    tritonserver discovery and launch helpers
"""

__version__ = "0.1.0"
