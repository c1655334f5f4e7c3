"""LightSeq 3.0.1's own HDF5 loaders (``GptWeight``, ``QuantGptWeight``), compiled on the CPU and run on a file.

The C++ sources are the ``lightseq==3.0.1`` wheel's, as they are (``proto/gpt_weight.cc``,
``proto/quant_gpt_weight.cc``, ``tools/util.cc.cu``, the protoc output of ``gpt.proto`` / ``quant_gpt.proto``);
``tests/lightseq_loader/`` holds the driver, the stand-in CUDA headers and the Makefile. The build goes into
``$LSGPT_CACHE`` (default ``~/.cache/lsgpt``)``/lightseq-loader-<hash>/``, the hash covering every input (sources,
stubs, driver, Makefile, compiler, protoc, HDF5, protobuf and thrust versions), so CI builds it once.

    PYTHONPATH=tests python -m oracles.lightseq_loader [FILE.hdf5 ...]   # build (or reuse it), load files
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parents[1] / "lightseq_loader"
LS_SOURCES = ("proto/gpt_weight.h", "proto/gpt_weight.cc", "proto/quant_gpt_weight.h", "proto/quant_gpt_weight.cc",
              "proto/gpt.proto", "proto/quant_gpt.proto", "tools/util.h", "tools/util.cc.cu")
# what the build needs, by Debian package (scripts/setup.sh installs them as root)
NEEDS = {
    "g++": ("g++", lambda: shutil.which(os.environ.get("CXX", "g++"))),
    "make": ("make", lambda: shutil.which("make")),
    "protoc": ("protobuf-compiler", lambda: shutil.which("protoc")),
    "protobuf headers": ("libprotobuf-dev", lambda: Path("/usr/include/google/protobuf/message.h").is_file()),
    "HDF5 headers": ("libhdf5-dev", lambda: any(Path(d, "hdf5.h").is_file()
                                                for d in ("/usr/include/hdf5/serial", "/usr/include"))),
    "thrust": ("libthrust-dev", lambda: Path("/usr/include/thrust/device_vector.h").is_file()),
}


def lightseq_inference_dir() -> Path | None:
    from oracles.lightseq_src import lightseq_proto_dir

    d = lightseq_proto_dir()
    return d.parent if d is not None else None


def missing() -> list[str]:
    """What the build lacks, as 'name (Debian package)'; empty when it can build."""
    out = [f"{name} ({pkg})" for name, (pkg, ok) in NEEDS.items() if not ok()]
    if lightseq_inference_dir() is None:
        out.append("lightseq==3.0.1 (pip, scripts/setup.sh)")
    return out


def _version(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    except OSError:
        return "absent"


def cache_key() -> str:
    ls = lightseq_inference_dir()
    h = hashlib.sha256()
    for root, p in [*((ls, ls / s) for s in LS_SOURCES), *((HERE, p) for p in sorted(HERE.rglob("*"))),
                    (Path("/usr/include"), Path("/usr/include/thrust/version.h"))]:
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    for cmd in ([os.environ.get("CXX", "g++"), "--version"], ["protoc", "--version"],
                ["pkg-config", "--modversion", "hdf5", "protobuf"]):
        h.update(_version(cmd).encode())
    return h.hexdigest()[:16]


def cache_root() -> Path:
    return Path(os.environ.get("LSGPT_CACHE") or Path.home() / ".cache" / "lsgpt")


@dataclass
class Build:
    binary: Path
    seconds: float  # time this call spent (the build, or finding it cached)
    cached: bool


def build(jobs: int = 2) -> Build:
    """Build the driver (or find it in the cache); raises RuntimeError with the compiler's output on failure."""
    t0 = time.monotonic()
    out = cache_root() / f"lightseq-loader-{cache_key()}"
    binary = out / "lightseq_loader_driver"
    if binary.is_file():
        return Build(binary, time.monotonic() - t0, True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".lightseq-loader.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time (parallel test runs, CI jobs on one runner)
        if binary.is_file():
            return Build(binary, time.monotonic() - t0, True)
        tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
        proc = subprocess.run(["make", "-s", f"-j{jobs}", "-f", str(HERE / "Makefile"),
                               f"LS={lightseq_inference_dir()}", f"OUT={tmp}"], capture_output=True, text=True)
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError(f"building LightSeq's loaders failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        os.replace(tmp, out)
    return Build(binary, time.monotonic() - t0, False)


@dataclass
class Loaded:
    """What LightSeq's loader read from one file (the driver's LSLOAD lines), or why it refused it."""

    rc: int
    error: str | None = None
    conf: dict[str, str] = field(default_factory=dict)
    clips: dict[str, float] = field(default_factory=dict)  # float32 values, exact
    weights: dict[str, tuple[int, int, float, float, int]] = field(default_factory=dict)
    stdout: str = ""
    stderr: str = ""

    @property
    def ok(self) -> bool:
        return self.rc == 0 and self.error is None and "LSLOAD ok" in self.stdout

    def conf_int(self, name: str) -> int:
        return int(self.conf[name])

    def conf_float(self, name: str) -> float:
        return float.fromhex(self.conf[name])

    def sampling_method(self) -> bytes:
        v = self.conf["sampling_method"]
        return b"" if v == "-" else bytes.fromhex(v)


def parse(rc: int, stdout: str, stderr: str) -> Loaded:
    r = Loaded(rc=rc, stdout=stdout, stderr=stderr)
    for line in stdout.splitlines():
        if not line.startswith("LSLOAD "):
            continue
        tag, _, rest = line[len("LSLOAD "):].partition(" ")
        if tag == "error":
            r.error = rest
        elif tag == "conf":
            k, v = rest.split(" ", 1)
            r.conf[k] = v
        elif tag == "clip":
            k, v = rest.split(" ", 1)
            r.clips[k] = float.fromhex(v)
        elif tag == "weight":
            name, n, nonfinite, s, sq, bits = rest.split(" ")
            r.weights[name] = (int(n), int(nonfinite), float(s), float(sq), int(bits))
    return r


def load(binary: Path, path: str | os.PathLike, kind: str, timeout: float = 300) -> Loaded:
    """Run the loader on `path`: kind 'fp16' -> GptWeight<FP16>, 'int8' -> QuantGptWeight<FP16>."""
    which = {"fp16": "gpt", "int8": "quant_gpt"}[kind]
    proc = subprocess.run([str(binary), which, str(path)], capture_output=True, text=True, timeout=timeout,
                          errors="replace")
    return parse(proc.returncode, proc.stdout, proc.stderr)


def main(argv: list[str]) -> int:
    if missing():
        print("cannot build LightSeq's loaders: missing " + ", ".join(missing()))
        return 1
    b = build()
    print(f"{b.binary} ({'cached' if b.cached else 'built'} in {b.seconds:.1f}s)")
    for p in argv:
        r = load(b.binary, p, "int8" if "int8" in Path(p).name else "fp16")
        print(p, "->", "ok" if r.ok else f"error: {r.error} (rc={r.rc})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
