"""The console scripts pyproject.toml declares are installed and start (each answers --help with its usage)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_the_clis_are_all_declared():
    targets = set(SCRIPTS.values())
    assert {"lsgpt.training.train:cli", "lsgpt.export.cli:main", "lsgpt.client.generate:main", "lsgpt.serving.launcher:main"} <= targets


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_console_script_runs(name):
    exe = Path(sys.executable).parent / name
    assert exe.is_file(), f"{exe} missing: reinstall the project (pip install -e '.[dev]')"
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage:" in r.stdout
