#!/usr/bin/env bash
# Issue 16, two GPUs: training/train.py (the article's command, fp16 fast path, then int8 QAT resumed from the fp16
# output) on 1 GPU and through `torchrun --nproc_per_node=2` (NCCL) in one call. Steady-state tokens/s and step
# time (steps after $WARM excluded: compilation/warm-up), peak GPU memory per rank, scaling 2-GPU/1-GPU; per-step
# losses at the same global batch (1 GPU x 32 vs 2 GPUs x 16, same seed and data) against a noise reference (1 GPU
# x 32 with vs without the fast path: other dropout masks and kernel numerics, same everything else).
# benchmarks/train_multi_gpu.py adds only a timing/memory TrainerCallback to train.py (see its docstring).
# Every part has its own time limit under one overall budget ($BUDGET s) so a slow part leaves the others.
# $OUT gets results.json, results.md, env.txt, run.log and logs.tgz (each run's log, timing and metrics).
#
#   OUT=$OUT bash benchmarks/train_multi_gpu.sh                 (the 2-GPU machine; PY=python3 there)
#   CPU check: PY=.venv/bin/python EXTRA="--config_overrides n_layer=2,n_embd=64,n_head=2" BLOCK=64 \
#              STEPS=8 WARM=3 OUT=/tmp/mg bash benchmarks/train_multi_gpu.sh
set -uo pipefail
OUT=${OUT:-results/tmp/train_multi_gpu}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
       TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
# the device machines' rule: NVLink multicast stays off (NCCL, PyTorch symmetric memory, NVSHMEM)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY=${PY:-python3}
TORCHRUN=${TORCHRUN:-"$PY -m torch.distributed.run"}
STEPS=${STEPS:-80} WARM=${WARM:-20} BLOCK=${BLOCK:-500} BUDGET=${BUDGET:-530} EXTRA=${EXTRA:-}
RUNS=${RUNS:-/tmp/lsgpt_mg}
export MG_WARMUP=$WARM
START=$(date +%s)
rm -rf "$RUNS"; mkdir -p "$RUNS"
exec > >(tee -a "$OUT/run.log") 2>&1

{ nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  nvidia-smi topo -m 2>/dev/null | head -4
  $PY -c 'import torch, transformers, accelerate; print("torch", torch.__version__, "cuda", torch.version.cuda, "nccl", torch.cuda.nccl.version() if torch.cuda.is_available() else None, "transformers", transformers.__version__, "accelerate", accelerate.__version__)'
} 2>&1 | tee "$OUT/env.txt"

# Training text: data/ is git-ignored; use it if it came along, else build the offline corpus here.
TRAIN=${TRAIN:-data/train.txt} TOK=${TOK:-data/tokenizer}
if [ ! -s "$TRAIN" ] || [ ! -d "$TOK" ]; then
  echo "== no $TRAIN / $TOK here: training/prepare_corpus.py --out /tmp/mg_data/train.txt"
  $PY training/prepare_corpus.py --out /tmp/mg_data/train.txt --tokenizer_out /tmp/mg_data/tokenizer 2>&1 | tail -3
  TRAIN=/tmp/mg_data/train.txt TOK=/tmp/mg_data/tokenizer
fi
echo "corpus: $TRAIN ($(wc -c <"$TRAIN") bytes), tokenizer $TOK" | tee -a "$OUT/env.txt"

COMMON="--train_file $TRAIN --block_size $BLOCK --per_device_eval_batch_size 8 --learning_rate 1.5e-4 --fp16
 --logging_steps 1 --max_steps $STEPS --seed 42 --report_to none --disable_tqdm true --overwrite_output_dir
 --save_strategy no"
SCRATCH="--tokenizer_name $TOK $EXTRA"   # the default GPT-2 config: 12 layers, 768 hidden, 12 heads; vocab 21128

left() { echo $((START + BUDGET - $(date +%s))); }
# part NAME NPROC LIMIT_S ARGS...: one train.py run under `timeout`, capped by what is left of the budget
part() {
  local name=$1 nproc=$2 lim=$3; shift 3
  local l; l=$(left)
  [ "$l" -lt "$lim" ] && lim=$l
  if [ "$lim" -lt 25 ]; then echo "== $name: skipped ($l s left)"; return; fi
  local launch
  if [ "$nproc" -gt 1 ]; then
    launch="$TORCHRUN --standalone --nproc_per_node=$nproc -m benchmarks.train_multi_gpu train"
  else
    launch="$PY -m benchmarks.train_multi_gpu train"
  fi
  echo "== $name ($nproc proc, limit ${lim}s): $launch $* --output_dir $RUNS/$name"
  local t=$(date +%s)
  if [ "$nproc" -gt 1 ]; then
    timeout -k 10 "$lim" $launch "$@" --output_dir "$RUNS/$name" >"$RUNS/$name.log" 2>&1
  else  # one GPU: without this the Trainer would wrap the model in nn.DataParallel over both cards
    CUDA_VISIBLE_DEVICES=0 timeout -k 10 "$lim" $launch "$@" --output_dir "$RUNS/$name" >"$RUNS/$name.log" 2>&1
  fi
  local rc=$?
  echo "   exit $rc after $(( $(date +%s) - t )) s; $(grep -h 'perplexity' "$RUNS/$name.log" | tail -1)"
  [ $rc -ne 0 ] && tail -15 "$RUNS/$name.log"
}

