"""The in-process Scheduler on benchmarks.serving's in-flight load, prefill graphs off then on, one engine
(issue 29: where the prefill's host time goes). Each level prints in_process_level's row (tokens/s, ms per step
and per prefill, the host's prefill share, TTFT/ITL, the fixed batch at the same mean rows).
    python -m benchmarks.prefill_graphs_ab HDF5 [CONC,...] [device]     (GPU: /tmp/int8.hdf5 of gpu.sh serving29)"""
import json
import os
import random
import sys
import types

from benchmarks import serving
from lsgpt.engine.engine import Engine
from lsgpt.engine.scheduler import Scheduler

hdf5, conc = sys.argv[1], [int(c) for c in (sys.argv[2] if len(sys.argv) > 2 else "32,256").split(",")]
dev = sys.argv[3] if len(sys.argv) > 3 else "cuda"
eng = Engine.load(hdf5, dev)
cap = eng.config.max_step - 1
a = types.SimpleNamespace(device=dev)
for graphs in ("0", "1"):
    os.environ["LSGPT_PREFILL_GRAPHS"] = graphs
    sched = Scheduler(eng, max_rows="auto")
    for c in conc:
        reqs = serving.make_load(random.Random(0), eng.config.vocab, cap, 6 * c)
        row = serving.in_process_level(a, sched, c, reqs, cap)
        print(json.dumps({"prefill_graphs": sched.graphed_prefill, "captured": len(sched.prefill_graphs),
                          "rows": sched.max_rows, "concurrency": c, **row}), flush=True)
    sched.close()
    del sched
