"""Markdown table of one runs/<model>/ folder (serving.json of each <side>-<path>-<run>):

    python table.py 1x16-vocab512-per-change
"""

import collections
import glob
import json
import os
import sys


def cpu(x: dict) -> str:
    c = x.get("cpu_us_per_token", {})
    if "stub" in c:
        return (f"{c['stub']:.0f} ({c.get('stub:lsgpt-sched', 0):.0f}, {c.get('stub:lsgpt-metrics', 0):.0f}) / "
                f"{c['tritonserver']:.0f}")
    return f"sched {c.get('bench:lsgpt-sched', 0):.0f}"


def main(folder: str) -> None:
    rows: dict = collections.defaultdict(dict)
    for f in sorted(glob.glob(f"{folder}/*/serving.json")):
        label, rep = os.path.basename(os.path.dirname(f)).rsplit("-", 1)
        for x in json.load(open(f))["inflight"]["levels"]:
            rows[(label, x["concurrency"])][rep] = x
    print("| side, path | conc | output tokens/s (run 1 / run 2) | p95 s | tokens/step | CPU µs per token: stub "
          "(sched thread, metrics thread) / tritonserver |")
    print("|---|---|---|---|---|---|")
    for (label, c), reps in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        xs = [reps[r] for r in sorted(reps)]
        tps = " / ".join(f"{x['output_tokens_per_s']:.0f}" for x in xs)
        p95 = " / ".join(f"{x['latency_p95_s']:.2f}" for x in xs)
        per_step = " / ".join(str(x.get("tokens_per_step", "")) for x in xs)
        print(f"| {label} | {c} | {tps} | {p95} | {per_step} | {' ; '.join(cpu(x) for x in xs)} |")

if __name__ == "__main__":
    main(sys.argv[1])
