"""The served contract (lsgpt/contract.py) is what the config.pbtxt files declare, what the engine and the client
enforce, and what the publisher writes. The configs are parsed with Triton's own protobuf schema."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from lsgpt import contract as C
from lsgpt.repository import MODELS

ROOT = Path(__file__).resolve().parents[1]
OURS = [name for m, kind in MODELS.items() for name in (m, *kind.also)]


def _config(name: str):
    return text_format.Parse((ROOT / "model_repository" / name / "config.pbtxt").read_text(), mc.ModelConfig())


@pytest.mark.parametrize("name", OURS)
def test_config_declares_the_contract(name):
    cfg = _config(name)
    assert cfg.name == name and cfg.backend == C.BACKEND
    inputs = {i.name: (mc.DataType.Name(i.data_type).removeprefix("TYPE_"), list(i.dims)) for i in cfg.input}
    assert inputs == C.INPUTS
    assert all(i.optional for i in cfg.input)  # token_ids or text_input; the rest default to the file's values
    outputs = {o.name: (mc.DataType.Name(o.data_type).removeprefix("TYPE_"), list(o.dims)) for o in cfg.output}
    assert outputs == (C.STREAM_OUTPUTS if name.endswith(C.STREAM_SUFFIX) else C.OUTPUTS)
    assert cfg.model_transaction_policy.decoupled == name.endswith(C.STREAM_SUFFIX)
    assert cfg.parameters["max_running_rows"].string_value == C.MAX_RUNNING_ROWS == "auto"
    assert {cfg.parameters[k].string_value for k in ("max_prefill_tokens", "admit_every")} == {"auto"}
    assert int(cfg.parameters["max_queued_requests"].string_value) == C.MAX_QUEUED_REQUESTS


def test_every_stream_twin_is_published_with_its_model():
    on_disk = {p.parent.name for p in (ROOT / "model_repository").glob("*/config.pbtxt")}
    ours = {n for n in on_disk if _config(n).backend == C.BACKEND}
    assert ours == set(OURS)
    for m, kind in MODELS.items():
        assert kind.also == (m + C.STREAM_SUFFIX,)


# Limits, from the documented meaning of each parameter (HF / OpenAI / LightSeq), not from the table itself.
GOOD = {"max_new_tokens": 1, "top_k": 0, "top_p": 1.0, "temperature": 0.0, "seed": 2**63 - 1,
        "repetition_penalty": 1e-3, "presence_penalty": -2.0, "frequency_penalty": 2.0}
BAD = {"max_new_tokens": 0, "top_k": -1, "top_p": 0.0, "temperature": float("inf"), "seed": 2**63,
       "repetition_penalty": 0.0, "presence_penalty": 2.01, "frequency_penalty": float("nan")}


@pytest.mark.parametrize("name", list(C.PARAMS))
def test_param_limits(name):
    import numpy as np

    assert C.param_error(name, GOOD[name]) is None
    assert C.param_error(name, None) is None
    why = C.param_error(name, BAD[name])
    assert why and name in why
    assert C.param_error(name, True) is not None  # a bool is not a number here
    if C.PARAMS[name].type is int:
        assert C.param_error(name, 1.5) is not None
        assert C.param_error(name, np.int32(GOOD[name] if name != "seed" else 7)) is None
    else:
        assert C.param_error(name, np.float32(GOOD[name])) is None
        assert C.param_error(name, "0.5") is not None


def test_engine_and_client_enforce_the_same_limits(tiny_models):
    from lsgpt.client.api import InvalidRequest, check_sampling
    from lsgpt.engine.engine import Engine, RequestError, SamplingParams

    eng = Engine.load(tiny_models.fp16, device="cpu")
    for name, v in BAD.items():
        with pytest.raises(RequestError, match=name):
            eng.validate([[1, 2]], SamplingParams(**{name: v}))
        with pytest.raises(InvalidRequest, match=name):
            check_sampling({name: v})
    eng.validate([[1, 2]], SamplingParams(**GOOD))
    assert check_sampling(GOOD) == GOOD
