"""Aggregate a py-spy raw (collapsed-stack) profile: samples per thread, then inclusive and self samples per frame.

    python aggregate.py stub-before.pyspy.txt [frame filter, e.g. lsgpt-sched] [rows]
"""

import collections
import sys


def main(path: str, only: str | None = None, top: int = 45) -> None:
    total, own, threads, n = collections.Counter(), collections.Counter(), collections.Counter(), 0
    for line in open(path):
        if not line.strip():
            continue
        stack, count = line.rsplit(" ", 1)
        frames, c = stack.split(";"), int(count)
        if only and not any(only in f for f in frames):
            continue
        n += c
        threads[frames[0]] += c
        for f in set(frames):
            total[f] += c
        own[frames[-1]] += c
    print("samples", n)
    for t, c in threads.most_common(10):
        print(f"{c:6d} {100 * c / n:5.1f}% THREAD {t[:150]}")
    print("--- inclusive")
    for f, c in total.most_common(top):
        print(f"{c:6d} {100 * c / n:5.1f}% {f[:160]}")
    print("--- self")
    for f, c in own.most_common(25):
        print(f"{c:6d} {100 * c / n:5.1f}% {f[:160]}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None, int(sys.argv[3]) if len(sys.argv) > 3 else 45)
