"""Exposed mode through the real server (docs/security.md): the admin APIs need the key header on HTTP and gRPC,
inference, health, metadata and model config do not; an oversized prompt is refused by the client before it is
sent and by the server with a clear error, and the server keeps serving."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

tritonclient_grpc = pytest.importorskip("tritonclient.grpc")
from conftest import make_repository
from tritonclient.utils import InferenceServerException

from lsgpt.serving.launcher import (
    ADMIN_HEADER,
    GRPC_ADMIN_HEADER,
    TritonServer,
    free_port,
    restricted_api_args,
)

KEY = "test-admin-key_0123"
GOOD = [2, 5, 6]


@pytest.fixture(scope="module")
def exposed(tiny_models, tmp_path_factory):
    repo = make_repository(tmp_path_factory.mktemp("repo"), tiny_models)
    server = TritonServer(repo, models=["gpt2"], grpc_port=free_port(), http_port=free_port(),
                          metrics_port=free_port(), exposed=True, admin_key=KEY)
    with server:
        server.wait_ready(180)
        yield server


def _http(server, method: str, path: str, body: dict | None = None, key: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(f"http://{server.http_url}{path}", method=method,
                                 data=None if body is None else json.dumps(body).encode())
    if key is not None:
        req.add_header(ADMIN_HEADER, key)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


# Each admin endpoint of Triton's HTTP API (v2 protocol and its extensions), one per restricted group.
ADMIN_HTTP = [
    ("POST", "/v2/repository/index", {}),  # model-repository
    ("GET", "/v2/systemsharedmemory/status", None),  # shared-memory
    ("POST", "/v2/systemsharedmemory/region/x/register", {"key": "/x", "offset": 0, "byte_size": 8}),
    ("GET", "/v2/models/gpt2/stats", None),  # statistics
    ("GET", "/v2/trace/setting", None),  # trace
    ("GET", "/v2/logging", None),  # logging
    ("POST", "/v2/logging", {"log_verbose_level": 1}),
]


@pytest.mark.parametrize("method, path, body", ADMIN_HTTP, ids=[f"{m} {p}" for m, p, _ in ADMIN_HTTP])
def test_admin_http_needs_the_key(exposed, method, path, body):
    code, text = _http(exposed, method, path, body)
    assert code == 403, (code, text)
    assert ADMIN_HEADER in text  # Triton names the header it expects, not the key
    assert KEY not in text
    assert _http(exposed, method, path, body, key="wrong")[0] == 403
    code, text = _http(exposed, method, path, body, key=KEY)
    if path.endswith("/register"):  # allowed now: Triton itself then refuses the made-up region
        assert code in (400, 500) and "shared memory" in text.lower(), (code, text)
    else:
        assert code == 200, (code, text)


def test_admin_grpc_needs_the_key(exposed):
    c = tritonclient_grpc.InferenceServerClient(exposed.grpc_url)
    calls = {
        "repository index": lambda **h: c.get_model_repository_index(**h),
        "shared memory": lambda **h: c.get_system_shared_memory_status(**h),
        "statistics": lambda **h: c.get_inference_statistics("gpt2", **h),
        "trace": lambda **h: c.get_trace_settings(**h),
        "logging": lambda **h: c.get_log_settings(**h),
    }
    for name, call in calls.items():
        for headers in (None, {GRPC_ADMIN_HEADER: "wrong"}, {ADMIN_HEADER: KEY}):  # the HTTP name is not enough
            with pytest.raises(InferenceServerException) as ei:
                call(headers=headers)
            # tritonserver 2.51 answers UNAVAILABLE (not PERMISSION_DENIED), naming the metadata key
            assert "restricted" in ei.value.message() and GRPC_ADMIN_HEADER in ei.value.message(), (name, ei.value)
            assert KEY not in ei.value.message()
        call(headers={GRPC_ADMIN_HEADER: KEY})  # served with the key
    c.close()


def test_inference_health_and_metadata_stay_open(exposed):
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/gpt2", "/v2/models/gpt2/config"):
        assert _http(exposed, "GET", path)[0] == 200, path
    c = tritonclient_grpc.InferenceServerClient(exposed.grpc_url)
    assert c.is_server_ready() and c.get_model_metadata("gpt2").name == "gpt2"
    inp = tritonclient_grpc.InferInput("token_ids", [1, 3], "INT32")
    inp.set_data_from_numpy(np.asarray([GOOD], np.int32))
    assert c.infer("gpt2", [inp]).as_numpy("result").shape[1] > 3
    c.close()


def _server_rss_mib(server) -> float:
    pids = [server.proc.pid, *server.stub_processes().values()]
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


def test_oversized_prompt_is_refused(exposed, tiny_models):
    """The client refuses a prompt no model can take before sending it; sent anyway (another client), the
    server answers INVALID_ARGUMENT and keeps serving. Time and memory of the server are printed."""
    from lsgpt.client.api import Client, InvalidRequest

    with Client(exposed.grpc_url, "gpt2", tiny_models.tokenizer) as cl:
        with pytest.raises(InvalidRequest, match="no model takes more than 1023"):
            cl.generate_ids([[5] * 5000])
    n = 4_000_000  # 16 MB of int32 token ids
    c = tritonclient_grpc.InferenceServerClient(exposed.grpc_url)
    inp = tritonclient_grpc.InferInput("token_ids", [1, n], "INT32")
    inp.set_data_from_numpy(np.full((1, n), 5, np.int32))
    before = _server_rss_mib(exposed)
    t0 = time.perf_counter()
    with pytest.raises(InferenceServerException) as ei:
        c.infer("gpt2", [inp], client_timeout=60)
    took = time.perf_counter() - t0
    after = _server_rss_mib(exposed)
    print(f"\noversized request ({n} ids, {4 * n / 2**20:.0f} MiB): {ei.value.status()} in {took:.2f} s; "
          f"server RSS {before:.0f} -> {after:.0f} MiB")
    assert str(ei.value.status()).endswith("INVALID_ARGUMENT") and "too long" in ei.value.message()
    small = tritonclient_grpc.InferInput("token_ids", [1, 3], "INT32")
    small.set_data_from_numpy(np.asarray([GOOD], np.int32))
    assert c.infer("gpt2", [small]).as_numpy("result").shape[1] > 3  # still serving
    c.close()


def test_no_key_means_closed_and_keys_are_checked():
    flags, note = restricted_api_args(None)
    flags2, _ = restricted_api_args(None)
    assert flags != flags2 and "closed" in note  # a fresh random key nobody knows
    assert all(a in flags[0] for a in ("model-repository", "shared-memory", "statistics", "trace", "logging"))
    assert "inference" not in flags[0] and "health" not in flags[0]
    from lsgpt.serving.launcher import LaunchError

    with pytest.raises(LaunchError, match="letters, digits"):
        restricted_api_args("bad key,with=chars")


def test_poll_setting_and_key_sources(tmp_path):
    from lsgpt.serving.launcher import LaunchError, admin_key

    s = TritonServer(tmp_path, poll_secs=0, host="0.0.0.0", admin_key=KEY)
    s.workdir = tmp_path
    cmd = s.command(tmp_path, Path("tritonserver"))
    assert "--model-control-mode=none" in cmd and not any(a.startswith(("--repository-poll", "--model-control-mode=p")) for a in cmd)
    assert any(a.startswith("--http-restricted-api=") and a.endswith(f"{ADMIN_HEADER}={KEY}") for a in cmd)
    loop = TritonServer(tmp_path, host="127.0.0.1")
    loop.workdir = tmp_path
    assert not any("restricted" in a for a in loop.command(tmp_path, Path("tritonserver")))  # loopback: as before
    assert admin_key({"LSGPT_ADMIN_KEY": " k1 "}) == "k1"
    (tmp_path / "key").write_text("k2\n")
    assert admin_key({"LSGPT_ADMIN_KEY_FILE": str(tmp_path / "key")}) == "k2"
    assert admin_key({}) is None
    with pytest.raises(LaunchError, match="LSGPT_ADMIN_KEY_FILE"):
        admin_key({"LSGPT_ADMIN_KEY_FILE": str(tmp_path / "missing")})
