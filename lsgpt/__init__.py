"""lsgpt: GPT-2 in LightSeq's HDF5 format, from training to a served model.

The package has floors; a module imports only from its own floor or the ones below it (tests/test_layout.py):

  contract, format, text   the served contract, the HDF5 format, tokenizer helpers (numpy + h5py, no torch)
  repository               the Triton model repository: publish a version folder atomically (export and serving)
  client                   the client library: gRPC through tritonclient (no torch)
  engine                   the model in torch (fp16 and LightSeq's int8), GPU kernels, sampling, Engine, Scheduler
  export, training         HF checkpoint -> HDF5; fine-tuning with quantization-aware training
  serving                  the Triton model, its launcher, the OpenAI-compatible gateway

Import what you need: this package imports nothing on its own.
"""

__version__ = "0.1.0"
