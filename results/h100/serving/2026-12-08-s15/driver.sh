#!/usr/bin/env bash
# session 15 GPU call A (not committed): issue 29 A/B of LSGPT_ENGINE_PROCESS, int8 then fp16, interleaved; CUDA tests
set -u
tar -xJf .devsite.tar.xz -C /tmp
R=$PWD; T0=$(date +%s); el() { echo "[run15a] $(( $(date +%s) - T0 )) s: $*"; }
nvidia-smi --query-gpu=name --format=csv,noheader
run29() {  # name, model, eproc(0/1)
  el "$1"
  LSGPT_ENGINE_PROCESS=$3 SECTIONS29=inflight OVERHEAD=0 M29=$2 CONC=32,256 REQUESTS=2048 PYSPY=1.5 PYSPY_GIL=1 OUT=/tmp/o/$1 bash benchmarks/gpu.sh serving29 > /tmp/o/$1.log 2>&1
  grep -h -A6 '^| conc | served' /tmp/o/$1.log | cut -c1-260
}
mkdir -p /tmp/o
run29 i8-plain int8 0
run29 i8-eproc int8 1
run29 fp-eproc fp 1
run29 fp-plain fp 0
left=$(( 560 - ($(date +%s) - T0) ))
if [ $left -gt 60 ]; then
  el "tests ($left s)"
  PYTHONPATH=$R timeout $left python3 -m pytest -q -p no:cacheprovider -o addopts= tests/test_engine_gpu.py tests/test_gpu.py -k "sampling or scheduler" > /tmp/o/tests.log 2>&1; tail -3 /tmp/o/tests.log
fi
el pack
tar -C /tmp/o -czf $OUT/results.tgz . ; ls -la $OUT; el done
