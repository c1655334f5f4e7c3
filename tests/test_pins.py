"""constraints.txt is the one source of versions (issue 30): scripts/setup.sh and every Dockerfile install through
it, and this environment runs exactly what it pins. The images' own installed versions are checked through the
real image in tests/test_container.py."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PINS = ROOT / "constraints.txt"


def check(pins: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "pins.py"), "--pins", str(pins)],
                          capture_output=True, text=True, timeout=120)


def test_environment_runs_the_pinned_versions():
    p = check(PINS)
    assert p.returncode == 0, p.stdout + p.stderr


def test_drift_is_caught(tmp_path):
    """A pin that differs from the installed version, a missing pin and a stale pin each fail the check."""
    text = PINS.read_text()
    drifted = tmp_path / "drifted.txt"
    drifted.write_text(re.sub(r"^transformers==.*$", "transformers==4.46.3", text, flags=re.M))
    p = check(drifted)
    assert p.returncode == 1 and "transformers: pinned 4.46.3, installed" in p.stdout
    missing = tmp_path / "missing.txt"
    missing.write_text(re.sub(r"^torch==.*\n", "", text, flags=re.M))
    p = check(missing)
    assert p.returncode == 1 and "torch==" in p.stdout and "not pinned" in p.stdout
    stale = tmp_path / "stale.txt"
    stale.write_text(text + "left-pad==1.0\n")
    p = check(stale)
    assert p.returncode == 1 and "left-pad: pinned, but nothing needs it" in p.stdout


def pip_installs(text: str) -> list[str]:
    """Every `pip install` command of a shell script or Dockerfile, with its continuation lines."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [m.group(0) for m in re.finditer(r"pip install[^\n&;]*", joined)]


def test_every_install_goes_through_the_pins():
    """setup.sh and the Dockerfiles that install our dependencies: `-c constraints.txt` and no version of their own
    (LightSeq's image is its own CUDA 11 stack and installs nothing from PyPI)."""
    for name in ("scripts/setup.sh", "docker/Dockerfile", "docker/Dockerfile.train"):
        installs = pip_installs((ROOT / name).read_text())
        assert installs, name
        for cmd in installs:
            if "--upgrade pip" in cmd or re.search(r"--no-deps (--no-build-isolation )?\./", cmd):
                continue  # pip itself; the project, without dependencies
            assert re.search(r"-c \S*constraints\.txt|\$\{PIN\[@\]\}", cmd), f"{name}: {cmd}"
            assert not re.search(r"[\w\]\"']==\d|>=\d", cmd), f"{name} pins a version itself: {cmd}"
    assert "pip install" not in (ROOT / "docker" / "Dockerfile.lightseq").read_text()
