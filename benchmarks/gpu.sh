#!/usr/bin/env bash
# The lent GPU machine in one call, into $OUT (the image has Python, torch+CUDA, transformers, h5py; no network,
# no tritonserver, perf_analyzer or matplotlib: re-make figures elsewhere with the scripts' --replot).
#   OUT=/out benchmarks/gpu.sh all       # < 8 min: training, generation
#   OUT=/out benchmarks/gpu.sh tests     # ~3 min: every CUDA-only test (CI has no GPU), into $OUT/tests.log
#       (TESTS="tests/test_resilience.py" runs those instead: the served fault tests on the GPU)
#   OUT=/out benchmarks/gpu.sh fastpath  # GPU tests, generation to batch 256 with TTFT + kernels per step, overhead
#   BEFORE=.gpu_before OUT=/out benchmarks/gpu.sh serving   # overhead, 500 tokens; in-flight here vs $BEFORE
#       (ROUNDS=n interleaved rounds, CONC, REQUESTS; OVERHEAD=0 skips the overhead section)
#   OUT=/out benchmarks/gpu.sh serving29  # < 9 min, issue 29: batch 1 500 tokens served vs in process; per model
#       (int8, fp16): served | in-process Scheduler | fixed batch at CONC (32,256), streamed TTFT/ITL, long joiner
#       (JOINER streams, 768-token prompts, budget 2048 vs 256); SHAPE="2 64 2" runs it on a small model (CPU check);
#       split over two calls on the warm machine with M29=int8 then OVERHEAD=0 M29=fp (the models are kept)
#       PYSPY=2: py-spy samples the model process 2 s of each level (unary and streamed; needs site/bin/py-spy)
#       BEFORE=dir: then the same in-flight load served by dir's lsgpt (an older commit's copy, below)
#       SECTIONS29=inflight: without the joiner section; PYSPY_GIL=1: only samples of the GIL's holder
#       LSGPT_ENGINE_PROCESS=0: the served models' engines in the model process (default on a GPU: their own processes,
#       which py-spy records too); CLIENT_PROCS=n: client processes of the load (default 8: unary at 64+ streams, streamed one per 4)
#       GPROF=1: GPU busy and kernel ms a decode step, in process and in the fixed batch (--gpu-profile)
#   OUT=/out benchmarks/gpu.sh soak-start   # the 10-minute served soak outlives a call (600 s): started in its own
#   OUT=/out benchmarks/gpu.sh soak-wait    # process session, then awaited by the next call on the warm machine
#       (sooner than its 30 s idle release); each call brings back what /tmp/soak holds so far
# $BEFORE: a copy of an older commit's lsgpt/ and model_repository/, e.g.
#   mkdir -p results/tmp/gpu_before && git archive 50b394e lsgpt model_repository | tar -x -C results/tmp/gpu_before
#   (git-ignored: carry it with the call)
# fastpath and serving need wheels carried in .whl/ (results/h100/fastpath/NOTES.md): nvidia-pytriton==0.7.0,
# tritonclient==2.51.0, protobuf<5, grpcio, python-rapidjson, numpy<2 (tritonserver 2.51's Python backend
# returns empty outputs under numpy 2: it goes to the model stubs only, via LSGPT_SITE_PACKAGES).
# When .whl/ and the tree pass run's 64 MiB carry limit, pre-install them here instead and carry one tarball
# (43 MB): pip install --no-deps --target /tmp/carry/site (the rest, python-rapidjson included: tritonclient.grpc
# imports it) and /tmp/carry/stub-site (numpy), each with
# --python-version 3.12 --only-binary=:all: and the manylinux platforms; touch /tmp/carry/site/.lsgpt-installed;
# py-spy's binary (from its wheel's .data/scripts/) as site/bin/py-spy; drop site/bin/perf_* (40 MB, unused here);
# tar -C /tmp/carry -cJf .devsite.tar.xz site stub-site (54 MB); the call then starts with `tar -xJf .devsite.tar.xz -C /tmp`.
# The wheels: pip download --no-deps --python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64
# (and manylinux_2_17/_2_24/_2_28/_2_35_x86_64) nvidia-pytriton==0.7.0 tritonclient==2.51.0 "protobuf<5" grpcio
# python-rapidjson "numpy<2" py-spy; pip install --target needs the same --python-version/--platform flags.
# Files: $OUT/<device>/<benchmark>/... as on the CPU machine, $OUT/tests.log, $OUT/gpu.log.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:?set OUT to the output folder}"
MODE="${1:-all}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
exec > >(tee -a "$OUT/gpu.log") 2>&1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
# once per machine: a second install would rewrite packages under a soak still running from /tmp/site
if [ "$MODE" != all ] && [ "$MODE" != soak-wait ] && [ ! -e /tmp/site/.lsgpt-installed ] && ls .whl/*.whl >/dev/null 2>&1; then
    pip_target() { "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$@"; }
    pip_target /tmp/site $(ls .whl/*.whl | grep -v /numpy-)
    if ls .whl/numpy-*.whl >/dev/null 2>&1; then pip_target /tmp/stub-site .whl/numpy-*.whl; fi
    touch /tmp/site/.lsgpt-installed
fi
[ -d /tmp/site ] && export PYTHONPATH="$PYTHONPATH:/tmp/site"
[ -d /tmp/stub-site ] && export LSGPT_SITE_PACKAGES=/tmp/stub-site
DEV="$("$PY" -c 'from benchmarks.common import device_slug; print(device_slug())' 2>/dev/null || echo gpu)"
echo "[gpu.sh $MODE] $(date -u +%FT%TZ) $DEV $("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__)')"
status=0
MODELS="${MODELS:-/tmp}"  # where export_random_model writes fp.hdf5 and int8.hdf5
# the random 12-layer model (SHAPE="layers hidden heads") the serving modes serve: $MODELS/{fp,int8}.hdf5
export_random_model() { "$PY" -c 'import sys; from pathlib import Path; from benchmarks.common import export_pair as e, random_model as r
e(r(*map(int, sys.argv[1:4])), Path(sys.argv[4]), 1024)' ${SHAPE:-12 768 12} "$MODELS"; }
# every test that needs CUDA (the rest run on the CPU in CI), into $OUT/tests.log; TESTS="..." runs others
gpu_tests() {
    # shellcheck disable=SC2086
    timeout "${TESTS_LIMIT:-300}" "$PY" -m pytest -q -p no:cacheprovider -o addopts="" -s ${TESTS:-tests/test_kernels.py \
        tests/test_gpu.py tests/test_engine_gpu.py tests/test_qat.py::test_cuda_graph_training_matches_eager} \
        > "$OUT/tests.log" 2>&1 || status=1
    grep -E "passed|failed" "$OUT/tests.log" | tail -1
}
run() { local t=$1; shift; timeout "$t" "$PY" "$@" 2>&1 | grep -v Warning | cut -c1-400; [ "${PIPESTATUS[0]}" = 0 ] || status=1; }
case "$MODE" in
all)  # training (about 1 min), generation at batch 1/8/32
    run 150 -m benchmarks.train_throughput --steps 10 --out "$OUT/$DEV/train/train_throughput.json"
    run 300 -m benchmarks.generation --out "$OUT/$DEV/generation" ;;
tests)
    gpu_tests ;;
fastpath)
    gpu_tests
    run 300 -m benchmarks.generation --batches 1,8,32,64,128,256 --ttft-prompt 400 --profile --out "$OUT/$DEV/generation"
    run 120 -m benchmarks.serving --sections overhead --new-tokens 500 --runs 3 --out "$OUT/$DEV/serving" ;;
serving)  # ROUNDS interleaved rounds of after/before (round 1 also fills each side's kernel cache); OVERHEAD=0 skips
    [ "${OVERHEAD:-1}" = 0 ] || run 200 -m benchmarks.serving --sections overhead --new-tokens 500 --runs 3 --out "$OUT/$DEV/serving"
    export_random_model || exit 1
    for round in $(seq "${ROUNDS:-1}"); do
        for side in after before; do  # each side compiles its own Triton kernels
            # python -m puts the working folder first: the before side runs from $BEFORE, so its lsgpt is imported
            dir="$ROOT"; [ "$side" = before ] && dir="$(cd "${BEFORE:-.gpu_before}" && pwd)"
            (cd "$dir" && PYTHONPATH="$dir:$PYTHONPATH" TRITON_CACHE_DIR=/tmp/triton-cache-$side run 170 -m benchmarks.serving \
                --sections inflight --hdf5 "$MODELS/int8.hdf5" --concurrency "${CONC:-1,8,32}" --requests "${REQUESTS:-64}" \
                --out "$OUT/$DEV/serving/$side-r$round"; exit $status) || status=1
        done
    done ;;
serving29)  # issue 29; the overhead run also fills the Triton kernel cache the later runs share
    S29="$OUT/$DEV/serving29"; L="${SHAPE:+--layers ${SHAPE%% *} --hidden $(echo $SHAPE | cut -d' ' -f2) --heads ${SHAPE##* }}"
    # shellcheck disable=SC2086
    [ "${OVERHEAD:-1}" = 0 ] || run 120 -m benchmarks.serving --sections overhead --new-tokens 500 --runs 3 $L --out "$S29/overhead"
    [ -f "$MODELS/fp.hdf5" ] && [ -f "$MODELS/int8.hdf5" ] || export_random_model || exit 1
    for m in ${M29:-int8 fp}; do
        run 190 -m benchmarks.serving --sections "${SECTIONS29:-inflight,joiner}" --in-process --hdf5 "$MODELS/$m.hdf5" --concurrency "${CONC:-32,256}" \
            --requests "${REQUESTS:-512}" --joiner-streams "${JOINER:-128}" ${PYSPY:+--py-spy $PYSPY} ${PYSPY_GIL:+--py-spy-gil} \
            ${CLIENT_PROCS:+--client-procs $CLIENT_PROCS} ${GPROF:+--gpu-profile} --out "$S29/$m"
        if [ -n "${BEFORE:-}" ]; then  # the same load served by $BEFORE's lsgpt (served only), on the same card
            dir="$(cd "$BEFORE" && pwd)"
            (cd "$dir" && PYTHONPATH="$dir:$PYTHONPATH" TRITON_CACHE_DIR=/tmp/triton-cache-before run 150 -m benchmarks.serving \
                --sections inflight --hdf5 "$MODELS/$m.hdf5" --concurrency "${CONC:-32,256}" --requests "${REQUESTS:-512}" \
                ${PYSPY:+--py-spy $PYSPY} --out "$S29/before-$m"; exit $status) || status=1
        fi
    done ;;
soak-start)  # 12-layer random int8 served, concurrency 32, max_new_tokens 16..256, 10% cancelled mid-stream
    export_random_model || exit 1
    mkdir -p /tmp/soak
    setsid nohup "$PY" -m benchmarks.soak --model gpt2_int8 --hdf5 "$MODELS/int8.hdf5" --minutes "${MINUTES:-10}" \
        --concurrency "${CONC:-32}" --cancel-fraction 0.1 --max-new-tokens 16,32,64,128,256 --prompts builtin \
        --warmup 120 --sample-every 2 --tokenizer "${TOKENIZER:-data/tokenizer}" --out "/tmp/soak/$DEV/soak" > /tmp/soak/soak.log 2>&1 < /dev/null &
    echo $! > /tmp/soak/pid; sleep 5; cat /tmp/soak/soak.log ;;
soak-wait)  # until the soak ends or WAIT seconds pass; its log and files so far come back either way
    pid=$(cat /tmp/soak/pid) || exit 1
    for _ in $(seq "${WAIT:-560}"); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    cp -r /tmp/soak/. "$OUT/"; tail -5 /tmp/soak/soak.log
    if kill -0 "$pid" 2>/dev/null; then echo "soak still running (pid $pid)"; status=3; fi ;;
*) echo "usage: OUT=/out $0 [all|tests|fastpath|serving|serving29|soak-start|soak-wait]"; exit 2 ;;
esac
echo "[gpu.sh $MODE] $(date -u +%FT%TZ) done (status $status)"; find "$OUT" -type f | sort
exit $status
