#!/usr/bin/env bash
# next session's issue 33 GPU call (untracked; no carry needed): the opt-in fused decode variants A/B, interleaved,
# HF at batch 1 in the same call; the new kernels' CUDA tests; kernels per step (profile)
#   base | LN (LSGPT_FUSED_LN=1) | LN+FFN (+LSGPT_FUSED_FFN=1) | all (+LSGPT_FUSED_ATTN=1)
set -u
R=$PWD; T0=$(date +%s); el() { echo "[run16b] $(( $(date +%s) - T0 )) s: $*"; }
nvidia-smi --query-gpu=name --format=csv,noheader; mkdir -p /tmp/o; pack() { tar -C /tmp/o -czf $OUT/results.tgz . ; }
el tests
PYTHONPATH=$R timeout 150 python3 -m pytest -q -p no:cacheprovider -o addopts= tests/test_kernels.py \
  -k "partials or without_layer_norm or ffn_in_one or attention_block" > /tmp/o/tests-kernels.log 2>&1; tail -2 /tmp/o/tests-kernels.log
LSGPT_FUSED_LN=1 LSGPT_FUSED_FFN=1 LSGPT_FUSED_ATTN=1 PYTHONPATH=$R timeout 150 python3 -m pytest -q -p no:cacheprovider \
  -o addopts= tests/test_engine_gpu.py > /tmp/o/tests-engine-all.log 2>&1; tail -2 /tmp/o/tests-engine-all.log; pack
variant() { case $1 in base) echo "";; ln) echo "LSGPT_FUSED_LN=1";; ffn) echo "LSGPT_FUSED_LN=1 LSGPT_FUSED_FFN=1";;
  all) echo "LSGPT_FUSED_LN=1 LSGPT_FUSED_FFN=1 LSGPT_FUSED_ATTN=1";; esac; }
for r in ${ROUNDS:-1}; do for v in base ln ffn all; do
  el "generation $v round $r"
  env $(variant $v) PYTHONPATH=$R timeout 100 python3 -m benchmarks.generation --new-tokens 256 --hf-max-batch 1 \
    --batches 1,8,64 --repeats 3 --out /tmp/o/gen-$v-r$r > /tmp/o/gen-$v-r$r.log 2>&1
  grep -A6 '^| batch' /tmp/o/gen-$v-r$r.log | head -8; pack
done; done
el "profile (kernels per step)"
for v in base all; do env $(variant $v) PYTHONPATH=$R timeout 90 python3 -m benchmarks.generation --new-tokens 64 \
  --hf-max-batch 1 --batches 1 --repeats 1 --profile --profile-batches 1,8 --out /tmp/o/prof-$v > /tmp/o/prof-$v.log 2>&1
  tail -12 /tmp/o/prof-$v.log; done
pack; el done
