#!/bin/bash
# after = branch i29 (this folder's commit), before = main b38e0c3 (git archive main lsgpt model_repository)
D=2026-12-07-lanes
for round in 1 2; do for side in after before; do
  dir=/work/wt-29; [ $side = before ] && dir=/work/main/results/tmp/gpu_before
  echo "== $side r$round $(date -u +%T)"
  (cd $dir && PYTHONPATH=$dir:/work/wt-29 /work/wt-29/.venv/bin/python -m benchmarks.serving --sections inflight --hdf5 /tmp/i29-cpu/fp.hdf5 \
     --concurrency 8,32 --requests 384 --out /work/wt-29/results/cpu/serving/$D/$side-r$round) 2>&1 | grep -v Warning | grep '^{'
done; done
echo "== end $(date -u +%T)"
