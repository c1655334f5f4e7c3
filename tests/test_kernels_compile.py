"""The fused engine's Triton kernels compile for the GPUs we serve on, checked on a machine without one:
tests/gpu_compile.py records every kernel variant the engine's forward launches (decode at 1..256 rows either side
of each fusion's row limit, prefills; fp16 and int8; the opt-in fusions on) and compiles each through Triton's
whole pipeline to a cubin, with its shared memory under the GPU's limit. The oracle is Triton's own compiler and
ptxas: the interpreter the other CPU tests use accepts code they refuse."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia")

SCRIPT = Path(__file__).with_name("gpu_compile.py")
ROOT = SCRIPT.parents[1]


def test_every_kernel_variant_compiles_for_h100_and_a100(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    procs = {}
    for arch in (90, 80):  # one process each: the CPU box's two cores compile both at once
        env_arch = dict(env, TRITON_CACHE_DIR=str(tmp_path / f"cache{arch}"))  # compiled here, not found cached
        procs[arch] = subprocess.Popen([sys.executable, str(SCRIPT), "--arch", str(arch)], env=env_arch, cwd=ROOT,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for arch, p in procs.items():
        out, _ = p.communicate(timeout=600)
        print(out[-4000:])
        assert p.returncode == 0, out[-6000:]
        head = next(line for line in out.splitlines() if line.startswith(f"sm_{arch}: "))
        # every kernel the engine has, in enough variants that the fusions and the tile rules were all reached
        for name in ("_linear_kernel", "_attention_kernel", "_layer_norm_kernel", "_embed_kernel", "_ffn_kernel",
                     "_attn_block_kernel"):
            assert name in head, head
        n = int(head.split()[1])
        assert n >= 40, head
