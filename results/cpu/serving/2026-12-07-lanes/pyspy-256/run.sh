set -x
# after = branch i29 (efcef38); before = main b38e0c3 copied to results/tmp/gpu_before (git archive main lsgpt model_repository)
# models: python -c 'from pathlib import Path; from benchmarks.common import export_pair as e, random_model as r; e(r(2, 64, 2), Path("/tmp/cpu29"), 1024)'
cd /work/wt-29
for side in after before; do
  dir=$PWD; [ $side = before ] && dir=/work/main/results/tmp/gpu_before
  (cd $dir && PY_SPY=/tmp/devsite/site/bin/py-spy PYTHONPATH=$dir:/work/wt-29 /work/wt-29/.venv/bin/python -m benchmarks.serving --sections inflight --hdf5 /tmp/cpu29/int8.hdf5 --concurrency 256 --requests 1024 --py-spy 3 --out /tmp/cpu29/$side)
done
