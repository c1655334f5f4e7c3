"""Compile every Triton kernel variant the fused engine launches, for a real GPU target, on a machine without one.

The CPU tests run the kernels in Triton's interpreter (TRITON_INTERPRET=1), which accepts code the GPU compiler
refuses (a plain-int global read inside a kernel, for one: session 16's first GPU call found the LayerNorm-partials
kernels failing to compile, and the engine falling back to its reference path). Here the engine's forward runs on
the CPU with every launch recorded instead of run (a stand-in driver answers the device questions Triton asks
before it compiles), at the batch and prompt shapes that pick different tiles and variants, with every opt-in
fusion on; then each distinct specialisation goes through Triton's whole pipeline (TTIR → PTX → ptxas → cubin)
for the target, and its shared memory is checked against the GPU's per-block limit.

    python tests/gpu_compile.py --arch 90 80     # H100, A100 (from the repository's root)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the compiler, not the interpreter: before the first @triton.jit
os.environ.update(LSGPT_FUSED_LN="1", LSGPT_FUSED_FFN="1", LSGPT_FUSED_ATTN="1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}  # bytes of shared memory a block may opt in to

DECODE_ROWS = (1, 2, 8, 9, 16, 17, 64, 65, 256)  # either side of the fusions' row limits (8, 16) and the GEMM row tiles' (32, 64)
PREFILLS = ((1, 8), (1, 500), (3, 37))  # (prompts, tokens each)


class _NoGpu:
    """What JITFunction.run asks the active driver before it compiles."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target


def _models(folder: Path) -> tuple[Path, Path]:
    """The article's layer shape (768 hidden, 12 heads, vocab 21128), one layer: fp16 and int8 files."""
    from benchmarks.common import export_pair, random_model

    return export_pair(random_model(1, 768, 12), folder, 1024)


def fn_param(fn: JITFunction, path: tuple) -> bool:
    """Whether argument `path` is a declared tl.constexpr (not an integer Triton specialised to a constant)."""
    return fn.params[path[0]].is_constexpr


def record(arch: int, models: tuple[Path, Path]) -> dict:
    """Run the fused forward on the CPU at every shape; return {key: (kernel, signature, constexprs, options,
    attrs)} of the launches, which are compiled by nothing and run by nothing."""
    from lsgpt.engine import kernels
    from lsgpt.engine.engine import Engine
    from lsgpt.engine.fused import FusedForward

    seen: dict = {}

    def keep(self, key, signature, device, constexprs, options, attrs, warmup):
        # one compile per kernel, constants and launch options: Triton's integer specialisations (== 1, divisible
        # by 16) change the code's alignment hints, not what can fail to compile
        consts = tuple(sorted((p, repr(v)) for p, v in constexprs.items() if v != 1 or fn_param(self, p)))
        seen.setdefault((self.fn.__name__, consts, options.num_warps, options.num_stages, options.launch_pdl),
                        (self, signature, constexprs, options, attrs))
        return None  # nothing compiled: run() returns before launching

    driver.set_active(_NoGpu(arch))
    JITFunction._do_compile = keep
    # the launch options a GPU of this architecture gets (the kernels module reads them from the CUDA device)
    kernels._on_gpu = lambda: True
    kernels._pdl_available = lambda: arch >= 90
    kernels._sm_count = lambda: 132
    kernels._shared_memory = lambda: SHARED_LIMIT[arch]
    for path in models:
        os.environ["TRITON_INTERPRET"] = "1"  # the int8 GEMMs then keep the weight layout the kernels read
        try:
            fwd = FusedForward(Engine.load(path, "cpu", fused=False).model)
        finally:
            del os.environ["TRITON_INTERPRET"]
        for B, T in [(b, 1) for b in DECODE_ROWS] + list(PREFILLS):
            for cache_len in ((128, 1024) if T == 1 else (T,)):
                tokens = torch.randint(1, 1000, (B, T))
                positions = torch.full((B, T), cache_len - 1) if T == 1 else torch.arange(T).expand(B, T)
                fwd(tokens, positions, fwd.model.new_cache(B, cache_len), torch.arange(B) * T + T - 1)
    return seen


def compile_one(arch: int, fn: JITFunction, signature, constexprs, options, attrs) -> tuple[str, str | None]:
    """Compile one recorded launch for its target: (a line about it, the problem or None)."""
    consts = {fn.arg_names[p[0]]: v for p, v in constexprs.items() if fn_param(fn, p)}
    what = f"sm_{arch} {fn.fn.__name__} {consts}, {options.num_warps} warps, {options.num_stages} stages"
    t0 = time.perf_counter()
    try:
        k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                           options=options.__dict__)
    except Exception as e:  # noqa: BLE001 - reported with the variant
        why = [line for line in str(e).splitlines() if "Error" in line] or str(e).splitlines()[-1:]
        return what, f"{type(e).__name__}: {why[-1][:300]}"
    shared, limit = k.metadata.shared, SHARED_LIMIT[arch]
    line = f"{what}: {shared} B shared, {time.perf_counter() - t0:.1f} s"
    return line, (f"{shared} bytes of shared memory, over the {limit} a block may have" if shared > limit else None)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90], choices=sorted(SHARED_LIMIT),
                    help="compute capabilities x10 (90: H100, 80: A100)")
    args = ap.parse_args(argv)
    jobs = []  # (arch, kernel, signature, constexprs, options, attrs)
    with tempfile.TemporaryDirectory() as tmp:
        models = _models(Path(tmp))  # one export for every target
        for arch in args.arch:
            seen = record(arch, models)
            kinds = sorted({key[0] for key in seen})
            print(f"sm_{arch}: {len(seen)} kernel variants of {len(kinds)} kernels: {', '.join(kinds)}", flush=True)
            jobs.extend((arch, *job) for _, job in sorted(seen.items(), key=lambda kv: str(kv[0])))
    problems = 0
    for job in jobs:  # one at a time (a forked pool hangs on torch's threads; tests run one process per target)
        line, problem = compile_one(*job)
        print(f"FAILED {line}: {problem}" if problem else f"  {line}", flush=True)
        problems += problem is not None
    print(f"{len(jobs) - problems} of {len(jobs)} kernel variants compiled for sm_{', sm_'.join(map(str, args.arch))}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
