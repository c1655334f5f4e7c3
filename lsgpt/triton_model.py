"""The one implementation behind every Python-backend model in model_repository/ (gpt2, gpt2_int8, gpt2_stream).

Each version folder holds a thin model.py (lsgpt.repository.MODEL_PY) that fixes sys.path and imports
TritonPythonModel from here, plus the model file model.hdf5.

Tensors are LightSeq's: token_ids INT32 [b, s] in, result INT32 [b, len] out (prompt + continuation,
rows padded with EOS), plus optional per-row inputs max_new_tokens, top_k, top_p, temperature, seed, repetition_penalty,
presence_penalty, frequency_penalty
([b, 1] each). Non-decoupled models take every row of every request the dynamic batcher hands over
(prompts of unequal length: token_ids allows ragged batches) and run them in ONE engine.generate call.
A bad request gets INVALID_ARGUMENT naming the problem; the other requests of the batch are answered.
The decoupled model (gpt2_stream) sends one response per generated token, with the token id and a text
increment (lsgpt.text.IncrementalDecoder) when a tokenizer is available, then an empty final response.
"""

from __future__ import annotations

import json
import os
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

try:  # present inside the Python backend stub only
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover - imported outside Triton (docs, linters)
    pb_utils = None

MODEL_FILE = "model.hdf5"
# Optional per-row inputs: name -> (SamplingParams field, Python type).
PARAM_INPUTS: dict[str, tuple[str, type]] = {
    "max_new_tokens": ("max_new_tokens", int),
    "top_k": ("top_k", int),
    "top_p": ("top_p", float),
    "temperature": ("temperature", float),
    "seed": ("seed", int),
    "repetition_penalty": ("repetition_penalty", float),
    "presence_penalty": ("presence_penalty", float),
    "frequency_penalty": ("frequency_penalty", float),
}


class BadRequest(ValueError):
    """A request the model rejects with INVALID_ARGUMENT."""


@dataclass
class Parsed:
    prompts: list[list[int]]
    params: list[Any]  # SamplingParams per row


def _invalid(msg: str):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(msg, pb_utils.TritonError.INVALID_ARG))


def _internal(msg: str):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(msg, pb_utils.TritonError.INTERNAL))


def _pick_device(args: dict[str, str]) -> str:
    forced = os.environ.get("LSGPT_DEVICE")
    if forced:
        return forced
    if args.get("model_instance_kind") == "GPU":
        return f"cuda:{args.get('model_instance_device_id', '0')}"
    return "cpu"


