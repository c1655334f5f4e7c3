#!/usr/bin/env bash
# The GPU fast path's evidence in one call of the lent GPU machine (issue 9), into $OUT:
#   1. the GPU tests (kernels vs float64 formulas, engine vs HF fp32 and vs the CPU integer path)  -> tests.log
#   2. the generation table: HF fp16 vs ours fp16/int8, batch 1..256, TTFT at 400 tokens, kernels per step
#                                                                                                   -> generate.json
#   3. served end to end: client -> tritonserver -> client vs in process, batch 1, 500 tokens      -> e2e/
# Step 3 needs wheels the GPU image lacks, carried in .whl/ (see results/h100/fastpath/NOTES.md):
# nvidia-pytriton==0.7.0 (stripped of libpython3.13 and the other stubs), tritonclient==2.51.0 (without
# perf_analyzer), protobuf<5 (the image's is too new for tritonclient 2.51's gRPC stubs), grpcio and python-rapidjson.
#
#   OUT=/out benchmarks/gpu_fastpath.sh            # about 9 minutes on an H100
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:?set OUT to the output folder}"
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
status=0
timeout 200 python3 -m pytest -q -p no:cacheprovider -o addopts="" -s \
    tests/test_kernels.py tests/test_gpu.py tests/test_engine_gpu.py > "$OUT/tests.log" 2>&1 || status=1
grep -E "passed|failed" "$OUT/tests.log" | tail -1
timeout 300 python3 benchmarks/bench_generate.py --batches 1,8,32,64,128,256 --ttft-prompt 400 --profile \
    --repeats 3 --out "$OUT/generate.json" 2>&1 | grep -v Warning | cut -c1-400 || status=1
timeout 120 python3 benchmarks/bench.py --sections e2e --device cuda --layers 12 --hidden 768 --heads 12 \
    --vocab 21128 --e2e-new-tokens 500 --e2e-runs 3 --out "$OUT/e2e" 2>&1 | tail -6 || status=1
exit $status
