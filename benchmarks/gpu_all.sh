#!/usr/bin/env bash
# Everything the GPU machine can run without extra installs, in under 8 minutes, into $OUT.
#
#   OUT=/some/folder benchmarks/gpu_all.sh        # from the repository root or anywhere
#
# The lent H100 machine has Python 3.12, torch+CUDA, transformers, h5py, grpcio, protobuf and no network:
# no tritonserver, perf_analyzer or matplotlib. So it runs
#   1. bench.py --sections train,generate --compile --compile-batches 1  (the article's sizes: 12L/768H/vocab
#      21128, 500 new tokens, batch 1/8/32; HF fp16 vs ours fp16 vs int8, + compiled decode steps at batch 1;
#      Trainer tokens/s)
#   2. soak.py --in-process: the engine alone on the GPU for 45 s, batches 1..8, varied lengths; host RSS
#      and CUDA reserved memory over time (a leak in the KV caches / CUDA graphs would show here)
# and writes at most 8 files, none deeper than $OUT/a/b/file:
#   $OUT/gpu_all.log  $OUT/<dev>/bench.json  $OUT/<dev>/bench.md  $OUT/<dev>/soak/soak.json
#   (+ bench_*.png and soak.png only where matplotlib exists)
# Back on a machine with matplotlib, re-make the figures:
#   .venv/bin/python benchmarks/bench.py --replot <copy>/<dev>/bench.json
#   .venv/bin/python benchmarks/soak.py --replot <copy>/<dev>/soak/soak.json
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:?set OUT to the output folder}"
mkdir -p "$OUT"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ] && .venv/bin/python -c 'import torch' 2>/dev/null; then PY=.venv/bin/python; else PY=python3; fi
fi
LOG="$OUT/gpu_all.log"
DEV="$("$PY" -c 'import sys; sys.path.insert(0, "benchmarks"); from common import device_slug; print(device_slug())' 2>/dev/null || echo gpu)"
exec > >(tee -a "$LOG") 2>&1
echo "[gpu_all] $(date -u +%FT%TZ) $("$PY" -c 'import torch, sys; print(sys.version.split()[0], "torch", torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA")')"
nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu --format=csv,noheader 2>/dev/null || true
status=0

# 1. Training throughput (about 1 min), generation at batch 1/8/32 (about 1.5 min; saved as soon as done),
#    then the torch.compile'd engines at batch 1 only (compiling both engines costs about 2 min per batch
#    size: seen on an H100, the full --compile sweep alone ran past 5 min). Hard caps keep the total < 8 min.
timeout 370 "$PY" benchmarks/bench.py --sections train,generate --compile --compile-batches 1 --repeats 3 \
    --out "$OUT/$DEV" --train-arg=--steps=10 --train-timeout 150 \
    || { echo "[gpu_all] bench.py failed or timed out (exit $?): $OUT/$DEV/bench.json holds what finished"; status=1; }

# 2. In-process engine soak on the GPU (article shape, max_step 128): 45 s, batches 1..8.
timeout 80 "$PY" benchmarks/soak.py --in-process --device cuda --minutes 0.75 --warmup 12 --sample-every 1 \
    --tiny-shape 12,768,12,128 --max-batch 8 --max-new-tokens 8,32,64 --prompts builtin \
    --out "$OUT/$DEV/soak" || { echo "[gpu_all] soak failed or timed out (exit $?)"; status=1; }

echo "[gpu_all] $(date -u +%FT%TZ) done (status $status); files:"
find "$OUT" -type f | sort
exit $status
