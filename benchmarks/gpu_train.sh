#!/usr/bin/env bash
# Issue 16's GPU evidence in one call (training fast path): versions; Trainer throughput, HF fp16 vs ours fp16 /
# int8 QAT with and without the fast path, peak memory, per-mode kernel profiles; the compiled fake quantizer's
# exactness and the CUDA-graph training step (ours-*-graphs, LSGPT_COMPILE_MODE=reduce-overhead) against eager.
# Everything lands in $OUT (default results/tmp/gpu_train); each part has its own time limit so that a slow
# part still leaves the others' results.
#
#   OUT=results/tmp/gpu_train benchmarks/gpu_train.sh        (on the GPU machine: PY=python3 there)
set -uo pipefail
OUT=${OUT:-results/tmp/gpu_train}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
T_TT=${T_TT:-260} T_TEST=${T_TEST:-40}
TT_ARGS=${TT_ARGS:---profile /tmp/lsgpt_prof --modes hf-fp16,ours-fp16,ours-int8,ours-fp16-graphs,ours-int8-graphs}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c 'import torch, transformers, accelerate, triton; print("torch", torch.__version__, "transformers", transformers.__version__, "accelerate", accelerate.__version__, "triton", triton.__version__)'
} 2>&1 | tee "$OUT/env.txt"

echo "== throughput: $PY -m benchmarks.train_throughput --out $OUT/throughput.json $TT_ARGS"
timeout "$T_TT" $PY -m benchmarks.train_throughput --out "$OUT/throughput.json" $TT_ARGS >"$OUT/throughput.log" 2>&1
echo "exit $?"; grep -v '^\[train_throughput\]' "$OUT/throughput.log" | tail -14
[ -d /tmp/lsgpt_prof ] && for f in /tmp/lsgpt_prof/*.txt; do echo "=== $f"; cat "$f"; done >"$OUT/profiles.txt"

echo "== compiled fake quantizer / regions vs eager (pytest)"
timeout "$T_TEST" $PY -m pytest -q -p no:cacheprovider tests/test_qat.py -k "${TEST_K:-(compiled and cuda) or cuda_graph}" -x 2>&1 | tail -15 >>"$OUT/env.txt"
tail -4 "$OUT/env.txt"