FP16="$SCRATCH $COMMON --enable_quant false"
if [ -n "${SCALING_ONLY:-}" ]; then
  # throughput only, each pair twice in alternating order (is the 1-vs-2-GPU ratio reproducible within a call?)
  part fp16-1gpu-b16 1 "${T1:-80}" $FP16 --per_device_train_batch_size 16
  part fp16-2gpu-b16 2 "${T2:-100}" $FP16 --per_device_train_batch_size 16
  part fp16-2gpu-b16-rep 2 60 $FP16 --per_device_train_batch_size 16
  part fp16-1gpu-b16-rep 1 50 $FP16 --per_device_train_batch_size 16
  INT8="--model_name_or_path uer/gpt2-chinese-cluecorpussmall --resume_from_checkpoint $RUNS/fp16-1gpu-b16 $COMMON --enable_quant true"
  part int8-2gpu-b16 2 80 $INT8 --per_device_train_batch_size 16
  part int8-1gpu-b16 1 80 $INT8 --per_device_train_batch_size 16
  $PY -m benchmarks.train_multi_gpu summarize --runs "$RUNS" --out "$OUT" --scale fp16=fp16-1gpu-b16:fp16-2gpu-b16 \
    --scale fp16-rep=fp16-1gpu-b16-rep:fp16-2gpu-b16-rep --scale int8=int8-1gpu-b16:int8-2gpu-b16
  ( cd "$RUNS" && tar czf "$OUT/logs.tgz" --exclude='*.safetensors' --exclude='*.bin' --exclude='*.pt' \
      --exclude='tokenizer*' --exclude='vocab.txt' . ) || true
  echo "== done in $(( $(date +%s) - START )) s"; exit 0
fi
# (a) throughput, fp16 fast path (default), batch 16 per GPU; the 2-GPU run is also (b)'s 2-GPU side
part fp16-1gpu-b16 1 "${T1:-80}" $FP16 --per_device_train_batch_size 16
part fp16-2gpu-b16 2 "${T2:-100}" $FP16 --per_device_train_batch_size 16
# (b) loss match at global batch 32: 1 GPU x 32 (its output also starts the QAT runs) and the noise reference
part fp16-1gpu-b32 1 "${T3:-80}" $FP16 --per_device_train_batch_size 32
part fp16-1gpu-b32-plain 1 "${T4:-50}" $FP16 --per_device_train_batch_size 32 --fast_path false
# (c) int8 QAT resumed from the fp16 output (the article: --resume_from_checkpoint model/fp16 --enable_quant true)
INIT="$RUNS/fp16-1gpu-b32"
INT8="--model_name_or_path uer/gpt2-chinese-cluecorpussmall --resume_from_checkpoint $INIT $COMMON --enable_quant true"
if [ -f "$INIT/config.json" ]; then
  part int8-1gpu-b16 1 "${T5:-80}" $INT8 --per_device_train_batch_size 16
  part int8-2gpu-b16 2 "${T6:-100}" $INT8 --per_device_train_batch_size 16
  part int8-1gpu-b32 1 "${T7:-80}" $INT8 --per_device_train_batch_size 32
  part int8-1gpu-b32-plain 1 "${T8:-60}" $INT8 --per_device_train_batch_size 32 --fast_path false
else
  echo "== int8: skipped (no fp16 output in $INIT)"
fi

echo "== summary ($(left) s of the budget left)"
$PY -m benchmarks.train_multi_gpu summarize --runs "$RUNS" --out "$OUT" \
  --scale fp16=fp16-1gpu-b16:fp16-2gpu-b16 --scale int8=int8-1gpu-b16:int8-2gpu-b16 \
  --pair fp16=fp16-1gpu-b32:fp16-2gpu-b16:fp16-1gpu-b32:fp16-1gpu-b32-plain \
  --pair int8=int8-1gpu-b32:int8-2gpu-b16:int8-1gpu-b32:int8-1gpu-b32-plain
( cd "$RUNS" && tar czf "$OUT/logs.tgz" --exclude='*.safetensors' --exclude='*.bin' --exclude='*.pt' \
    --exclude='tokenizer*' --exclude='vocab.txt' --exclude='.lsgpt_cache' . ) || true
echo "== done in $(( $(date +%s) - START )) s; $OUT: $(ls "$OUT" | tr '\n' ' ')"