def _find_tokenizer(version_dir: Path, model_dir: Path, config: dict) -> str | None:
    """vocab.txt in the version folder (publish(tokenizer=...)), else the config's `tokenizer` parameter
    (relative to the model folder, absolute, or a hub id), else $LSGPT_TOKENIZER."""
    if (version_dir / "vocab.txt").is_file():
        return str(version_dir)  # the folder: lsgpt.text.load_tokenizer handles folders on transformers 4 and 5
    param = config.get("parameters", {}).get("tokenizer", {}).get("string_value", "")
    if param:
        return str(model_dir / param) if (model_dir / param).exists() else param
    return os.environ.get("LSGPT_TOKENIZER") or None


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        from lsgpt.generate import Engine

        self.config = json.loads(args["model_config"])
        self.name = args["model_name"]
        model_dir = Path(args["model_repository"])
        version_dir = model_dir / args["model_version"]
        self.device = _pick_device(args)
        self.engine = Engine.load(version_dir / MODEL_FILE, device=self.device)
        self.cfg = self.engine.config
        self.max_batch = int(self.config.get("max_batch_size", 0))
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(self.config)
        self.tokenizer = None
        if self.decoupled:
            tok = _find_tokenizer(version_dir, model_dir, self.config)
            if tok:
                from lsgpt.text import load_tokenizer

                self.tokenizer = load_tokenizer(tok)
        pb_utils.Logger.log_info(
            f"{self.name} v{args['model_version']}: {'int8' if self.cfg.quantized else 'fp16'} engine on "
            f"{self.device}, vocab {self.cfg.vocab}, max_step {self.cfg.max_step}, eos {self.cfg.eos_id}"
            + (f", tokenizer {tok}" if self.decoupled and self.tokenizer else "")
        )

    # -----------------------------------------------------------------------------------------
    # Request parsing and validation.

    def _parse(self, request) -> Parsed:
        from lsgpt.generate import RequestError, SamplingParams

        t = pb_utils.get_input_tensor_by_name(request, "token_ids")
        if t is None:
            raise BadRequest("input 'token_ids' is missing")
        ids = t.as_numpy()
        if ids.ndim != 2:
            raise BadRequest(f"input 'token_ids' must have shape [batch, seq_len], got {list(ids.shape)}")
        b, s = ids.shape
        if b == 0:
            raise BadRequest("input 'token_ids' has batch size 0")
        if s == 0:
            raise BadRequest("empty prompt: input 'token_ids' has 0 tokens")
        if self.max_batch and b > self.max_batch:  # Triton checks this too; keep the message ours
            raise BadRequest(f"batch size {b} exceeds max_batch_size {self.max_batch}")
        bad = (ids < 0) | (ids >= self.cfg.vocab)
        if bad.any():
            r, c = map(int, np.argwhere(bad)[0])
            raise BadRequest(f"token id {int(ids[r, c])} at row {r}, position {c} is outside the vocabulary "
                             f"(0..{self.cfg.vocab - 1})")
        if s >= self.cfg.max_step:
            raise BadRequest(
                f"prompt too long: {s} tokens, the model's max_step is {self.cfg.max_step} "
                f"(prompt + new tokens must fit in it)"
            )
        fields: list[dict[str, Any]] = [{} for _ in range(b)]
        for name, (field, typ) in PARAM_INPUTS.items():
            p = pb_utils.get_input_tensor_by_name(request, name)
            if p is None:
                continue
            v = p.as_numpy().reshape(-1)
            if v.size != b:
                shape = list(p.as_numpy().shape)
                raise BadRequest(f"input '{name}' must have one value per row ([{b}, 1]), got shape {shape}")
            if typ is float and not np.isfinite(v).all():
                raise BadRequest(f"input '{name}' must be finite, got {v.tolist()}")
            for row, x in enumerate(v.tolist()):
                fields[row][field] = typ(x)
        prompts = ids.astype(np.int64).tolist()
        try:
            params = [SamplingParams(**f) for f in fields]
            self.engine.validate(prompts, params)
        except (RequestError, TypeError, ValueError) as e:
            raise BadRequest(str(e)) from None
        return Parsed(prompts, params)

    def _result(self, rows: list[list[int]]):
        width = max(len(r) for r in rows)
        out = np.full((len(rows), width), self.cfg.eos_id, dtype=np.int32)  # pad with EOS like LightSeq
        for i, r in enumerate(rows):
            out[i, : len(r)] = r
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("result", out)])

    # -----------------------------------------------------------------------------------------

    def execute(self, requests):
        if self.decoupled:
            for request in requests:
                self._stream(request)
            return None
        responses: list[Any] = [None] * len(requests)
        parsed: dict[int, Parsed] = {}
        for i, request in enumerate(requests):
            try:
                parsed[i] = self._parse(request)
            except BadRequest as e:
                responses[i] = _invalid(f"{self.name}: {e}")
        if parsed:
            # One engine call for every row of every valid request: the engine batches unequal prompts.
            prompts = [p for q in parsed.values() for p in q.prompts]
            params = [p for q in parsed.values() for p in q.params]
            try:
                rows = self.engine.generate(prompts, params)
            except Exception:  # noqa: BLE001 - report it on every request of the batch, keep serving
                err = traceback.format_exc(limit=3)
                pb_utils.Logger.log_error(f"{self.name}: generate failed: {err}")
                for i in parsed:
                    responses[i] = _internal(f"{self.name}: generation failed: {err.splitlines()[-1]}")
                return responses
            k = 0
            for i, q in parsed.items():
                responses[i] = self._result(rows[k : k + len(q.prompts)])
                k += len(q.prompts)
        return responses

    def _stream(self, request) -> None:
        sender = request.get_response_sender()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            q = self._parse(request)
            if len(q.prompts) != 1:
                raise BadRequest(f"the streaming model takes one prompt per request, got {len(q.prompts)}")
        except BadRequest as e:
            sender.send(_invalid(f"{self.name}: {e}"), flags=final)
            return
        dec = None
        if self.tokenizer is not None:
            from lsgpt.text import IncrementalDecoder

            dec = IncrementalDecoder(self.tokenizer, q.prompts[0])
        try:
            for tok in self.engine.stream(q.prompts[0], q.params[0]):
                outs = [pb_utils.Tensor("result", np.array([[tok]], dtype=np.int32))]
                if dec is not None:
                    outs.append(pb_utils.Tensor("text", np.array([[dec.push(tok).encode()]], dtype=np.object_)))
                sender.send(pb_utils.InferenceResponse(output_tensors=outs))
            outs = [pb_utils.Tensor("result", np.zeros((1, 0), dtype=np.int32))]
            if dec is not None:
                outs.append(pb_utils.Tensor("text", np.array([[dec.flush().encode()]], dtype=np.object_)))
            sender.send(pb_utils.InferenceResponse(output_tensors=outs), flags=final)
        except Exception:  # noqa: BLE001
            err = traceback.format_exc(limit=3)
            pb_utils.Logger.log_error(f"{self.name}: stream failed: {err}")
            sender.send(_internal(f"{self.name}: generation failed: {err.splitlines()[-1]}"), flags=final)

    def finalize(self) -> None:
        self.engine = None
