#!/usr/bin/env bash
# Serving on the lent GPU machine in one call (issues 9 and 10), into $OUT:
#   1. served end to end vs in process, batch 1, 500 tokens (bench.py e2e)                     -> e2e/
#   2. in-flight batching vs the dynamic-batching checkout in $BEFORE (same mixed load, 12-layer int8)
#                                                              -> inflight_after.json, inflight_before.json
# Needs the wheels of results/h100/fastpath/NOTES.md in .whl/ (tritonserver, tritonclient[grpc], and numpy<2:
# tritonserver 2.51's Python backend returns empty outputs under numpy 2, which GPU images carry).
#   BEFORE=.gpu_before OUT=/out benchmarks/gpu_serving.sh        # BEFORE: a copy of lsgpt/ + model_repository/
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:?set OUT to the output folder}"
mkdir -p "$OUT"
# numpy<2 goes to the model stubs only (LSGPT_SITE_PACKAGES comes first on their path): the image's scipy,
# which transformers imports here, needs numpy 2
pip_target() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$@"; }
pip_target /tmp/site $(ls .whl/*.whl | grep -v /numpy-)
pip_target /tmp/stub-site .whl/numpy-*.whl
export PYTHONPATH="$ROOT:/tmp/site" PYTHONUNBUFFERED=1 LSGPT_SITE_PACKAGES=/tmp/stub-site
python3 -c "import numpy, torch; print('numpy', numpy.__version__, 'torch', torch.__version__)"
PYTHONPATH=/tmp/stub-site python3 -c "import numpy, h5py, torch; print('stub side: numpy', numpy.__version__, 'h5py', h5py.__version__)"
status=0
timeout 200 python3 benchmarks/bench.py --sections e2e --device cuda --layers 12 --hidden 768 --heads 12 \
    --vocab 21128 --e2e-new-tokens 500 --e2e-runs 3 --out "$OUT/e2e" 2>&1 | grep -v Warn | tail -8 || status=1
python3 - <<'PY'
import sys; sys.path.insert(0, "benchmarks")
from pathlib import Path
import bench_generate as b
Path("/tmp/m").mkdir(exist_ok=True)
b.export_pair(b.random_model(12, 768, 12, 21128, 1024), Path("/tmp/m"), 1024)
PY
for side in after before; do
    root=(); [ "$side" = before ] && root=(--root "${BEFORE:-.gpu_before}")
    # each side compiles its own Triton kernels (a shared on-disk cache would hand the second side the
    # first side's compiles)
    TRITON_CACHE_DIR=/tmp/triton-cache-$side timeout 170 python3 benchmarks/inflight.py --hdf5 /tmp/m/int8.hdf5 "${root[@]}" --concurrency "${CONC:-1,8,32}" \
        --requests "${REQUESTS:-64}" --out "$OUT/inflight_$side.json" 2>&1 | grep "^{" || status=1
done
exit $status
