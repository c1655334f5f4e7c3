for r in 1 2; do for side in wtc wtm; do
  echo "== $side r$r $(date -u +%T)"
  (cd /tmp/$side && PYTHONPATH=/tmp/$side /work/main/.venv/bin/python -m benchmarks.serving --sections inflight --in-process --hdf5 /tmp/cpu29/int8.hdf5 --layers 2 --hidden 64 --heads 2 --concurrency 32 --requests 512 --out /tmp/cstream/$side-r$r) 2>&1 | grep -v Warning | grep "^| 32"
done; done
