#!/bin/bash
D=2026-12-07-i29
for round in 1 2; do for side in after before; do
  dir=/work/wt-i29; [ $side = before ] && dir=/work/wt-i29/results/tmp/before-main
  echo "== $side r$round $(date -u +%T)"
  (cd $dir && PYTHONPATH=$dir /work/wt-i29/.venv/bin/python -m benchmarks.serving --sections inflight --hdf5 /tmp/i29-cpu/fp.hdf5 \
     --concurrency 8,32 --requests 384 --out /work/wt-i29/results/cpu/serving/$D/$side-r$round) 2>&1 | grep -v Warning | grep '^{'
done; done
echo "== end $(date -u +%T)"
