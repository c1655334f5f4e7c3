#!/usr/bin/env bash
# Host overhead of serving on the GPU (issue 10), in one call of the lent GPU machine (< 8 min): the same
# in-flight load (benchmarks/serving.py --sections inflight: prompts 4..64, 16..256 new tokens, greedy) on a
# random 12-layer int8 GPT-2 (768 hidden, vocab 21128, max_step 1024), served (tritonserver, unary gRPC,
# gpt2_int8) and on the Scheduler alone in process, this checkout ("after") and $BEFORE ("before"), at
# concurrency $CONC (8,32). Each side compiles its own Triton kernels (TRITON_CACHE_DIR per side, shared by
# its served and in-process runs). Output tokens/s count new tokens only, on both paths; the served rows also
# give the CPU time per token of tritonserver, the model's stub and its named threads (lsgpt-sched, ...), and
# the mean running batch (tokens per decode step, from the model's metrics).
#
#   rm -rf results/tmp/gpu_before && mkdir -p results/tmp/gpu_before &&
#       git archive 50b394e lsgpt model_repository | tar -x -C results/tmp/gpu_before
#   BEFORE=results/tmp/gpu_before OUT=/out benchmarks/gpu_host_overhead.sh    # carry .whl and results/tmp/gpu_before
#
# Wheels in .whl/ as for `benchmarks/gpu.sh serving` (nvidia-pytriton, tritonclient, protobuf<5, grpcio,
# python-rapidjson, numpy<2 for the model stubs). Files: $OUT/<device>/serving/host-overhead/<side>-<path>/.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:?set OUT to the output folder}"
BEFORE="${BEFORE:?set BEFORE to a copy of the before commit (lsgpt/ and model_repository/)}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu.log") 2>&1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
if ls .whl/*.whl >/dev/null 2>&1; then
    pip_target() { "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$@"; }
    pip_target /tmp/site $(ls .whl/*.whl | grep -v /numpy-) && export PYTHONPATH="$PYTHONPATH:/tmp/site"
    if ls .whl/numpy-*.whl >/dev/null 2>&1; then pip_target /tmp/stub-site .whl/numpy-*.whl && export LSGPT_SITE_PACKAGES=/tmp/stub-site; fi
fi
DEV="$(cd benchmarks && "$PY" -c 'from common import device_slug; print(device_slug())' 2>/dev/null || echo gpu)"
echo "[gpu_host_overhead] $(date -u +%FT%TZ) $DEV before=$BEFORE"
(cd benchmarks && "$PY" -c 'from pathlib import Path; from common import export_pair as e, random_model as r
e(r(12, 768, 12), Path("/tmp"), 1024)') || exit 1
status=0
for side in after before; do
    pp="$PYTHONPATH"; [ "$side" = before ] && pp="$(cd "$BEFORE" && pwd):$PYTHONPATH"
    for path in served in-process; do
        flag="" limit=140; [ "$path" = in-process ] && flag=--in-process limit=80  # served: compiles the kernels
        PYTHONPATH="$pp" TRITON_CACHE_DIR="/tmp/triton-cache-$side" timeout "$limit" "$PY" benchmarks/serving.py \
            --sections inflight --hdf5 /tmp/int8.hdf5 --concurrency "${CONC:-8,32}" --requests "${REQUESTS:-192}" $flag \
            --out "$OUT/$DEV/serving/host-overhead/$side-$path" 2>&1 | grep -v Warning | cut -c1-600
        [ "${PIPESTATUS[0]}" = 0 ] || status=1
    done
done
echo "[gpu_host_overhead] $(date -u +%FT%TZ) done (status $status)"; find "$OUT" -type f | sort
exit $status
