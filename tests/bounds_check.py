"""Out-of-bounds check of the fused kernels in the Triton interpreter: not a test module (pytest does not collect it).

A GPU reports an illegal address long after the kernel that made it (tens of launches later, without a sync),
and a read just past a tensor usually lands in memory the allocator owns and faults only sometimes. Here the
kernels run in the interpreter (TRITON_INTERPRET=1) with every load, store and atomic checked: each address a
kernel touches (its mask applied) must lie inside the storage of one of the tensors passed to that launch.
The first address outside stops the run with the kernel's name and the shape being run.

    PYTHONPATH=. .venv/bin/python tests/bounds_check.py            # fp16 and int8, prefill shapes and decode steps (~10 min)
    PYTHONPATH=. .venv/bin/python tests/bounds_check.py int8 --quick

Shapes: prefills of k prompts of t tokens into a scratch cache of length t (as ``Scheduler._prefill``), then
decode steps of 1..4 rows over a 256-slot cache at early and late positions (split attention and its merge).
Exit status 1 on the first out-of-bounds access. PDL and the L2 prefetch are GPU-only and not covered.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton.runtime.interpreter as interp  # noqa: E402

_ranges: list[tuple[int, int]] = []  # [start, end) of each tensor argument's storage, for the running launch
_kernel = ["?"]


class OutOfBounds(RuntimeError):
    pass


def _record_launch(launch):
    def wrapper(self, *args, **kwargs):
        _ranges.clear()
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor):
                st = a.untyped_storage()
                _ranges.append((st.data_ptr(), st.data_ptr() + st.nbytes()))
        _kernel[0] = getattr(self.fn, "__name__", "?")
        return launch(self, *args, **kwargs)
    return wrapper


def _check(ptrs, mask, itemsize: int, what: str) -> None:
    addr = ptrs.data.astype(np.uint64)
    if mask is not None:
        addr = addr[np.broadcast_to(mask.data.astype(bool), addr.shape)]
    inside = np.zeros(addr.shape, dtype=bool)
    for lo, hi in _ranges:
        inside |= (addr >= lo) & (addr + itemsize <= hi)
    if not inside.all():
        raise OutOfBounds(f"{what} outside its tensors in {_kernel[0]}: {int((~inside).sum())} address(es)")


def install() -> None:
    """Wrap the interpreter's launches and memory operations with the check."""
    interp.GridExecutor.__call__ = _record_launch(interp.GridExecutor.__call__)
    b = interp.InterpreterBuilder
    load, store, rmw = b.create_masked_load, b.create_masked_store, b.create_atomic_rmw

    def checked_load(self, ptrs, mask, other, *rest):
        _check(ptrs, mask, np.dtype(interp._get_np_dtype(ptrs.get_element_ty())).itemsize, "load")
        return load(self, ptrs, mask, other, *rest)

    def checked_store(self, ptrs, value, mask, *rest):
        _check(ptrs, mask, value.data.dtype.itemsize, "store")
        return store(self, ptrs, value, mask, *rest)

    def checked_rmw(self, op, ptr, val, mask, *rest):
        _check(ptr, mask, val.data.dtype.itemsize, "atomic")
        return rmw(self, op, ptr, val, mask, *rest)

    b.create_masked_load, b.create_masked_store, b.create_atomic_rmw = checked_load, checked_store, checked_rmw


def engines(tmp: str, which: list[str]):
    """The GPU tests' model shape (4 layers, 256 hidden, 8 heads, vocab 4096, max_step 256), fp16 and int8."""
    from benchmarks.common import export_pair, random_model
    from lsgpt.engine.engine import Engine

    fp, q = export_pair(random_model(4, 256, 8, vocab=4096, positions=256), Path(tmp), 256)
    for name, path in (("fp16", fp), ("int8", q)):
        if name in which:
            yield name, Engine.load(path, "cpu", fused=True)


def main() -> int:
    import tempfile

    from lsgpt.engine.model import KVCache

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("which", nargs="*", default=["fp16", "int8"], choices=["fp16", "int8"])
    ap.add_argument("--quick", action="store_true", help="a few shapes only (about a minute per model)")
    a = ap.parse_args()
    install()
    prefill = [(2, 1), (3, 1), (1, 1), (1, 17), (2, 8)] if a.quick else \
        [(k, t) for k in (1, 2, 3, 4) for t in (1, 2, 16, 17, 33)] + [(1, 64), (1, 65), (2, 22)]
    decode = [(1, 200), (4, 0)] if a.quick else [(n, p) for n in (1, 2, 3, 4) for p in (0, 63, 64, 200, 255)]
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        for name, e in engines(tmp, a.which):
            shape = None
            try:
                for shape in prefill:
                    k, t = shape
                    e.forward_logits(torch.randint(0, 4096, (k, t)), torch.arange(t).expand(k, t),
                                      e.model.new_cache(k, t), last=torch.arange(k) * t + t - 1)
                cache = e.model.new_cache(4, 256)
                for shape in decode:
                    n, p = shape
                    e.forward_logits(torch.randint(0, 4096, (n, 1)), torch.full((n, 1), p),
                                      KVCache([c[:n] for c in cache.k], [c[:n] for c in cache.v]))
            except Exception as ex:  # noqa: BLE001 - the interpreter wraps OutOfBounds in its own error
                print(f"{name}: FAILED at {shape}: {ex}")
                return 1
            print(f"{name}: {len(prefill)} prefill shapes and {len(decode)} decode steps in bounds "
                  f"({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
