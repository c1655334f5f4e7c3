#!/usr/bin/env bash
# Interleaved A/B of kernel settings on the GPU machine, in one call (the same GPU, the same warm caches):
#   OUT=/out ROUNDS=2 benchmarks/ab.sh "base:LSGPT_PREFETCH_ROWS=0" "prefetch:" -- --batches 1,8,32,64
# Each "name:VAR=value VAR2=value" runs benchmarks/generation.py once per round with those variables set (HF
# skipped; the first run of round 1 also times HF at batch 1), into $OUT/<name>-r<round>/ (and all of it into $TAR
# after each run, when set). Then a summary table: the mean of the rounds per variant and batch.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:?set OUT}"; ROUNDS="${ROUNDS:-2}"; PY="${PYTHON:-python3}"
variants=(); while [ $# -gt 0 ] && [ "$1" != -- ]; do variants+=("$1"); shift; done; [ "${1:-}" = -- ] && shift
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
hf=1
for r in $(seq 1 "$ROUNDS"); do
    for v in "${variants[@]}"; do
        name="${v%%:*}"; vars="${v#*:}"
        echo "[ab] round $r $name ($vars)"
        env $vars "$PY" benchmarks/generation.py --hf-max-batch "$([ $hf = 1 ] && echo 1 || echo -1)" "$@" \
            --out "$OUT/$name-r$r" 2>&1 | grep -v -i warn | tail -3
        rm -f "$OUT/$name-r$r"/*.png; hf=0
        [ -n "${TAR:-}" ] && tar czf "$TAR" -C "$OUT" .  # what has run so far, should the call be cut off
    done
done
"$PY" - "$OUT" <<'PY'
import json, sys, collections
from pathlib import Path
runs = collections.defaultdict(list)
for f in sorted(Path(sys.argv[1]).glob("*-r*/generation.json")):
    runs[f.parent.name.rsplit("-r", 1)[0]].append(json.loads(f.read_text()))
for name, reps in runs.items():
    for row_i, row in enumerate(reps[0]["results"]):
        cells = {k: sum(r["results"][row_i].get(k, 0) for r in reps) / len(reps) for k in row if k.endswith("_s")}
        print(name, f"batch {row['batch']}", " ".join(f"{k}={v:.4f}" for k, v in sorted(cells.items())))
PY
