#!/usr/bin/env bash
# Issue 32's GPU evidence, in two calls of < 9.5 min on one H100; everything lands in $OUT, each part under its own
# time limit so that a slow part still leaves the others' results.
#   PART=speed (default): versions; throughput over 3 interleaved rounds of HF fp16 / ours fp16 / ours int8 QAT
#     on the default path (one graph replayed as CUDA graphs), profiles with the GPU-busy fraction; the path before
#     (a graph per block, no CUDA graphs) and the plain path once, profiled; the fast path's CUDA tests.
#   PART=learn: benchmarks.train_loss_match (200 steps, fast vs plain, fp16 and int8 QAT, the fast QAT file through
#     the engine). Its corpus: data/full (training/prepare_corpus.py; carry `data` to the GPU machine).
#   PART=quality: benchmarks.qat_quality --handover continue (fp16 600+200 vs QAT from the fp16 step-600 checkpoint
#     vs PTQ, the article's model, the same corpus; ~4 min on the H100).
#
#   OUT=results/tmp/gpu_train benchmarks/gpu_train.sh        (on the GPU machine: PY=python3 there; ~540 s)
# A part stopped by its limit leaves each finished mode in its .log ([train_throughput] lines).
# learn and quality run study scripts that left the tree once recorded (benchmarks at most a quarter of the code;
# docs/decisions.md): bring them back untracked first, and they travel with the call:
#   git show 8208c67:benchmarks/train_loss_match.py > benchmarks/train_loss_match.py
#   git show 8208c67:benchmarks/qat_quality.py > benchmarks/qat_quality.py
set -uo pipefail
OUT=${OUT:-results/tmp/gpu_train}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c 'import torch, transformers, accelerate, triton; print("torch", torch.__version__, "transformers", transformers.__version__, "accelerate", accelerate.__version__, "triton", triton.__version__)'
} 2>&1 | tee "$OUT/env.txt"

tt() {  # name, time limit, arguments of benchmarks.train_throughput
  local name=$1 limit=$2; shift 2
  echo "== $name: $PY -m benchmarks.train_throughput --out $OUT/$name.json $*"
  timeout "$limit" $PY -m benchmarks.train_throughput --out "$OUT/$name.json" "$@" >"$OUT/$name.log" 2>&1
  echo "exit $?"; grep -v '^\[train_throughput\]' "$OUT/$name.log" | tail -12
}
case "${PART:-speed}" in quality) script=qat_quality ;; learn) script=train_loss_match ;; *) script= ;; esac
if [ -n "$script" ] && [ ! -f "benchmarks/$script.py" ]; then
  echo "benchmarks/$script.py is not in the tree: git show 8208c67:benchmarks/$script.py > benchmarks/$script.py"; exit 2
fi
if [ "${PART:-speed}" = speed ]; then
  tt throughput "${T_TT:-300}" --repeats 3 --steps 30 --modes hf-fp16,ours-fp16,ours-int8 --profile "$OUT/prof"
  echo "== CUDA tests of the fast path (pytest)"
  timeout "${T_TEST:-120}" $PY -m pytest -q -p no:cacheprovider tests/test_qat.py -k "cuda" -x 2>&1 | tail -15 | tee "$OUT/tests.txt"
  tt before "${T_BEFORE:-110}" --steps 20 --modes ours-fp16-blocks,ours-int8-blocks,ours-fp16-plain,ours-int8-plain --profile "$OUT/prof"
  grep -h "GPU busy" "$OUT"/prof/*.txt /dev/null
elif [ "$PART" = quality ]; then
  echo "== QAT quality: $PY -m benchmarks.qat_quality --handover continue --train-file data/full/train.txt --tokenizer data/full/tokenizer"
  timeout "${T_Q:-540}" $PY -m benchmarks.qat_quality --handover continue --train-file data/full/train.txt \
    --tokenizer data/full/tokenizer --out "$OUT/qat_quality" --work /tmp/qat_quality_work >"$OUT/qat_quality.log" 2>&1
  echo "exit $?"; tail -30 "$OUT/qat_quality.log"; cat "$OUT/qat_quality/qat_quality.md" 2>/dev/null
else
  echo "== loss match: $PY -m benchmarks.train_loss_match --out $OUT/loss_match --max_steps ${STEPS:-200}"
  timeout "${T_LM:-540}" $PY -m benchmarks.train_loss_match --out "$OUT/loss_match" --max_steps "${STEPS:-200}" \
    >"$OUT/loss_match.log" 2>&1
  echo "exit $?"; tail -40 "$OUT/loss_match.log"
  rm -rf "$OUT"/loss_match/*-plain "$OUT"/loss_match/*-fast "$OUT"/loss_match/*.hdf5  # checkpoints, GBs
fi
